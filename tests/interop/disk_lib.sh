# shellcheck shell=bash
# Helpers for the interop tests of whole disks (DiskDescriptor.xml and its
# snapshot chain): snapshot_test.sh, descriptor_test.sh,
# merge_crash_test.sh. Source lib.sh first.
#
# The expected content of a disk is kept as a model beside it: for disk
# folder D, the folder D.ref holds one raw file per snapshot, named
# GUID.raw (the disk as that snapshot saw it), and top.raw (the current
# disk). dio applies every write to the disk with `ploop io` and to
# D.ref/top.raw with qemu-io (lib.sh's `both`); the snapshot helpers
# update the model the way the operation's documented semantics say, and
# verify_disk compares the two.
# shellcheck disable=SC2154  # OUT, RC and TMP come from lib.sh

TOP_GUID='{5fbaabe3-6958-40ff-92a7-860e329aab41}'
NULL_GUID='{00000000-0000-0000-0000-000000000000}'

# disk_init D SIZE CLUSTER [INIT-ARGS...]: a new disk in folder D (init
# writes D/root.hds and D/DiskDescriptor.xml, no file system) and its
# all-zero model.
disk_init() {
  local d=$1 size=$2 cb=$3
  shift 3
  mkdir "$d" "$d.ref"
  pl init -s "$size" -b "$cb" -t none "$@" "$d/root.hds" # the model is an all-zero disk
  truncate -s "$size" "$d.ref/top.raw"
}

# dio D IOCMD...: write to the disk's top and to the model's top.raw.
dio() {
  local d=$1
  shift
  both "$d/DiskDescriptor.xml" "$d.ref/top.raw" "$@"
}

