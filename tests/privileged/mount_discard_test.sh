#!/usr/bin/env bash
# Privileged: discards through the mounted device reach the image.
#   - fstrim on the mounted ext4 gives the space of deleted files back to
#     the host (the image's allocated size, as `du` sees it, drops);
#   - in a delta above a snapshot a discarded range reads as zeros, never as
#     the older data of the snapshot below -- on the device right away, and
#     after remounting -- and the snapshot itself is unchanged;
#   - -o discard (online discard) works too.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"
need fstrim blkdiscard

du_kib() { du -k "$1" | cut -f1; }

note "fstrim returns the space of deleted files"
d="$TMP/ct"
m="$TMP/mnt"
mkdir -p "$d" "$m"
pl init -s 512M "$d/root.hds"
dd="$d/DiskDescriptor.xml"
pl mount -m "$m" "$dd"
fill "$m/a.bin" 96 1
fill "$m/b.bin" 16 2
sync
full=$(du_kib "$d/root.hds")
((full > 100 * 1024)) || fail "the image holds only $full KiB after writing 112 MiB"
rm "$m/a.bin"
sync
fstrim "$m"
sync  # the flush that makes the unmapping durable also punches the holes
after=$(du_kib "$d/root.hds")
((after < full - 80 * 1024)) || fail "fstrim gave back too little: $full KiB -> $after KiB"
assert_eq "$(sha "$m/b.bin")" "$(fill "$TMP/b.want" 16 2 && sha "$TMP/b.want")" "b.bin after fstrim"
pid=$(daemon_of "$dd")
pl umount -m "$m"
wait_gone "$dd" "$pid"
pl check "$dd"
out_has "no problems found"

note "a discard in the delta above a snapshot reads as zeros, not as the snapshot's data"
d2="$TMP/layered"
mkdir -p "$d2"
pl init -s 64M -t none "$d2/root.hds"
dd2="$d2/DiskDescriptor.xml"
pl mount "$dd2"
dev=$OUT
# 8 MiB of old data in what becomes the snapshot.
fill "$TMP/old.bin" 8 3
dd if="$TMP/old.bin" of="$dev" bs=1M oflag=direct status=none
pl umount "$dev"
pl snapshot "$dd2"
snap=$OUT
pl mount "$dd2"
dev=$OUT
pid=$(daemon_of "$dd2")
# Newer data over the first 4 MiB (copied up into the top), nothing new over
# the next 4 MiB.
fill "$TMP/new.bin" 4 4
dd if="$TMP/new.bin" of="$dev" bs=1M oflag=direct status=none
# Discard: 2 MiB the top holds, 2 MiB only the snapshot holds, and a partial
# cluster range (64 KiB) of each kind.
blkdiscard -o 0 -l 2M "$dev"
blkdiscard -o 6M -l 2M "$dev"
blkdiscard -o 3M -l 64K "$dev"
blkdiscard -o 5M -l 64K "$dev"
sync
expected() {
  python3 - "$TMP/old.bin" "$TMP/new.bin" "$TMP/expected.bin" <<'PY'
import sys
old = bytearray(open(sys.argv[1], "rb").read())
new = open(sys.argv[2], "rb").read()
disk = old[:]
disk[0:4 << 20] = new
M = 1 << 20
for off, n in ((0, 2 * M), (6 * M, 2 * M), (3 * M, 64 << 10), (5 * M, 64 << 10)):
    disk[off:off + n] = bytes(n)
open(sys.argv[3], "wb").write(disk)
PY
}
expected
head -c 8M "$dev" >"$TMP/got.bin"
cmp "$TMP/got.bin" "$TMP/expected.bin" || fail "the device does not read as expected after the discards"
pl umount "$dev"
wait_gone "$dd2" "$pid"
pl export "$dd2" "$TMP/exported.raw"
cmp -n $((8 << 20)) "$TMP/exported.raw" "$TMP/expected.bin" ||
  fail "the disk after remount differs (older data showing through?)"
pl export -u "$snap" "$dd2" "$TMP/snapshot.raw"
cmp -n $((8 << 20)) "$TMP/snapshot.raw" "$TMP/old.bin" || fail "the snapshot changed"
pl check "$dd2"
out_has "no problems found"
if command -v qemu-img >/dev/null; then
  top_file=$(awk -F'[<>]' '/<File>/ { f = $3 } END { print f }' "$dd2")
  qemu_clean "$d2/$top_file"
fi

note "-o discard: deleting a file gives its space back without fstrim"
pl mount -m "$m" -o discard "$dd"
pid=$(daemon_of "$dd")
fill "$m/c.bin" 64 5
sync
before=$(du_kib "$d/root.hds")
rm "$m/c.bin"
sync
sleep 0.1
sync
after=$(du_kib "$d/root.hds")
((after < before - 48 * 1024)) || fail "online discard gave back too little: $before KiB -> $after KiB"
pl umount -m "$m"
wait_gone "$dd" "$pid"
echo PASS
