#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# DiskDescriptor.xml files ploop did not write, and bad ones.
#
# Golden descriptors (tests/data/descriptors: OpenVZ layouts and a
# Parallels Desktop one) are copied next to delta files made by QEMU
# (`qemu-img create -f parallels`) and by `ploop init --no-descriptor`,
# each delta holding its own data written by qemu-io. ploop info, io -r,
# export -u of every snapshot, snapshot, snapshot-list, merge and check
# work on them and see the layers composed as the descriptor's tree says;
# after ploop rewrites a descriptor, the nodes it does not know are still
# there.
#
# Bad descriptors (a ParentGUID cycle, a self-parent, a dangling parent,
# duplicate GUIDs, a missing delta file, cluster sizes that disagree with
# the deltas, a File escaping the folder by an absolute path, "../" or a
# symlink) get a one-line error with the documented exit code from every
# command, and no file changes (md5 and mtime of every file in the folder,
# and outside it); --allow-outside-files lets the escaping descriptors
# work.
#
# restore-descriptor rebuilds a lost descriptor for ploop images
# (expanded, preallocated, made by QEMU) and raw ones, and the disk reads
# the same; its errors are one line each.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=disk_lib.sh
. "$here/disk_lib.sh"
need qemu-img qemu-io perl

KiB=1024
MiB=$((1024 * KiB))
GOLDEN=${TESTS_DIR:-$here/..}/data/descriptors
[[ -f $GOLDEN/parallels.xml ]] || fail "no golden descriptors in $GOLDEN"

# xml_value FILE ELEMENT: the text of the first <ELEMENT>.
xml_value() { sed -n "s:.*<$2>\\([^<]*\\)</$2>.*:\\1:p" "$1" | head -1; }

