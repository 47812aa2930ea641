# shellcheck shell=bash
# Helpers for the privileged tests of `ploop mount` (loop devices, FUSE, the
# daemon). Source after tests/interop/lib.sh:
#
#   . "$TESTS_DIR/interop/lib.sh"
#   . "$TESTS_DIR/privileged/mount_lib.sh"
#
# Without root, loop devices or FUSE the test exits 77 (skipped); under
# CI=true it fails instead. Whatever happens, on exit every file system
# mounted under $TMP is unmounted, every disk of $TMP is `ploop umount`ed,
# every loop device on a file of $TMP detached and every daemon serving a
# disk of $TMP killed, before lib.sh removes $TMP.
# shellcheck disable=SC2154  # TMP, OUT, RC come from lib.sh

[[ $(id -u) == 0 ]] || skip "needs root (loop devices, FUSE, mount)"
[[ -e /dev/loop-control ]] || skip "no loop devices"
[[ -e /dev/fuse ]] || skip "no /dev/fuse"
need losetup mount umount python3 e2fsck

# The daemons' run dir: the real one (other tests' disks live there too;
# everything below only touches disks under $TMP).
RUN_DIR=${PLOOP_RUN_DIR:-/run/ploop}

# mounts_of_tmp: "DEVICE<tab>PID<tab>DESCRIPTOR<tab>STATE" of every mount
# record of a disk in $TMP (tabs: a descriptor's path may hold spaces).
mounts_of_tmp() {
  "$PLOOP" list --json 2>/dev/null | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m["descriptor"].startswith(sys.argv[1] + "/"):
        print(m["device"], m["pid"], m["descriptor"], m["state"], sep="\t")' "$TMP"
}

_mount_cleanup() {
  set +e
  local mp dev pid dd state f
  # Our disks first: ploop umount also unmounts their file systems. By
  # descriptor, not by device: tests run in parallel, and a device our disk
  # has just left may already serve another test's disk.
  while IFS=$'\t' read -r dev pid dd state; do
    [[ -n $dev ]] || continue
    "$PLOOP" umount "$dd" >/dev/null 2>&1 || {
      [[ $pid != 0 && $(field_of "$dev" pid 2>/dev/null) == "$pid" ]] &&
        kill -KILL "$pid" 2>/dev/null
      "$PLOOP" umount "$dd" >/dev/null 2>&1
    }
  done < <(mounts_of_tmp)
  # Anything else mounted under $TMP, deepest first, lazily (the mount
  # table writes a space in a path as \040).
  while IFS= read -r mp; do
    umount -l "$(printf '%b' "$mp")" 2>/dev/null
  done < <(awk -v t="$TMP/" 'index($2, t) == 1 { print $2 }' /proc/self/mounts | sort -r)
  # Loop devices on files of $TMP (direct ones, any a test made).
  for f in /sys/block/loop*/loop/backing_file; do
    [[ -r $f ]] || continue
    if [[ $(<"$f") == "$TMP/"* ]]; then
      dev=/dev/$(basename "$(dirname "$(dirname "$f")")")
      losetup -d "$dev" 2>/dev/null
    fi
  done
}
trap 'rc=$?; _mount_cleanup; (exit $rc); _cleanup' EXIT

# daemon_of DD: the pid of the daemon serving DD ("" when none).
daemon_of() {
  "$PLOOP" list --json | python3 -c '
import json, os, sys
dd = os.path.realpath(sys.argv[1])
for m in json.load(sys.stdin):
    if m["descriptor"] == dd and m["kind"] == "fuse": print(m["pid"])' "$1"
}

# field_of DEVICE KEY: a field of `ploop list --json` for DEVICE.
field_of() {
  "$PLOOP" list --json | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m["device"] == sys.argv[1]: print(m[sys.argv[2]])' "$1" "$2"
}

# status DEVICE KEY: a field of the daemon's status (its control socket).
status() {
  python3 - "$(field_of "$1" socket)" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"cmd": "status"}\n')
reply = b""
while not reply.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    reply += chunk
print(json.loads(reply)[sys.argv[2]])
PY
}

# ploop_images DEVICE: how many layers the mount of DEVICE serves.
ploop_images() {
  "$PLOOP" list --json | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m["device"] == sys.argv[1]: print(len(m["images"]))' "$1"
}

