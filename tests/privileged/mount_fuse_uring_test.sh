#!/usr/bin/env bash
# Privileged: `ploop mount` (by default, or with --fuse-uring) serves the
# disk through FUSE over io_uring where the kernel has it, and data stays
# intact: fio writes with a
# crc32c checksum in every block and reads everything back, at queue depth
# 1 and 32, on the device (over a snapshot full of data, so writes copy
# clusters up) and through ext4; after a remount the data still verifies
# and the image checks clean. The daemon's status must say the requests
# went through the ring. On a kernel without FUSE over io_uring the same
# mount must fall back to the classic /dev/fuse workers, say so in the
# daemon's log and serve correctly (then the io_uring part is skipped:
# exit 77, or a pass under CI=true, which has exercised the fallback).
# Beside the ring only two classic workers run; without it
# (--no-fuse-uring, PLOOP_FUSE_URING=0), all 32. A
# queue whose ring entries the kernel refuses (injected) makes the mount
# fail at once with the reason in the log, and leaves nothing behind.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"
need fio

param=/sys/module/fuse/parameters/enable_uring
have_uring=false
[[ -e $param ]] && have_uring=true
# The daemon enables the kernel's switch when told to; put it back as it was.
if $have_uring; then
  param_before=$(<"$param")
  trap 'rc=$?; echo "$param_before" >"$param" 2>/dev/null || true; _mount_cleanup; (exit $rc); _cleanup' EXIT
fi

# daemon_log PID: what the daemon PID wrote to the shared log.
daemon_log() { grep -F "ploop[$1]" "$RUN_DIR/daemon.log" || true; }

d="$TMP/ct"
m="$TMP/mnt"
mkdir -p "$d" "$m"
pl init -s 512M -t none -b 256K "$d/root.hds"
dd="$d/DiskDescriptor.xml"

if ! $have_uring; then
  note "no FUSE over io_uring in this kernel: --fuse-uring falls back to /dev/fuse"
  pl mount --fuse-uring "$dd"
  dev=$OUT
  pid=$(daemon_of "$dd")
  assert_eq "$(status "$dev" fuse_transport)" dev_fuse "transport without kernel support"
  assert_eq "$(status "$dev" fuse_classic_workers)" 32 "classic workers without the ring"
  daemon_log "$pid" | grep -q "FUSE over io_uring: this kernel has none" ||
    fail "the daemon did not log the fallback: $(daemon_log "$pid")"
  fill "$TMP/data.bin" 32 3
  dd if="$TMP/data.bin" of="$dev" bs=1M oflag=direct status=none
  dd if="$dev" bs=1M count=32 iflag=direct status=none | cmp - "$TMP/data.bin" ||
    fail "data read back differs"
  fio_verify fallback-qd32 --filename="$dev" --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 \
    --size=16M --offset=64M --offset_increment=16M
  pl umount "$dev"
  wait_gone "$dd" "$pid"
  [[ ${CI:-} == true ]] && echo PASS && exit 0
  echo "SKIP: no FUSE over io_uring in this kernel ($param); checked the fallback only" >&2
  exit 77
fi

note "--no-fuse-uring: the classic /dev/fuse workers"
pl mount --no-fuse-uring "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(status "$dev" fuse_transport)" dev_fuse "transport with --no-fuse-uring"
assert_eq "$(status "$dev" fuse_classic_workers)" 32 "classic workers with --no-fuse-uring"
pl umount "$dev"
wait_gone "$dd" "$pid"
PLOOP_FUSE_URING=0 pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(status "$dev" fuse_transport)" dev_fuse "transport with PLOOP_FUSE_URING=0"
pl umount "$dev"
wait_gone "$dd" "$pid"

note "a queue left without ring entries (refusal injected): the mount fails at once"
# Once INIT agreed to the ring, the kernel holds every request until each
# queue has an entry: the daemon must end the connection, not hang.
said() { grep -c "queue 0 has no ring entry left" "$RUN_DIR/daemon.log" || true; }
said_before=$(said)
run env PLOOP_FAULT_FUSE_RING_REFUSE=0 timeout 60 "$PLOOP" mount --fuse-uring "$dd"
((RC != 124)) || fail "the mount hung with queue 0's entries refused (killed after 60 s)"
assert_eq "$RC" 7 "exit code of a mount whose ring queue has no entry"
err_has "not connected"
(($(said) > said_before)) || fail "the daemon's log does not say why the mount failed"
[[ -z $(mounts_of_tmp) && -z $(loops_of "$d") ]] ||
  fail "left after the failed mount: $(mounts_of_tmp) $(loops_of "$d")"
