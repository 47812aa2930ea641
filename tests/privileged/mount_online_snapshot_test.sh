#!/usr/bin/env bash
# Privileged: `ploop snapshot` of a mounted disk (online).
#   - a writer appends numbered records to a file on the mounted ext4, with
#     fsync after each, and logs (outside the disk) the last one fsync
#     acknowledged; it runs through three online snapshots;
#   - nothing is lost: every acknowledged record is on the running top;
#   - each snapshot holds exactly the state at its freeze: its records are a
#     prefix of the top's, it has every record acknowledged before the
#     snapshot command started and none written after the command returned
#     (but the one in flight), and it is a clean ext4 (`e2fsck -fn` on an
#     `export -u`, and mounted read-only with -u beside the top);
#   - the descriptor: the old top is the snapshot, a new top above it; the
#     daemon serves the new chain (ploop list), and the disk checks clean
#     and remounts with everything after the umount;
#   - the pause is printed (no timed assertion).
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

d="$TMP/ct"
m="$TMP/mnt"
s="$TMP/snap"
mkdir -p "$d" "$m" "$s"
pl init -s 512M "$d/root.hds"
dd="$d/DiskDescriptor.xml"
pl mount -m "$m" "$dd"
dev=$OUT
pid=$(daemon_of "$dd")


start_writer "$m/log"
wait_acked 100

snaps=() before=() after=()
for round in 1 2 3; do
  before+=("$(acked)")
  pl snapshot --json "$dd"
  snaps+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["guid"])' "$OUT")")
  after+=("$(acked)")
  note "online snapshot $round: $OUT"
  wait_acked $((${after[-1]} + 100))
done
stop_writer
sync

note "nothing acknowledged is lost on the running top"
n=$(check_records "$m/log") || fail "the top's log is damaged: $n"
((n >= final)) || fail "the top has $n records, $final were acknowledged"
assert_eq "$(field_of "$dev" pid)" "$pid" "the same daemon serves the disk"

pl snapshot-list --json "$dd"
assert_eq "$(grep -c '"guid"' <<<"$OUT")" 4 "deltas in the chain"
top_file=$(field_of "$dev" top)
[[ $top_file == "$d/root.hds."* ]] || fail "the daemon's top is $top_file"
grep -q "$(basename "$top_file")" "$dd" || fail "the descriptor does not name the served top"

for i in 0 1 2; do
  g=${snaps[$i]}
  note "snapshot $((i + 1)) $g: the state at its freeze"
  pl export -u "$g" "$dd" "$TMP/snap.raw"
  expect_rc 0 e2fsck -fn "$TMP/snap.raw"
  rm -f "$TMP/snap.raw"
  pl mount -r -u "$g" -m "$s" "$dd"
  k=$(check_records "$s/log") || fail "snapshot $g: damaged log: $k"
  ((k >= ${before[$i]})) || fail "snapshot $g has $k records; ${before[$i]} were acknowledged before it"
  ((k <= ${after[$i]} + 1)) || fail "snapshot $g has $k records; only ${after[$i]} were acknowledged when it returned"
  cmp -n $((k * 64)) "$s/log" "$m/log" || fail "snapshot $g is not a prefix of the top"
  pl umount -m "$s"
done

note "umount, check, remount: everything is there"
pl umount -m "$m"
wait_gone "$dd" "$pid"
pl check "$dd"
pl mount -r -m "$m" "$dd"
n2=$(check_records "$m/log") || fail "the log after remount: $n2"
assert_eq "$n2" "$n" "records after remount"
pl umount -m "$m"
