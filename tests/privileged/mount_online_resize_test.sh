#!/usr/bin/env bash
# Privileged: `ploop resize` grows the image and the ext4 inside.
#   - mounted (online): the daemon grows the disk, the FUSE file and the
#     loop device's capacity, the descriptor records the size, and the
#     mounted ext4 grows in place (EXT4_IOC_RESIZE_FS): df shows it and the
#     new room takes data, without unmounting. That ioctl needs
#     CAP_SYS_RESOURCE; a root without it (some containers) gets exit 10
#     with a clear error, and the device has grown all the same;
#   - offline: ResizeDisk, then resize2fs on a device our daemon serves;
#     then run again after the refused online case;
#   - only the device mounted: the unmounted ext4 on it grows (resize2fs),
#     also when the ext4 is still only in the device's cache (read through
#     the device, not the image files);
#   - offline without root: the image grows, a note says the ext4 did not;
#     the same command as root then grows it;
#   - shrinking is refused (exit 2), online and offline, nothing changes;
#   - every step: files intact, e2fsck -fn clean.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"
need blockdev dumpe2fs resize2fs fallocate setpriv mkfs.ext4 truncate

d="$TMP/ct"
m="$TMP/mnt"
mkdir -p "$d" "$m"
pl init -s 256M "$d/root.hds"
dd="$d/DiskDescriptor.xml"
MiB=$((1 << 20))

