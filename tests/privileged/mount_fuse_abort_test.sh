#!/usr/bin/env bash
# Privileged: the daemon's FUSE connection aborted under a mounted file
# system (fusectl's abort, as the daemon itself does when a FUSE over
# io_uring queue loses its entries; see mount_fuse_uring_test.sh). The
# device's I/O then fails, and the daemon exits, but it must not hide the
# device that still fails:
#   - the daemon's log says why, as an error;
#   - `ploop list` shows the device as dead, with its mountpoint;
#   - `ploop umount` cleans up: file system unmounted, loop device
#     detached, the dead FUSE mount and the daemon's folder removed;
#   - the next mount finds the data that was synced before the abort, and
#     the image checks clean.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

if ! grep -qw fusectl /proc/filesystems; then
  skip "no fusectl file system in this kernel (it aborts FUSE connections)"
fi

d="$TMP/ct"
m="$TMP/mnt"
ctl="$TMP/fusectl"
mkdir -p "$d" "$m" "$ctl"
pl init -s 256M "$d/root.hds"
dd="$d/DiskDescriptor.xml"
pl mount -m "$m" "$dd"
pid=$(daemon_of "$dd")
dev=$(loops_of "$d" | head -1)
[[ -n $pid && -n $dev ]] || fail "no daemon or device after the mount"
fill "$TMP/data.bin" 8 1
cp "$TMP/data.bin" "$m/data.bin"
sync -f "$m/data.bin"

note "the connection aborted (fusectl) under the mounted file system"
work="$RUN_DIR/daemons/$pid"
conn=$(stat -c %d "$work/disk")
mount -t fusectl none "$ctl"
echo 1 >"$ctl/$conn/abort"
umount "$ctl"
for ((i = 0; i < 1000; i++)); do
  alive "$pid" || break
  sleep 0.01
done
alive "$pid" && fail "the daemon still runs 10 s after its connection was aborted"
grep -F "ploop[$pid]" "$RUN_DIR/daemon.log" | grep -q "still uses the disk" ||
  fail "the daemon's log does not say that the device was left failing: $(grep -F "ploop[$pid]" "$RUN_DIR/daemon.log")"

note "ploop list shows the device as dead"
run "$PLOOP" list --json
assert_eq "$RC" 0 "exit code of ploop list"
state=$(python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m["device"] == sys.argv[1]: print(m["state"], " ".join(m["mountpoints"]))' "$dev" <<<"$OUT")
assert_eq "$state" "dead $(realpath "$m")" "state and mountpoint of $dev"

note "ploop umount cleans up"
pl umount "$dd"
[[ -z $(mounts_of_tmp) ]] || fail "a record is left: $(mounts_of_tmp)"
[[ -z $(loops_of "$d") ]] || fail "a device is left: $(loops_of "$d")"
mountpoint -q "$m" && fail "$m is still mounted"
grep -qF " $work/disk " /proc/self/mounts && fail "the dead FUSE mount is left"
assert_absent "$work"

note "remounted: the synced data is there, the image checks clean"
pl mount -m "$m" "$dd"
cmp "$m/data.bin" "$TMP/data.bin" || fail "data.bin differs after the abort"
pl umount "$dd"
pl check "$dd"
out_has "no problems found"
echo PASS