# alive PID: the process exists and is not a zombie.
alive() {
  [[ -n $1 && -r /proc/$1/stat ]] || return 1
  [[ $(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# loops_of DIR: loop devices whose backing file is in DIR, and devices
# mount records say serve a disk of DIR.
loops_of() {
  local f dir=$1 b
  for f in /sys/block/loop*/loop/backing_file; do
    [[ -r $f ]] || continue
    b=$(<"$f")
    [[ $b == "$dir/"* ]] && echo "/dev/$(basename "$(dirname "$(dirname "$f")")")"
  done
  mounts_of_tmp | awk -F '\t' -v d="$dir/" 'index($3, d) == 1 { print $1 }'
}

# wait_gone DD [PID]: wait until DD has no mount record and no loop device,
# and its daemon PID has exited (the kernel releases a loop device
# asynchronously after `umount`, and the daemon then closes the image). The
# 60 s bound only keeps a hung test from hanging ctest.
wait_gone() {
  local dir i
  dir=$(dirname "$(realpath "$1")")
  for ((i = 0; i < 6000; i++)); do
    if [[ -z $(loops_of "$dir") ]] && ! alive "${2:-}"; then return 0; fi
    sleep 0.01
  done
  fail "$1: device or daemon left 60 s after unmounting: $(loops_of "$dir") pid ${2:-}"
}

# sha FILE: content hash.
sha() { sha256sum "$1" | cut -d' ' -f1; }

# fill FILE MIB SEED: a file of pseudo-random data (deterministic per SEED).
fill() {
  python3 -c '
import random, sys
r = random.Random(int(sys.argv[3]))
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(r.randbytes(1 << 20))' "$1" "$2" "$3"
}

# fio_verify NAME ARGS...: fio with a crc32c checksum in every block, read
# back and verified; fails the test on any fio error.
fio_verify() {
  local name=$1
  shift
  run fio --name="$name" --direct=1 --ioengine=libaio --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --output-format=terse "$@"
  [[ $RC == 0 ]] || fail "fio $name failed ($RC): $(tail -c 2000 "$TMP/.err") $(tail -c 500 "$TMP/.out")"
  # Terse lines ("3;fio-...;"): field 5 is the job's error code.
  [[ $(grep '^3;' <<<"$OUT" | cut -d';' -f5 | sort -u) == 0 ]] ||
    fail "fio $name reported an error: $(grep -v '^3;' <<<"$OUT")"
}

# An fsync writer for the online tests. start_writer LOG starts it in the
# background ($writer is its pid): record i is "record NNNNNNNN " padded to
# 64 bytes; after its fsync returns, i is written to $TMP/acked (atomically,
# by rename). stop_writer stops it (and whatever else watches $TMP/stop) and
# sets $final to the last acknowledged record.
start_writer() {
  cat >"$TMP/writer.py" <<'PY'
import os, sys
log, acked, stop = sys.argv[1:4]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while not os.path.exists(stop):
    i += 1
    os.write(fd, ("record %08d " % i).ljust(63, "x").encode() + b"\n")
    os.fsync(fd)
    with open(acked + ".tmp", "w") as f:
        f.write(str(i))
    os.rename(acked + ".tmp", acked)
PY
  rm -f "$TMP/stop"
  python3 "$TMP/writer.py" "$1" "$TMP/acked" "$TMP/stop" &
  writer=$!
}
acked() { cat "$TMP/acked" 2>/dev/null || echo 0; }
wait_acked() { # wait_acked N: until at least N records are acknowledged
  local i
  for ((i = 0; i < 6000; i++)); do
    (($(acked) >= $1)) && return 0
    alive "$writer" || fail "the writer died"
    sleep 0.01
  done
  fail "the writer made no progress (acked $(acked), want $1)"
}
stop_writer() {
  touch "$TMP/stop"
  wait "$writer" || fail "the writer failed"
  final=$(acked)
}
# check_records FILE: records 1..N in order, well-formed; prints N.
check_records() {
  python3 - "$1" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
lines = data.split(b"\n")
if lines and lines[-1] == b"":
    lines.pop()
for n, line in enumerate(lines, 1):
    want = ("record %08d " % n).ljust(63, "x").encode()
    if line != want:
        sys.exit("line %d is %r" % (n, line[:80]))
print(len(lines))
PY
}

# The fio workloads of the data-path tests (mount_fio_test.sh, and the same
# through FUSE over io_uring). fio_device_workload DEV BASE: on the device,
# whose first 160 MiB hold BASE (a snapshot's data): QD32 4 KiB random
# writes, QD1 mixed sizes, QD32 mixed reads and writes, each verified; the
# data outside fio's regions must be untouched.
fio_device_workload() {
  local dev=$1 base=$2
  note "on the device: QD32, four jobs, 4 KiB random writes over the snapshot's data"
  fio_verify qd32 --filename="$dev" --rw=randwrite --bs=4k --iodepth=32 --numjobs=4 \
    --size=32M --offset_increment=32M
  note "on the device: QD1, mixed sizes 4K-1M"
  fio_verify qd1 --filename="$dev" --rw=randwrite --bsrange=4k-1m --bs_unaligned=0 --iodepth=1 \
    --size=64M --offset=256M
  note "on the device: QD32 mixed reads and writes, 64K"
  fio_verify rw32 --filename="$dev" --rw=randrw --bs=64k --iodepth=32 --numjobs=2 --size=48M \
    --offset=384M --offset_increment=48M
  dd if="$dev" bs=1M skip=128 count=32 status=none |
    cmp - <(dd if="$base" bs=1M skip=128 count=32 status=none) ||
    fail "data outside fio's regions changed"
}
# fio_reverify DEV: what fio_device_workload wrote at QD32 still verifies.
fio_reverify() {
  run fio --name=qd32 --direct=1 --ioengine=libaio --verify=crc32c --verify_fatal=1 \
    --verify_only --filename="$1" --rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --size=32M \
    --offset_increment=32M --output-format=terse
  [[ $RC == 0 ]] || fail "verify after remount failed: $(tail -c 2000 "$TMP/.err")"
}
# fio_ext4_workload DIR: through the mounted ext4: QD32, QD1, sequential.
fio_ext4_workload() {
  fio_verify ext4-qd32 --directory="$1" --rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --size=24M
  fio_verify ext4-qd1 --directory="$1" --rw=randwrite --bsrange=4k-256k --iodepth=1 --size=48M
  fio_verify ext4-seq --directory="$1" --rw=write --bs=1M --iodepth=8 --size=64M
}
