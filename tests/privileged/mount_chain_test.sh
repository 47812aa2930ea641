#!/usr/bin/env bash
# Privileged: snapshot chains through the daemon.
#   - a 10-deep chain: ten rounds of mount, write a file, umount, snapshot;
#     the top then shows all ten files, each as written;
#   - a snapshot mounted read-only (-u GUID) beside the running top, for a
#     consistent read: writes to the top do not show in it, it shows exactly
#     the snapshot's files, and it takes only read locks (the top stays
#     writable);
#   - exclusivity: a second writable mount and offline commands (io,
#     snapshot-switch, compact) and a merge of layers a snapshot
#     mount reads fail with exit 9 naming the device.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

d="$TMP/ct"
m="$TMP/mnt"
s="$TMP/snap"
mkdir -p "$d" "$m" "$s"
pl init -s 512M "$d/root.hds"
dd="$d/DiskDescriptor.xml"

snaps=()
for i in $(seq 1 10); do
  pl mount -m "$m" "$dd"
  pid=$(daemon_of "$dd")
  fill "$m/layer$i.bin" 2 "$i"
  # Overwrite the same file in every layer: its newest version must win.
  echo "written in layer $i" >"$m/latest"
  pl umount -m "$m"
  wait_gone "$dd" "$pid"
  pl snapshot "$dd"
  snaps+=("$OUT")
done
pl snapshot-list --json "$dd"
assert_eq "$(grep -c '"guid"' <<<"$OUT")" 11 "deltas in the chain"

note "the top of the 10-deep chain shows every layer's file"
pl mount -m "$m" "$dd"
top_dev=$OUT
top_pid=$(daemon_of "$dd")
for i in $(seq 1 10); do
  fill "$TMP/want.bin" 2 "$i"
  assert_eq "$(sha "$m/layer$i.bin")" "$(sha "$TMP/want.bin")" "layer$i.bin"
done
assert_eq "$(cat "$m/latest")" "written in layer 10" "the newest version of 'latest'"

note "snapshot 5 mounted read-only beside the running top"
pl mount -u "${snaps[4]}" -m "$s" "$dd"
snap_dev=$OUT
[[ $snap_dev != "$top_dev" ]] || fail "the snapshot got the top's device"
assert_eq "$(field_of "$snap_dev" read_only)" True "snapshot mount read-only"
assert_eq "$(cat "$s/latest")" "written in layer 5" "'latest' in snapshot 5"
[[ -e $s/layer5.bin && ! -e $s/layer6.bin ]] || fail "snapshot 5 shows the wrong files: $(ls "$s")"
# The top keeps going; the snapshot does not change.
echo "after the snapshot mount" >"$m/latest"
fill "$m/new.bin" 4 99
sync
assert_eq "$(cat "$s/latest")" "written in layer 5" "'latest' in snapshot 5 after writing the top"
[[ ! -e $s/new.bin ]] || fail "a file written to the top shows in the snapshot"
expect_rc 1 touch "$s/x"

note "exclusive use: Busy, naming the device"
expect_error 9 "$PLOOP" mount "$dd"
err_has "in use by $top_dev"
expect_error 9 "$PLOOP" io "$dd" 'read 0 4096'
err_has "in use by $top_dev"
expect_error 9 "$PLOOP" snapshot-switch -u "${snaps[0]}" "$dd"
err_has "in use by $top_dev"
# compact takes every delta; the first one it meets is the base, which the
# snapshot mount reads too.
expect_error 9 "$PLOOP" compact "$dd"
err_has "in use by /dev/loop"
# (snapshot and resize of a mounted disk run online:
# mount_online_*_test.sh.) Merging the snapshot's layers needs them
# writable: the snapshot mount reads them.
expect_error 9 "$PLOOP" snapshot-merge -u "${snaps[2]}" "$dd"
err_has "in use by /dev/loop"
# Mounting the same snapshot again (read-only) is fine: readers share.
pl mount -u "${snaps[4]}" "$dd"
second=$OUT
pl umount "$second"

pl umount -m "$s"
pl umount -m "$m"
wait_gone "$dd" "$top_pid"
pl check "$dd"
out_has "no problems found"
pl mount -r -m "$m" "$dd"
assert_eq "$(cat "$m/latest")" "after the snapshot mount" "'latest' after remount"
pl umount "$dd"
echo PASS
