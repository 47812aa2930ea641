#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Snapshot operations interrupted like a crashed process, then repaired.
#
# PLOOP_FAULT=cut=N makes every file operation fail after N mutating ones
# (writes, syncs, truncates, ...); what was written stays in the real
# files, as when the process dies. Each operation is cut after every
# possible N (1, 2, ... until it runs through) on a fresh copy of a
# three-delta disk, and then:
#   - the cut run printed one line and exited 7 (I/O error);
#   - before any repair the disk still reads as the old or the new state
#     (for merges both are the same disk);
#   - `ploop check` reports a merge the descriptor still announces;
#   - `ploop check --repair` finishes an interrupted merge and removes
#     orphan delta files, and `ploop check` then finds nothing;
#   - the disk is in the old or the new state, never a mix: its snapshots
#     are one of the allowed sets, each exporting to its expected content,
#     the current disk too, every delta passes `qemu-img check`, and no
#     file is left in the folder that the descriptor does not name.
# Covered: snapshot-merge of the top (a zero cluster hiding older data
# included), -u of a middle delta, -A, snapshot create and switch,
# snapshot-delete with one child with a torn write at each cut; and a
# repair that is itself cut, again and again, before one finishes.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=disk_lib.sh
. "$here/disk_lib.sh"
need qemu-img qemu-io perl

KiB=1024
cb=$((64 * KiB))
MAX_CUTS=300 # far above any operation here; only stops a runaway loop

# The template: base B, middle snapshot S, top; the top overwrites data of
# both, adds new clusters, and hides older data with zeros (a discard over
# B's data, a discard over S's data).
disk_init t 1M 64K
dio t "write -P 0x01 0 $((4 * cb))" "write -P 0x02 $((8 * cb)) $cb"
dsnap t
B=$SNAP
dio t "write -P 0x03 $((2 * cb)) $((4 * cb))" "write -P 0x04 $((12 * cb)) $cb"
dsnap t
S=$SNAP
dio t "write -P 0x05 $((3 * cb)) $((2 * cb))" "discard $((8 * cb)) $cb" \
  "write -P 0x06 $((15 * cb)) $cb" "discard 0 $cb" "discard $((12 * cb)) $cb"
verify_disk t
NEW='{0a0b0c0d-1111-4222-8333-444455556666}'

# fresh: the work disk w (and its model) as a copy of the template.
fresh() {
  rm -rf w w.ref
  cp -a t w
  cp -a t.ref w.ref
}

# snapshot_set: the snapshots of w, sorted, on one line.
snapshot_set() {
  shots w | awk -v top="$TOP_GUID" '$1 != top { print $1 }' | LC_ALL=C sort | tr '\n' ' ' |
    sed 's/ $//'
}

