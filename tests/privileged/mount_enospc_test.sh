#!/usr/bin/env bash
# Privileged: the host file system under the image fills up.
#   - straight on the device: a write that needs a new cluster fails with
#     ENOSPC (not EIO, not a hang); what was written and flushed before
#     reads back; overwrites of existing data still work;
#   - through ext4: writing a file fails with ENOSPC at the writer;
#   - the image checks clean after umount;
#   - after space is freed on the host, the same writes succeed.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

host="$TMP/host"
mkdir -p "$host"
mount -t tmpfs -o size=48m tmpfs "$host"
d="$host/ct"
mkdir -p "$d"
pl init -s 256M -t none "$d/root.hds"
dd="$d/DiskDescriptor.xml"
# Ballast that is freed later to make room.
dd if=/dev/zero of="$host/ballast" bs=1M count=8 status=none

pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
fill "$TMP/first.bin" 16 1
dd if="$TMP/first.bin" of="$dev" bs=1M oflag=direct conv=fsync status=none

note "a write past the host's free space fails with ENOSPC"
fill "$TMP/big.bin" 64 2
run dd if="$TMP/big.bin" of="$dev" bs=1M seek=32 oflag=direct status=none
[[ $RC != 0 ]] || fail "writing 64 MiB into 48 MiB of host space succeeded"
grep -q "No space left on device" "$TMP/.err" || fail "dd failed without ENOSPC: $ERR"
alive "$pid" || fail "the daemon died on ENOSPC"
# Earlier data is intact; overwriting it in place still works.
head -c 16M "$dev" | cmp - "$TMP/first.bin" || fail "data written before ENOSPC is damaged"
fill "$TMP/over.bin" 4 3
dd if="$TMP/over.bin" of="$dev" bs=1M oflag=direct conv=fsync status=none
pl umount "$dev"
wait_gone "$dd" "$pid"
pl check "$dd"
out_has "no problems found"

note "after freeing host space the same write succeeds"
rm "$host/ballast"
df -k "$host" >/dev/null
pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
# 16 MiB more fits now (8 MiB of ballast plus what the failed write left
# unused); the part written before is whole.
dd if="$TMP/big.bin" of="$dev" bs=1M seek=32 count=12 oflag=direct conv=fsync status=none
head -c 4M "$dev" | cmp - "$TMP/over.bin" || fail "the overwritten data is wrong"
dd if="$dev" bs=1M skip=32 count=12 status=none | cmp - <(head -c 12M "$TMP/big.bin") ||
  fail "the data written after freeing space is wrong"
pl umount "$dev"
wait_gone "$dd" "$pid"
pl check "$dd"
out_has "no problems found"

note "through ext4: the writer gets ENOSPC; the disk works again afterwards"
d2="$host/fs"
m="$TMP/mnt"
mkdir -p "$d2" "$m"
rm -rf "$d"
pl init -s 256M "$d2/root.hds"
dd2="$d2/DiskDescriptor.xml"
dd if=/dev/zero of="$host/ballast" bs=1M count=8 status=none
pl mount -m "$m" "$dd2"
pid=$(daemon_of "$dd2")
echo "before" >"$m/small"
sync
run dd if="$TMP/big.bin" of="$m/big" bs=1M oflag=direct status=none
[[ $RC != 0 ]] || fail "writing 64 MiB through ext4 into 48 MiB of host space succeeded"
grep -Eq "No space left on device" "$TMP/.err" || fail "the writer got no ENOSPC: $ERR"
rm -f "$m/big"
assert_eq "$(cat "$m/small")" before "a file written before ENOSPC"
pl umount -m "$m"
wait_gone "$dd2" "$pid"
rm "$host/ballast"
pl check "$dd2"
out_has "no problems found"
pl mount -m "$m" "$dd2"
pid=$(daemon_of "$dd2")
fill "$m/after.bin" 8 4
sync
fill "$TMP/after.want" 8 4
assert_eq "$(sha "$m/after.bin")" "$(sha "$TMP/after.want")" "a file written after freeing space"
assert_eq "$(cat "$m/small")" before "the file written before ENOSPC"
pl umount -m "$m"
wait_gone "$dd2" "$pid"
pl export "$dd2" "$TMP/fs.raw"
e2fsck -fn "$TMP/fs.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck: $(cat "$TMP/fsck.log")"
echo PASS