# shots D: one line per shot of the disk, from `snapshot-list --json`:
# "GUID PARENT CURRENT TEMPORARY FILE" (CURRENT and TEMPORARY are
# true/false). Leaves $OUT and $TMP/.out alone (callers run it in a
# subshell, right between a command and the checks of its output).
shots() {
  local json
  json=$("$PLOOP" snapshot-list --json "$1/DiskDescriptor.xml") ||
    fail "ploop snapshot-list --json $1 failed"
  awk '
    /^ *\{ *$/ { split("", v); next }
    /^ *"[a-z_]+": / {
      line = $0
      sub(/^ *"/, "", line)
      key = line
      sub(/".*/, "", key)
      val = line
      sub(/^[a-z_]+": */, "", val)
      sub(/,$/, "", val)
      gsub(/"/, "", val)
      v[key] = val
      next
    }
    /^ *\},? *$/ { print v["guid"], v["parent_guid"], v["current"], v["temporary"], v["file"] }
  ' <<<"$json"
}

# parent_of D GUID: the shot's ParentGUID.
parent_of() {
  local p
  p=$(shots "$1" | awk -v g="$2" '$1 == g { print $2 }')
  [[ -n $p ]] || fail "$1 has no shot $2"
  echo "$p"
}

# file_of D GUID: the shot's file, relative to D.
file_of() {
  local f
  f=$(shots "$1" | awk -v g="$2" '$1 == g { print $5 }')
  [[ -n $f ]] || fail "$1 has no shot $2"
  echo "$f"
}

# chain_of D: the active chain, base first, one GUID a line.
chain_of() {
  local lines g
  lines=$(shots "$1")
  g=$TOP_GUID
  local out=()
  while [[ $g != "$NULL_GUID" ]]; do
    out=("$g" "${out[@]}")
    g=$(awk -v g="$g" '$1 == g { print $2 }' <<<"$lines")
    [[ -n $g ]] || fail "broken chain in $1"
  done
  printf '%s\n' "${out[@]}"
}

# dsnap D [GUID]: take a snapshot (named GUID if given). Its GUID goes to
# $SNAP; the model records the disk as it is now under that GUID.
dsnap() {
  local d=$1
  if [[ -n ${2:-} ]]; then
    pl snapshot -u "$2" "$d/DiskDescriptor.xml"
  else
    pl snapshot "$d/DiskDescriptor.xml"
  fi
  SNAP=$OUT
  [[ $SNAP =~ ^\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}$ ]] ||
    fail "ploop snapshot printed '$SNAP', not a GUID"
  cp "$d.ref/top.raw" "$d.ref/$SNAP.raw"
}

# dswitch D GUID: roll back to snapshot GUID; the model's current disk
# becomes that snapshot's content.
dswitch() {
  pl snapshot-switch -u "$2" "$1/DiskDescriptor.xml"
  cp "$1.ref/$2.raw" "$1.ref/top.raw"
}

# dmerge D [GUID]: merge GUID (default: the top) into its parent. The
# child's view does not change; the parent's GUID is gone.
dmerge() {
  local d=$1 child=${2:-$TOP_GUID} parent
  parent=$(parent_of "$d" "$child")
  if [[ -n ${2:-} ]]; then
    pl snapshot-merge -u "$child" "$d/DiskDescriptor.xml"
  else
    pl snapshot-merge "$d/DiskDescriptor.xml"
  fi
  rm "$d.ref/$parent.raw"
}

# dmerge_all D: merge the whole active chain into its base: every snapshot
# of the chain is gone, the current disk is unchanged.
dmerge_all() {
  local d=$1 g chain
  chain=$(chain_of "$d")
  for g in $chain; do
    [[ $g == "$TOP_GUID" ]] || rm "$d.ref/$g.raw"
  done
  pl snapshot-merge -A "$d/DiskDescriptor.xml"
}

# ddelete D GUID: delete a snapshot. A leaf just goes; one with a single
# child is merged into it (the child keeps its view); either way GUID is
# gone from the model.
ddelete() {
  pl snapshot-delete -u "$2" "$1/DiskDescriptor.xml"
  rm "$1.ref/$2.raw"
}

# is_ploop FILE: the file starts with a ploop v2 signature.
is_ploop() { cmp -s -n 16 "$1" <(printf WithouFreSpacExt); }

# stamp FILE: content hash and modification time (with nanoseconds when
# stat supports %.9Y), to prove a file was not touched.
stamp() {
  local t
  t=$(stat -c %.9Y "$1" 2>/dev/null) || t=$(stat -c %Y "$1")
  echo "$(md5 "$1") $t"
}

# folder_stamps DIR: a stamp of every file in DIR, sorted by name.
folder_stamps() {
  local f
  for f in "$1"/* "$1"/.[!.]*; do
    [[ -e $f || -L $f ]] || continue
    echo "${f##*/} $(stamp "$f")"
  done | LC_ALL=C sort
}

# same_disk EXPORTED REF: an exported raw disk has the expected size and
# content (qemu-img compare alone accepts a size difference over zeros).
same_disk() {
  assert_eq "$(file_size "$1")" "$(file_size "$2")" "size of the disk in $1"
  qemu_same "$1" "$2" raw
}

# verify_disk D: the disk agrees with its model D.ref:
#  - `ploop check` finds no problems;
#  - snapshot-list marks exactly one shot current, the top {5fbaabe3-...};
#  - the snapshots are exactly the model's, each exports (`export -u`) to
#    its model content and size, and the current disk exports to top.raw
#    (compared by qemu-img compare);
#  - every ploop delta file passes `qemu-img check -f parallels`, and QEMU
#    reading the base delta alone sees the base snapshot's content;
#  - the folder holds the descriptor and the files it names, nothing else.
# With VERIFY_SUBSET=1 the disk may hold fewer snapshots than the model
# (each one it holds must match); the caller checks which.
verify_disk() {
  local d=$1 dd=$1/DiskDescriptor.xml lines g f want got
  pl check "$dd"
  out_has "no problems found"
  lines=$(shots "$d")
  [[ $(awk '$3 == "true"' <<<"$lines" | wc -l) == 1 ]] ||
    fail "snapshot-list of $d marks $(awk '$3 == "true"' <<<"$lines" | wc -l) shots current: $lines"
  assert_eq "$(awk '$3 == "true" { print $1 }' <<<"$lines")" "$TOP_GUID" "current shot of $d"
  got=$(awk -v top="$TOP_GUID" '$1 != top { print $1 }' <<<"$lines" | LC_ALL=C sort)
  want=$(cd "$d.ref" && for f in *.raw; do [[ $f == top.raw ]] || echo "${f%.raw}"; done |
    LC_ALL=C sort)
  if [[ ${VERIFY_SUBSET:-0} == 1 ]]; then
    for g in $got; do
      [[ -f $d.ref/$g.raw ]] || fail "$d has snapshot $g that its model lacks"
    done
  else
    assert_eq "$got" "$want" "snapshots of $d"
  fi
  for g in $got; do
    rm -f "$d.exp"
    pl export -u "$g" "$dd" "$d.exp"
    same_disk "$d.exp" "$d.ref/$g.raw"
  done
  rm -f "$d.exp"
  pl export "$dd" "$d.exp"
  same_disk "$d.exp" "$d.ref/top.raw"
  rm -f "$d.exp"
  local files=()
  while read -r g _ _ _ f; do
    files+=("$f")
    [[ -f $d/$f ]] || fail "$d: delta file $f is missing"
    is_ploop "$d/$f" && qemu_clean "$d/$f"
    if [[ $(awk -v g="$g" '$1 == g { print $2 }' <<<"$lines") == "$NULL_GUID" ]]; then
      local ref=$d.ref/$g.raw
      [[ $g == "$TOP_GUID" ]] && ref=$d.ref/top.raw
      if is_ploop "$d/$f"; then qemu_same "$d/$f" "$ref"; else qemu_same "$d/$f" "$ref" raw; fi
    fi
  done <<<"$lines"
  got=$(find "$d" -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort)
  want=$(printf '%s\n' DiskDescriptor.xml "${files[@]}" | LC_ALL=C sort)
  assert_eq "$got" "$want" "files in $d"
}