grep -qF "ploop:$(realpath "$dd") " /proc/self/mounts &&
  fail "the aborted FUSE mount was left in place: $(grep -F "ploop:$(realpath "$dd") " /proc/self/mounts)"
pl check "$dd"
out_has "no problems found"

note "a snapshot full of data below the top (served through io_uring)"
pl mount --fuse-uring "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(status "$dev" fuse_transport)" io_uring "transport with --fuse-uring"
# Beside the ring only a couple of classic workers (INIT, forgets), not the
# full set of 32 with a 1 MiB buffer each.
assert_eq "$(status "$dev" fuse_classic_workers)" 2 "classic workers beside the ring"
assert_eq "$(<"$param")" Y "the kernel's switch after --fuse-uring"
fill "$TMP/base.bin" 160 1
dd if="$TMP/base.bin" of="$dev" bs=1M oflag=direct status=none
dd if="$dev" bs=1M count=160 iflag=direct status=none | cmp - "$TMP/base.bin" ||
  fail "data read back through the ring differs"
pl umount "$dev"
wait_gone "$dd" "$pid"
pl snapshot "$dd"

PLOOP_FUSE_URING=1 pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(status "$dev" fuse_transport)" io_uring "transport with PLOOP_FUSE_URING=1"
assert_eq "$(cat "/sys/block/${dev#/dev/}/loop/dio")" 1 "direct I/O of $dev"
before=$(status "$dev" fuse_ring_requests)
async_before=$(status "$dev" fuse_ring_async_requests)

fio_device_workload "$dev" "$TMP/base.bin"
after=$(status "$dev" fuse_ring_requests)
((after - before >= 32768)) ||
  fail "only $((after - before)) requests came through the ring during fio"
# Most of them (reads, writes into clusters the top holds) with
# asynchronous image I/O; copy-ups and flushes the synchronous way.
async=$(($(status "$dev" fuse_ring_async_requests) - async_before))
((async >= (after - before) / 2)) ||
  fail "only $async of $((after - before)) ring requests were served with asynchronous I/O"
pl umount "$dev"
wait_gone "$dd" "$pid"
pl check "$dd"
out_has "no problems found"

note "remounted without an option (the ring is the default): what fio wrote at QD32 still verifies"
pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
assert_eq "$(status "$dev" fuse_transport)" io_uring "transport by default"
fio_reverify "$dev"
pl umount "$dev"
wait_gone "$dd" "$pid"

note "through ext4: QD1 and QD32"
d2="$TMP/fs"
mkdir -p "$d2"
pl init -s 512M "$d2/root.hds"
pl mount --fuse-uring -m "$m" "$d2/DiskDescriptor.xml"
pid=$(daemon_of "$d2/DiskDescriptor.xml")
dev=$(loops_of "$d2" | head -1)
assert_eq "$(status "$dev" fuse_transport)" io_uring "transport of the ext4 mount"
fio_ext4_workload "$m"
sha_before=$(find "$m" -type f -print0 | sort -z | xargs -0 cat | sha256sum)
pl umount -m "$m"
wait_gone "$d2/DiskDescriptor.xml" "$pid"
pl check "$d2/DiskDescriptor.xml"
out_has "no problems found"

note "through ext4, remounted: the files are the same"
pl mount --fuse-uring -m "$m" "$d2/DiskDescriptor.xml"
pid=$(daemon_of "$d2/DiskDescriptor.xml")
assert_eq "$(find "$m" -type f -print0 | sort -z | xargs -0 cat | sha256sum)" "$sha_before" \
  "files after remount"
pl umount -m "$m"
wait_gone "$d2/DiskDescriptor.xml" "$pid"
pl export "$d2/DiskDescriptor.xml" "$TMP/fs.raw"
e2fsck -fn "$TMP/fs.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck: $(cat "$TMP/fsck.log")"
echo PASS
