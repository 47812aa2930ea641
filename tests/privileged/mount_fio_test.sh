#!/usr/bin/env bash
# Privileged: concurrent requests do not corrupt data. fio writes with a
# crc32c checksum in every block and reads everything back, at queue depth
# 1 and 32 (four jobs on their own regions), with mixed block sizes,
# straight on the device and through ext4, on a disk whose top delta sits
# over a snapshot full of data (so writes copy clusters up while others
# run). The loop device is in direct-I/O mode. Afterwards the image checks
# clean and, remounted, the data fio wrote still verifies. Small writes at
# depth 1 are flushed ahead of the fsync that follows each (the daemon's
# status counts them), and not when no fsync follows.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"
need fio

d="$TMP/ct"
m="$TMP/mnt"
mkdir -p "$d" "$m"
pl init -s 512M -t none -b 256K "$d/root.hds"
dd="$d/DiskDescriptor.xml"

note "a snapshot full of data below the top"
pl mount "$dd"
dev=$OUT
fill "$TMP/base.bin" 160 1
dd if="$TMP/base.bin" of="$dev" bs=1M oflag=direct status=none
pl umount "$dev"
pl snapshot "$dd"

pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(cat "/sys/block/${dev#/dev/}/loop/dio")" 1 "direct I/O of $dev"

fio_device_workload "$dev" "$TMP/base.bin"
pl umount "$dev"
wait_gone "$dd" "$pid"
pl check "$dd"
out_has "no problems found"

note "remounted: what fio wrote at QD32 still verifies"
pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
fio_reverify "$dev"

note "writes alone at depth 1 are flushed ahead only while an fsync follows each"
dd if=/dev/urandom of="$TMP/alone.bin" bs=4k count=600 status=none
ahead0=$(status "$dev" fuse_flushes_ahead)
# Direct writes and no flushes: none ahead (what came before may still
# allow the first few, until the score falls below the mark).
dd if="$TMP/alone.bin" of="$dev" bs=4k count=300 oflag=direct conv=notrunc status=none
ahead1=$(status "$dev" fuse_flushes_ahead)
((ahead1 - ahead0 <= 4)) ||
  fail "$((ahead1 - ahead0)) flushes ahead for 300 writes that no fsync followed"
# O_DSYNC: the loop device gets each write, then a flush.
dd if="$TMP/alone.bin" of="$dev" bs=4k skip=300 seek=300 count=300 oflag=direct,dsync \
  conv=notrunc status=none
ahead2=$(status "$dev" fuse_flushes_ahead)
((ahead2 - ahead1 >= 150)) ||
  fail "only $((ahead2 - ahead1)) flushes ahead for 300 writes each followed by a flush"
dd if="$dev" bs=4k count=600 iflag=direct status=none | cmp - "$TMP/alone.bin" ||
  fail "the writes around the flushes ahead read back different"
pl umount "$dev"
wait_gone "$dd" "$pid"

note "through ext4: QD1 and QD32"
d2="$TMP/fs"
mkdir -p "$d2"
pl init -s 512M "$d2/root.hds"
pl mount -m "$m" "$d2/DiskDescriptor.xml"
pid=$(daemon_of "$d2/DiskDescriptor.xml")
fio_ext4_workload "$m"
pl umount -m "$m"
wait_gone "$d2/DiskDescriptor.xml" "$pid"
pl check "$d2/DiskDescriptor.xml"
out_has "no problems found"
pl export "$d2/DiskDescriptor.xml" "$TMP/fs.raw"
e2fsck -fn "$TMP/fs.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck: $(cat "$TMP/fsck.log")"
echo PASS