# guid_norm GUID: the form ploop prints (braces, lower case).
guid_norm() {
  local g=${1,,}
  g=${g#\{}
  echo "{${g%\}}}"
}

# golden NAME DIR: copy golden descriptor NAME.xml into the new folder DIR
# and make every delta file it names, of its size and cluster size:
# alternately with qemu-img create and ploop init. Each delta gets its own
# data (two writes by qemu-io of whole clusters -- a delta's cluster hides
# all of the cluster below -- overlapping the neighbours' ranges); the
# model DIR.ref holds, for every shot, the layers of its chain applied base
# first.
golden() {
  local name=$1 d=$2 size cbs i=0 f guid
  mkdir "$d" "$d.ref"
  cp "$GOLDEN/$name.xml" "$d/DiskDescriptor.xml"
  size=$(($(xml_value "$d/DiskDescriptor.xml" Disk_size) * 512))
  cbs=$(($(xml_value "$d/DiskDescriptor.xml" Blocksize) * 512))
  declare -gA LAYER_IO=()
  # <Image> blocks: GUID then File, in document order.
  while read -r guid f; do
    if ((i % 2 == 0)); then
      expect_ok qemu-img create -q -f parallels -o "cluster_size=$cbs" "$d/$f" "$size"
    else
      pl init --no-descriptor -s "$size" -b "$cbs" "$d/$f"
    fi
    guid=$(guid_norm "$guid")
    LAYER_IO[$guid]="write -P $((0xa0 + i)) $((i * cbs)) $((2 * cbs))|write -P $((0xb0 + i)) $((size - (i + 1) * cbs)) 4096"
    local cmds=()
    IFS='|' read -r -a cmds <<<"${LAYER_IO[$guid]}"
    expect_ok qemu-io -f parallels "${cmds[@]/#/-c}" "$d/$f"
    i=$((i + 1))
  done < <(awk '/<GUID>/ && img { sub(/.*<GUID>/, ""); sub(/<.*/, ""); g = $0 }
                /<Image>/ { img = 1 } /<\/Image>/ { img = 0 }
                /<File>/ { sub(/.*<File>/, ""); sub(/<.*/, ""); print g, $0 }' \
    "$d/DiskDescriptor.xml")
  # Expected content of every shot: its chain's layers, base first.
  local lines g chain ref
  lines=$(shots "$d")
  while read -r guid _; do
    chain=()
    g=$guid
    while [[ $g != "$NULL_GUID" ]]; do
      chain=("$g" "${chain[@]}")
      g=$(awk -v g="$g" '$1 == g { print $2 }' <<<"$lines")
    done
    ref=$d.ref/$guid.raw
    [[ $guid == "$TOP_GUID" ]] && ref=$d.ref/top.raw
    truncate -s "$size" "$ref"
    for g in "${chain[@]}"; do
      local cmds=()
      IFS='|' read -r -a cmds <<<"${LAYER_IO[$g]}"
      expect_ok qemu-io -f raw "${cmds[@]/#/-c}" "$ref"
    done
  done <<<"$lines"
}

# --- golden descriptors -------------------------------------------------------
note "golden: Parallels Desktop descriptor"
golden parallels pd
PD=pd/DiskDescriptor.xml
PBASE='{a6e1b1c2-8f3d-4c55-b0e7-1d2c3b4a5f60}'
verify_disk pd
pl info "$PD"
out_has "virtual size: +64 GiB"
out_has "deltas: +2 \\(2 in the active chain\\)"
pl info --json "$PD"
out_has '"cluster_size": 1048576'
pl io -r "$PD" "read -P 0xa1 $MiB $((2 * MiB))" "read -P 0xa0 0 $MiB"
pl io -r -u "$PBASE" "$PD" "read -P 0xa0 0 $((2 * MiB))"
# The Shot's GUID had no braces, the Image's was upper case: both are the
# same delta, listed in ploop's form.
assert_eq "$(parent_of pd "$TOP_GUID")" "$PBASE" "parent of the top"
dio pd "write -P 0xc1 $((7 * MiB)) $((3 * MiB))"
dsnap pd
P1=$SNAP
dio pd "write -P 0xc2 $((8 * MiB)) $MiB" "discard 0 $MiB"
verify_disk pd
# parallels_nodes FILE [BASE]: every node ploop does not model survived:
# the disk's, and with BASE those of the base image and its shot (which a
# merge into the base removes, with the base's GUID).
parallels_nodes() {
  local node nodes=('<!-- Written by Parallels Desktop' '<PhysicalSectorSize>4096</PhysicalSectorSize>'
    '<LogicSectorSize>512</LogicSectorSize>' '<Engine>{00000000-0000-0000-0000-000000000000}</Engine>'
    '<UID>{3b4d5f47-5c4b-4d4e-9a0e-2f1c7d9e8a61}</UID>' '<Name>Ubuntu 22.04-0.hdd</Name>'
    '<CompatLevel>level2</CompatLevel>' '<Bootcamp>0</Bootcamp>' '<SuspendState>0</SuspendState>'
    'Version="1.0"')
  [[ -n ${2:-} ]] && nodes+=('<CreationTime Zone="UTC">2023-03-14 09:26:53</CreationTime>'
    '<Description>before upgrade</Description>')
  for node in "${nodes[@]}"; do
    grep -qF -- "$node" "$1" || fail "$1 lost '$node' when ploop rewrote it: $(cat "$1")"
  done
}
parallels_nodes "$PD" base
# Unknown nodes stay with their owner: the creation time with the base
# image, the description with the base's shot.
grep -A4 "<GUID>$PBASE</GUID>" "$PD" | grep -q "<CreationTime" ||
  fail "CreationTime moved away from the base image: $(cat "$PD")"
awk '/<Shot>/ { s = "" } { s = s $0 "\n" } /<\/Shot>/ { if (s ~ /before upgrade/) print s }' "$PD" |
  grep -qF "<GUID>$PBASE</GUID>" || fail "Description moved away from the base's shot: $(cat "$PD")"
pl snapshot-list "$PD"
out_has "^\\$PBASE  \\$NULL_GUID  harddisk\\.hdd\\.0\\.\\$PBASE\\.hds$"
dmerge pd "$P1"
parallels_nodes "$PD"
verify_disk pd
dmerge_all pd
parallels_nodes "$PD"
verify_disk pd
# QEMU still reads the surviving file (the base), now holding the disk.
qemu_same "pd/harddisk.hdd.0.$PBASE.hds" pd.ref/top.raw

note "golden: OpenVZ descriptor with a snapshot"
golden snapshot os
OS=os/DiskDescriptor.xml
verify_disk os
pl io -r "$OS" "read -P 0xa1 $MiB $((2 * MiB))"
dsnap os
dio os "write -P 0xd1 $((5 * MiB)) $MiB"
verify_disk os
grep -qF "<Cylinders>40960</Cylinders>" "$OS" || fail "geometry changed: $(cat "$OS")"
dmerge os
verify_disk os

note "golden: OpenVZ descriptor with an interrupted merge (a temporary snapshot)"
golden temporary ot
OT=ot/DiskDescriptor.xml
OTMP='{b3c0a9e2-51f4-4c1d-8e6a-0f9d2c7b4a13}'
pl snapshot-list --json "$OT"
out_has '"temporary": true'
# Reading works before the repair; check names the problem.
pl export "$OT" ot.exp
qemu_same ot.exp ot.ref/top.raw raw
rm ot.exp
expect_rc 1 "$PLOOP" check "$OT"
out_has "merge into \\$OTMP was interrupted"
pl check --repair "$OT"
out_has "finished 1 interrupted merge"
rm "ot.ref/$OTMP.raw"
verify_disk ot
assert_eq "$(file_of ot "$TOP_GUID")" "root.hds.{2e8f6a10-9d3b-4f7e-b1c5-6a0d8e2f4c97}" \
  "file of the top after the merge into the temporary snapshot"

note "golden: OpenVZ descriptor with a tree (preallocated disk)"
golden tree tr
TR=tr/DiskDescriptor.xml
verify_disk tr
pl info "$TR"
out_has "deltas: +4 \\(3 in the active chain\\)"
out_has "off-chain \\{1f0e2d3c-4b5a-4697-8877-665544332211\\}"
listing=$(folder_stamps tr)
expect_error 10 "$PLOOP" snapshot-merge -A "$TR"
expect_error 10 "$PLOOP" snapshot-merge -u '{2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d}' "$TR"
assert_eq "$(folder_stamps tr)" "$listing" "the tree after refused merges"
ddelete tr '{1f0e2d3c-4b5a-4697-8877-665544332211}'
verify_disk tr
dsnap tr
dio tr "write -P 0xe1 $((9 * MiB)) $MiB"
verify_disk tr
grep -qF "<Preallocated>1</Preallocated>" "$TR" || fail "Preallocated lost: $(cat "$TR")"
dmerge_all tr
verify_disk tr

# --- bad descriptors ------------------------------------------------------------
# A two-delta disk made by ploop, copied for each variant.
disk_init good 4M 64K
dio good "write -P 0x11 0 196608" "write -P 0x12 $((2 * MiB)) 65536"
dsnap good
GOOD_BASE=$SNAP
dio good "write -P 0x13 65536 65536"
verify_disk good
GOOD_TOP_FILE=$(file_of good "$TOP_GUID")
mkdir outside

# variant NAME: a fresh copy of the good disk in folder NAME.
variant() {
  rm -rf "$1"
  cp -a good "$1"
}

# all_refused DIR CODE: every command that reads or changes the disk fails
# with CODE and one line, and no file in DIR or in outside/ changes.
all_refused() {
  local d=$1 code=$2 dd=$1/DiskDescriptor.xml cmd before
  before=$(folder_stamps "$d"; folder_stamps outside)
  local cmds=("info" "io -r|read 0 512" "io|write -P 0x99 0 512" "export|$d.out"
    "snapshot" "snapshot -u {0a0b0c0d-1111-4222-8333-444455556666}" "snapshot-merge"
    "snapshot-merge -A" "snapshot-switch -u $GOOD_BASE" "snapshot-delete -u $GOOD_BASE"
    "resize -s 8M")
  for cmd in "${cmds[@]}"; do
    local words extra=()
    read -r -a words <<<"${cmd%%|*}"
    [[ $cmd == *"|"* ]] && extra=("${cmd#*|}")
    expect_error "$code" "$PLOOP" "${words[@]}" "$dd" "${extra[@]}"
  done
  assert_absent "$d.out"
  assert_eq "$(folder_stamps "$d"; folder_stamps outside)" "$before" "files after refused commands on $d"
}

note "bad: ParentGUID cycle, self-parent, dangling parent"
variant cyc
sed -i "0,/<ParentGUID>$NULL_GUID/s//<ParentGUID>$TOP_GUID/" cyc/DiskDescriptor.xml
all_refused cyc 5
err_has "cycle"
expect_error 5 "$PLOOP" check --repair cyc/DiskDescriptor.xml
err_has "cycle"
expect_error 5 "$PLOOP" snapshot-list cyc/DiskDescriptor.xml
variant self
sed -i "0,/<ParentGUID>$NULL_GUID/s//<ParentGUID>$GOOD_BASE/" self/DiskDescriptor.xml
all_refused self 5
variant dangling
sed -i "0,/<ParentGUID>$NULL_GUID/s//<ParentGUID>{99999999-8888-4777-8666-555555555555}/" \
  dangling/DiskDescriptor.xml
all_refused dangling 5

note "bad: duplicate GUIDs"
variant dup
# The base image and its shot take the top's GUID.
sed -i "s/$GOOD_BASE/$TOP_GUID/g" dup/DiskDescriptor.xml
all_refused dup 5
err_has "duplicate"
expect_error 5 "$PLOOP" check dup/DiskDescriptor.xml
variant dupimg
# Only the image: two <Image>s with one GUID, a shot without an image.
perl -0pi -e "s/(<GUID>)\\Q$GOOD_BASE\\E(<\\/GUID>\\s*<Type>)/\${1}$TOP_GUID\${2}/" \
  dupimg/DiskDescriptor.xml
grep -c "<GUID>$TOP_GUID</GUID>" dupimg/DiskDescriptor.xml | grep -qx 3 || fail "sed did not apply"
all_refused dupimg 5

note "bad: a missing delta file"
variant miss
rm "miss/$GOOD_TOP_FILE"
all_refused miss 3
err_has "No such file"
before=$(folder_stamps miss)
expect_rc 5 "$PLOOP" check miss/DiskDescriptor.xml
out_has "$GOOD_TOP_FILE: file is missing"
expect_rc 5 "$PLOOP" check --repair miss/DiskDescriptor.xml
out_has "corrupt beyond repair"
assert_eq "$(folder_stamps miss)" "$before" "files after check of a disk with a missing delta"
variant missbase
rm missbase/root.hds
all_refused missbase 3

note "bad: cluster sizes disagree with the descriptor"
variant clu
sed -i "s:<Blocksize>128</Blocksize>:<Blocksize>2048</Blocksize>:" clu/DiskDescriptor.xml
grep -q "<Blocksize>2048</Blocksize>" clu/DiskDescriptor.xml || fail "sed did not apply"
# (info only reports; everything that opens the deltas refuses.)
cmds_before=$(folder_stamps clu)
all_refused_but_info() {
  local d=$1 dd=$1/DiskDescriptor.xml
  expect_error 5 "$PLOOP" io -r "$dd" "read 0 512"
  err_has "has cluster size 65536 but the descriptor says 1048576"
  expect_error 5 "$PLOOP" io "$dd" "write -P 0x99 0 512"
  expect_error 5 "$PLOOP" export "$dd" "$d.out"
  expect_error 5 "$PLOOP" snapshot "$dd"
  err_has "has cluster size 65536"
  expect_error 5 "$PLOOP" snapshot-merge "$dd"
  expect_error 5 "$PLOOP" snapshot-merge -A "$dd"
  expect_error 5 "$PLOOP" snapshot-switch -u "$GOOD_BASE" "$dd"
  expect_error 5 "$PLOOP" snapshot-delete -u "$GOOD_BASE" "$dd"
  expect_error 5 "$PLOOP" resize -s 8M "$dd"
  expect_rc 5 "$PLOOP" check --repair "$dd"
  out_has "has cluster size 65536 but the descriptor says 1048576"
  assert_absent "$d.out"
}
all_refused_but_info clu
assert_eq "$(folder_stamps clu)" "$cmds_before" "files after refused commands on clu"
# Only the top disagrees: still refused, before anything is written.
variant clutop
rm "clutop/$GOOD_TOP_FILE"
pl init --no-descriptor -s 4M -b 32K "clutop/$GOOD_TOP_FILE"
cmds_before=$(folder_stamps clutop)
expect_error 5 "$PLOOP" snapshot clutop/DiskDescriptor.xml
expect_error 5 "$PLOOP" snapshot-merge clutop/DiskDescriptor.xml
expect_error 5 "$PLOOP" io clutop/DiskDescriptor.xml "write -P 1 0 1"
assert_eq "$(folder_stamps clutop)" "$cmds_before" "files after refused commands on clutop"

note "bad: a File outside the descriptor's folder"
# esc_variant NAME HOW: the base delta moved to outside/NAME.hds and named
# by an absolute path, a ../ path, or through a symlink in the folder.
esc_variant() {
  local name=$1 how=$2
  variant "$name"
  mv "$name/root.hds" "outside/$name.hds"
  case $how in
    abs) sed -i "s#<File>root.hds</File>#<File>$TMP/outside/$name.hds</File>#" \
      "$name/DiskDescriptor.xml" ;;
    dotdot) sed -i "s#<File>root.hds</File>#<File>../outside/$name.hds</File>#" \
      "$name/DiskDescriptor.xml" ;;
    symlink) ln -s "../outside/$name.hds" "$name/root.hds" ;;
  esac
  cp -a "good.ref" "$name.ref"
}
for how in abs dotdot symlink; do
  esc_variant "esc-$how" "$how"
  all_refused "esc-$how" 2
  err_has "outside the descriptor's folder"
  expect_error 2 "$PLOOP" check "esc-$how/DiskDescriptor.xml"
  expect_error 2 "$PLOOP" snapshot-list "esc-$how/DiskDescriptor.xml"
  # Allowed on request: the disk works, snapshots and merges included.
  OPT=(--allow-outside-files)
  expect_ok "$PLOOP" "${OPT[@]}" io -r "esc-$how/DiskDescriptor.xml" "read -P 0x13 65536 65536"
  expect_ok "$PLOOP" "${OPT[@]}" export -u "$GOOD_BASE" "esc-$how/DiskDescriptor.xml" esc.exp
  qemu_same esc.exp "good.ref/$GOOD_BASE.raw" raw
  rm esc.exp
  expect_ok "$PLOOP" "${OPT[@]}" snapshot "esc-$how/DiskDescriptor.xml"
  expect_ok "$PLOOP" "${OPT[@]}" io "esc-$how/DiskDescriptor.xml" "write -P 0x14 0 512"
  expect_ok "$PLOOP" "${OPT[@]}" snapshot-merge -A "esc-$how/DiskDescriptor.xml"
  expect_ok "$PLOOP" "${OPT[@]}" check "esc-$how/DiskDescriptor.xml"
  out_has "no problems found"
  expect_ok "$PLOOP" "${OPT[@]}" export "esc-$how/DiskDescriptor.xml" esc.exp
  expect_ok qemu-io -f raw -c "write -P 0x14 0 512" "esc-$how.ref/top.raw"
  qemu_same esc.exp "esc-$how.ref/top.raw" raw
  rm esc.exp