# Whether this root may grow a mounted ext4 (CAP_SYS_RESOURCE, bit 24).
cap_resource=$(python3 -c '
for l in open("/proc/self/status"):
    if l.startswith("CapEff:"): print(int(l.split()[1], 16) >> 24 & 1)')
# The VM test (tests/vm/online_resize_vm_test.sh) requires the online branch.
if [[ ${PLOOP_REQUIRE_ONLINE_GROW:-} == 1 && $cap_resource != 1 ]]; then
  fail "PLOOP_REQUIRE_ONLINE_GROW=1 but this root lacks CAP_SYS_RESOURCE"
fi

dd_size() {  # the descriptor's disk size in bytes
  python3 -c '
import re, sys
print(int(re.search(r"<Disk_size>(\d+)</Disk_size>", open(sys.argv[1]).read()).group(1)) * 512)' "$dd"
}
fs_bytes() {  # fs_bytes DEVICE: the ext4's size (block count x block size)
  local n b
  read -r n b < <(dumpe2fs -h "$1" 2>/dev/null | awk -F: '
    /^Block count/ { n = $2 } /^Block size/ { b = $2 } END { print n, b }')
  echo $((n * b))
}
df_bytes() { df -B1 --output=size "$1" | tail -1 | tr -d ' '; }
fsck_device() {  # fsck_device: e2fsck -fn on a device-only mount
  local dev
  pl mount "$dd"
  dev=$OUT
  expect_rc 0 e2fsck -fn "$dev"
  pl umount "$dev"
}

pl mount -m "$m" "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
fill "$m/before.bin" 16 1
want=$(sha "$m/before.bin")
df0=$(df_bytes "$m")

note "online: grow a mounted disk to 1 GiB"
if [[ $cap_resource == 1 ]]; then
  pl resize -s 1G "$dd"
  df1=$(df_bytes "$m")
  ((df1 > df0 + 600 * MiB)) || fail "df shows $df1 bytes after the resize (was $df0)"
  # The new room takes data without unmounting.
  fallocate -l 500M "$m/big" || fail "the grown file system has no room for 500 MiB"
  rm "$m/big"
else
  note "no CAP_SYS_RESOURCE: the mounted ext4 cannot grow here; the device still must"
  expect_error 10 "$PLOOP" resize -s 1G "$dd"
  err_has "CAP_SYS_RESOURCE"
fi
assert_eq "$(blockdev --getsize64 "$dev")" $((1024 * MiB)) "device size"
assert_eq "$(dd_size)" $((1024 * MiB)) "descriptor size"
assert_eq "$(field_of "$dev" pid)" "$pid" "the same daemon serves the disk"
assert_eq "$(sha "$m/before.bin")" "$want" "data after the online resize"
expect_error 2 "$PLOOP" resize -s 512M "$dd"
assert_eq "$(blockdev --getsize64 "$dev")" $((1024 * MiB)) "device size after a refused shrink"
pl umount -m "$m"
wait_gone "$dd" "$pid"
fsck_device

if [[ $cap_resource != 1 ]]; then
  note "offline, the same size again: the ext4 catches up"
  pl resize -s 1G "$dd"
  pl mount "$dd"
  assert_eq "$(fs_bytes "$OUT")" $((1024 * MiB)) "ext4 size after the offline resize"
  pl umount "$OUT"
fi

note "offline: grow to 1536 MiB (resize2fs on a device the daemon serves)"
pl resize -s 1536M "$dd"
assert_eq "$(dd_size)" $((1536 * MiB)) "descriptor size"
[[ -z $(loops_of "$d") ]] || fail "the offline resize left a device: $(loops_of "$d")"
pl mount -m "$m" "$dd"
dev=$OUT
assert_eq "$(fs_bytes "$dev")" $((1536 * MiB)) "ext4 size after the offline resize"
assert_eq "$(sha "$m/before.bin")" "$want" "data after the offline resize"
pl umount -m "$m"
fsck_device
expect_error 2 "$PLOOP" resize -s 1G "$dd"
assert_eq "$(dd_size)" $((1536 * MiB)) "descriptor size after a refused shrink"

note "only the device mounted: its unmounted ext4 grows with it"
pl mount "$dd"
dev=$OUT
pl resize -s 2G "$dd"
assert_eq "$(blockdev --getsize64 "$dev")" $((2048 * MiB)) "device size"
assert_eq "$(fs_bytes "$dev")" $((2048 * MiB)) "ext4 size"
expect_rc 0 e2fsck -fn "$dev"
pl umount "$dev"

note "only the device mounted, its ext4 still in the device's cache: it grows all the same"
# The ext4 is written to the device and not synced: it is in the device's
# page cache, not yet in the image. The resize must look at the disk as the
# device shows it (as resize2fs then does), not at the image files.
d3="$TMP/cached"
mkdir -p "$d3"
pl init -s 256M -t none "$d3/root.hds"
truncate -s 64M "$TMP/small.ext4"
mkfs.ext4 -q -F "$TMP/small.ext4"
pl mount "$d3/DiskDescriptor.xml"
dev=$OUT
exec 9<"$dev"  # the last close of a device writes its cache back: not dd's
dd if="$TMP/small.ext4" of="$dev" bs=1M conv=sparse,notrunc status=none
pl resize -s 512M "$d3/DiskDescriptor.xml"
exec 9<&-
assert_eq "$(fs_bytes "$dev")" $((512 * MiB)) "ext4 size after resizing a disk with a cached ext4"
expect_rc 0 e2fsck -fn "$dev"
pl umount "$dev"

note "offline without root: only the image grows, with a note"
chmod o+x "$TMP"
chown -R 65534:65534 "$d"
expect_rc 0 setpriv --reuid=65534 --regid=65534 --clear-groups "$PLOOP" resize -s 2304M "$dd"
err_has "^ploop resize: note: .*ext4 .*stays 2048 MiB .*needs root"
assert_eq "$(dd_size)" $((2304 * MiB)) "descriptor size after the resize without root"
pl resize -s 2304M "$dd"
pl mount "$dd"
dev=$OUT
assert_eq "$(fs_bytes "$dev")" $((2304 * MiB)) "ext4 size after the same resize as root"
pl umount "$dev"

pl mount -r -m "$m" "$dd"
assert_eq "$(sha "$m/before.bin")" "$want" "data at the end"
pl umount -m "$m"
pl check "$dd"