# set_of GUID...: the same form, for the allowed sets.
set_of() { printf '%s\n' "$@" | sed '/^$/d' | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//'; }

# exports_as_one_of REF...: the current disk of w exports to one of REFs.
exports_as_one_of() {
  local ref
  rm -f w.exp
  pl export w/DiskDescriptor.xml w.exp
  for ref in "$@"; do
    if cmp -s w.exp "$ref"; then
      rm w.exp
      return 0
    fi
  done
  fail "the disk reads as none of: $*"
}

# settle KIND: after a cut and a repair, work out which state w is in,
# check that it is an allowed one, and bring the model w.ref to it.
#   merge SETS...   merges: the current disk is unchanged; the snapshots
#                   must be one of SETS ("a b|a|" style, '|' between sets)
#   snapshot        a snapshot $NEW may or may not exist
#   switch          the top may or may not have been rolled back to B
settle() {
  local kind=$1 got g
  got=$(snapshot_set)
  case $kind in
    merge)
      local sets=$2 ok=0 s
      IFS='|' read -r -a allowed <<<"$sets|"
      for s in "${allowed[@]}"; do [[ $got == "$s" ]] && ok=1; done
      ((ok)) || fail "after the repair the snapshots are '$got', allowed: '$sets'"
      for g in w.ref/*.raw; do
        g=${g#w.ref/}
        g=${g%.raw}
        [[ $g == top || " $got " == *" $g "* ]] || rm "w.ref/$g.raw"
      done
      ;;
    snapshot)
      if [[ $got == "$(set_of "$B" "$S" "$NEW")" ]]; then
        cp w.ref/top.raw "w.ref/$NEW.raw"
      else
        assert_eq "$got" "$(set_of "$B" "$S")" "snapshots after a cut snapshot create"
      fi
      ;;
    switch)
      assert_eq "$got" "$(set_of "$B" "$S")" "snapshots after a cut switch"
      if [[ $(file_of w "$TOP_GUID") != "$(file_of t "$TOP_GUID")" ]]; then
        cp "w.ref/$B.raw" w.ref/top.raw
      fi
      ;;
  esac
}

# crash_loop KIND ARG CMD...: cut `ploop CMD w` after N = 1, 2, ...
# mutating operations until it succeeds; check each cut as described at
# the top. FAULT_EXTRA is added to PLOOP_FAULT (",torn").
crash_loop() {
  local kind=$1 arg=$2 n
  shift 2
  for ((n = 1; n <= MAX_CUTS; n++)); do
    fresh
    expect_rc_any env "PLOOP_FAULT=cut=$n${FAULT_EXTRA:-}" "$PLOOP" "$@" w/DiskDescriptor.xml
    if ((RC == 0)); then
      # Ran through: the new state, nothing to repair.
      settle "$kind" "$arg"
      verify_disk w
      note "  $* cut after 1..$((n - 1)) mutating operations: all repaired"
      return 0
    fi
    [[ $RC == 7 ]] || { _show "$@" >&2; fail "cut=$n: exit $RC, expected 7 (I/O error)"; }
    [[ $(wc -l <"$TMP/.err") == 1 ]] || { _show "$@" >&2; fail "cut=$n: not one line on stderr"; }
    grep -q "cut): " "$TMP/.err" || fail "cut=$n: the failure is not the injected one: $ERR"
    # Readable before any repair.
    if [[ $kind == merge ]]; then
      exports_as_one_of w.ref/top.raw
    elif [[ $kind == switch ]]; then
      exports_as_one_of w.ref/top.raw "w.ref/$B.raw"
    fi
    # A merge the descriptor still announces is a problem check reports.
    if [[ -n $(shots w | awk '$4 == "true"') ]]; then
      expect_rc 1 "$PLOOP" check w/DiskDescriptor.xml
      out_has "was interrupted; run snapshot-merge or check --repair"
    fi
    pl check --repair w/DiskDescriptor.xml
    pl check w/DiskDescriptor.xml
    out_has "no problems found"
    settle "$kind" "$arg"
    drop_stale_tmp
    verify_disk w
  done
  fail "$* still fails after $MAX_CUTS cuts"
}

# drop_stale_tmp: a cut between writing DiskDescriptor.xml.tmp and renaming
# it leaves the .tmp behind (nothing reads it; the next save replaces it,
# and check does not report it). Accept that one file, and only when it
# is not what the descriptor says now, then remove it so verify_disk can
# check the rest of the folder.
drop_stale_tmp() {
  [[ -e w/DiskDescriptor.xml.tmp ]] || return 0
  cmp -s w/DiskDescriptor.xml.tmp w/DiskDescriptor.xml &&
    fail "DiskDescriptor.xml.tmp left behind with the current descriptor's content"
  rm w/DiskDescriptor.xml.tmp
  STALE_TMP=$((${STALE_TMP:-0} + 1))
}

# expect_rc_any CMD...: run CMD, any exit code (in $RC).
expect_rc_any() { run "$@"; }

note "snapshot-merge (the top into S)"
crash_loop merge "$(set_of "$B" "$S")|$(set_of "$B")" snapshot-merge
note "snapshot-merge -u S (into the base)"
crash_loop merge "$(set_of "$B" "$S")|$(set_of "$S")" snapshot-merge -u "$S"
note "snapshot-merge -A"
crash_loop merge "$(set_of "$B" "$S")|$(set_of "$S")|" snapshot-merge -A
note "snapshot create"
crash_loop snapshot "" snapshot -u "$NEW"
note "snapshot-switch -u B"
crash_loop switch "" snapshot-switch -u "$B"
note "snapshot-delete -u S (one child: merged) with a torn write at the cut"
FAULT_EXTRA=,torn crash_loop merge "$(set_of "$B" "$S")|$(set_of "$B")" snapshot-delete -u "$S"

note "a repair that is itself cut"
# Cut the merge in the middle of copying, then cut every repair after 1,
# 2, ... operations, in turn on the same disk, until one runs through.
fresh
expect_rc 7 env PLOOP_FAULT=cut=8 "$PLOOP" snapshot-merge -A w/DiskDescriptor.xml
repairs=0
for ((m = 1; m <= MAX_CUTS; m++)); do
  run env "PLOOP_FAULT=cut=$m" "$PLOOP" check --repair w/DiskDescriptor.xml
  ((RC == 0)) && break
  [[ $RC == 7 ]] || { _show check --repair >&2; fail "cut repair: exit $RC"; }
  repairs=$((repairs + 1))
  exports_as_one_of w.ref/top.raw
done
((repairs > 0)) || fail "no repair was cut; the loop tested nothing"
pl check w/DiskDescriptor.xml
out_has "no problems found"
settle merge "$(set_of "$B" "$S")|$(set_of "$S")|"
drop_stale_tmp
verify_disk w
note "cuts that left a stale DiskDescriptor.xml.tmp: ${STALE_TMP:-0}"

echo PASS