done
# The outside file took the merge: it is the base, and now the whole disk.
qemu_same outside/esc-abs.hds esc-abs.ref/top.raw

# --- restore-descriptor -----------------------------------------------------------
note "restore-descriptor: ploop images"
for kind in expanded preallocated; do
  d=rs-$kind
  disk_init "$d" 4M 64K -f "$kind"
  dio "$d" "write -P 0x21 1000 200000" "write -P 0x22 $((4 * MiB - 512)) 512"
  verify_disk "$d"
  pl info --json "$d"
  info_before=$OUT
  rm "$d/DiskDescriptor.xml"
  pl restore-descriptor "$d" "$d/root.hds"
  out_has "^Wrote $d/DiskDescriptor.xml$"
  verify_disk "$d"
  pl info --json "$d"
  assert_eq "$OUT" "$info_before" "info --json after restore-descriptor ($kind)"
  dio "$d" "write -P 0x23 0 512"
  verify_disk "$d"
done
grep -q "<Preallocated>1</Preallocated>" rs-preallocated/DiskDescriptor.xml ||
  fail "restored descriptor of a preallocated image lacks <Preallocated>"

note "restore-descriptor: a merged chain, a QEMU image"
disk_init rc 4M 64K
dio rc "write -P 0x31 0 65536"
dsnap rc
dio rc "write -P 0x32 32768 65536"
dmerge_all rc
rm rc/DiskDescriptor.xml
pl restore-descriptor rc rc/root.hds
verify_disk rc
mkdir rq rq.ref
expect_ok qemu-img create -q -f parallels -o cluster_size=256K rq/harddisk.hdd 6M
truncate -s 6M rq.ref/top.raw
for cmd in "write -P 0x41 100000 400000" "write -P 0x42 $((6 * MiB - 4096)) 4096"; do
  expect_ok qemu-io -f parallels -c "$cmd" rq/harddisk.hdd
  expect_ok qemu-io -f raw -c "$cmd" rq.ref/top.raw
done
pl restore-descriptor rq rq/harddisk.hdd
verify_disk rq
dsnap rq
dio rq "write -P 0x43 0 1000"
verify_disk rq

note "restore-descriptor: raw images"
for size_k in 3072 2144; do # 1M clusters; only 32K divides 2144K
  d=rr-$size_k
  disk_init "$d" "${size_k}K" 32K -f raw
  dio "$d" "write -P 0x51 1000 5000" "write -P 0x52 $((size_k * KiB - 100)) 100"
  rm "$d/DiskDescriptor.xml"
  pl restore-descriptor -f raw "$d" "$d/root.hds"
  grep -q "<Type>Plain</Type>" "$d/DiskDescriptor.xml" || fail "restored raw disk is not Plain"
  verify_disk "$d"
  dsnap "$d"
  dio "$d" "write -P 0x53 0 512"
  verify_disk "$d"
done
assert_eq "$(xml_value rr-3072/DiskDescriptor.xml Blocksize)" 2048 "cluster of a restored 3M raw disk"
assert_eq "$(xml_value rr-2144/DiskDescriptor.xml Blocksize)" 64 "cluster of a restored 2144K raw disk"

note "restore-descriptor: errors"
before=$(folder_stamps rs-expanded)
expect_error 4 "$PLOOP" restore-descriptor rs-expanded rs-expanded/root.hds
err_has "already exists"
mkdir re
expect_error 2 "$PLOOP" restore-descriptor re rs-expanded/root.hds
err_has "not in re"
expect_error 3 "$PLOOP" restore-descriptor re re/missing.hds
random_file re/junk.bin 65536 7
expect_error 5 "$PLOOP" restore-descriptor re re/junk.bin
truncate -s 1000 re/odd.raw
expect_error 2 "$PLOOP" restore-descriptor -f raw re re/odd.raw
err_has "multiple of 32K"
expect_error 2 "$PLOOP" restore-descriptor -f qcow2 re re/junk.bin
assert_absent re/DiskDescriptor.xml
assert_eq "$(folder_stamps rs-expanded)" "$before" "the disk after a refused restore"

echo PASS
