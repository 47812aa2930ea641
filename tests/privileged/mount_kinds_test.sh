#!/usr/bin/env bash
# Privileged: each image kind mounted as a block device. Expanded disks are
# served by the daemon (FUSE + a direct-I/O loop device); raw and
# preallocated ones go straight onto a loop device. For each: mount with -m,
# write files, umount, remount, the files read back; `ploop list` shows the
# mount; `ploop umount` of the device, of the descriptor (also by a path
# under /dev, as for a disk on /dev/shm) and of the mountpoint all work; a
# plain `umount DIR` leaves no device or daemon; the image checks clean
# afterwards (and qemu-img agrees, when installed). A disk in use is named
# by its device in errors, also in a folder with a space in its name.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

for kind in expanded preallocated raw; do
  note "$kind: mount -m, write, umount, remount, verify"
  d="$TMP/$kind"
  m="$TMP/$kind.mnt"
  mkdir -p "$d" "$m"
  pl init -s 256M -f "$kind" "$d/root.hds"
  dd="$d/DiskDescriptor.xml"
  pl mount -m "$m" "$dd"
  dev=$OUT
  [[ $dev == /dev/loop* ]] || fail "mount printed '$dev', not a loop device"
  [[ $(field_of "$dev" mountpoints) == *"$m"* ]] || fail "list does not show $m for $dev"
  assert_eq "$(field_of "$dev" state)" active "state of $dev"
  assert_eq "$(field_of "$dev" direct_io)" True "loop direct I/O of $dev"
  if [[ $kind == expanded ]]; then
    assert_eq "$(field_of "$dev" kind)" fuse "how $kind is served"
    pid=$(field_of "$dev" pid)
    alive "$pid" || fail "no daemon (pid $pid) for $dev"
  else
    assert_eq "$(field_of "$dev" kind)" direct "how $kind is served"
    pid=""
    [[ $(losetup -nO BACK-FILE "$dev") == "$(realpath "$d/root.hds")"* ]] ||
      fail "$dev is not on the image itself"
  fi
  fill "$TMP/big.bin" 24 7
  cp "$TMP/big.bin" "$m/big.bin"
  mkdir -p "$m/dir/sub"
  for i in $(seq 1 50); do echo "file $i of $kind" >"$m/dir/sub/f$i"; done
  want=$(sha "$TMP/big.bin")

  # A plain umount releases everything (autoclear device, daemon exits).
  umount "$m"
  wait_gone "$dd" "$pid"
  pl check "$dd"
  out_has "no problems found"

  pl mount -m "$m" "$dd"
  dev=$OUT
  pid=$(daemon_of "$dd")
  assert_eq "$(sha "$m/big.bin")" "$want" "big.bin after remount"
  assert_eq "$(cat "$m/dir/sub/f37")" "file 37 of $kind" "f37 after remount"
  # Exclusive use, however the disk is served.
  expect_error 9 "$PLOOP" io "$dd" 'read 0 4096'
  err_has "in use by $dev \(mounted at $m\)"
  expect_error 9 "$PLOOP" mount "$dd"
  err_has "in use by $dev"
  pl umount -m "$m"
  wait_gone "$dd" "$pid"
  mountpoint -q "$m" && fail "$m is still mounted after ploop umount -m"

  note "$kind: device only, umount by device and by descriptor"
  pl mount "$dd"
  dev=$OUT
  [[ -b $dev ]] || fail "$dev is not a block device"
  pid=$(daemon_of "$dd")
  pl umount "$dev"
  wait_gone "$dd" "$pid"
  pl mount -r "$dd"
  dev=$OUT
  assert_eq "$(cat "/sys/block/${dev#/dev/}/ro")" 1 "read-only flag of $dev"
  expect_rc 1 dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct status=none
  pid=$(daemon_of "$dd")
  pl umount "$dd"
  wait_gone "$dd" "$pid"

  # The file system itself is sound.
  pl export "$dd" "$TMP/$kind.raw"
  e2fsck -fn "$TMP/$kind.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck: $(cat "$TMP/fsck.log")"
  rm -f "$TMP/$kind.raw"
  if [[ $kind != raw ]] && command -v qemu-img >/dev/null; then qemu_clean "$d/root.hds"; fi
done

note "the daemon's control socket: status, stop"
d="$TMP/expanded"
dd="$d/DiskDescriptor.xml"
pl mount "$dd"
dev=$OUT
pid=$(daemon_of "$dd")
socket=$(field_of "$dev" socket)
[[ -S $socket ]] || fail "no control socket at '$socket'"
assert_eq "$(stat -c %a "$socket")" 600 "mode of the control socket"
ask() { # ask JSON: one request, prints the reply
  python3 - "$socket" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
reply = b""
while not reply.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    reply += chunk
print(reply.decode().strip())
PY
}
dd if="$dev" of=/dev/null bs=64k count=4 iflag=direct status=none
reply=$(ask '{"cmd": "status"}')
python3 - "$reply" "$dev" <<'PY' || fail "status reply: $reply"
import json, sys
r = json.loads(sys.argv[1])
assert r["ok"] and r["protocol"] == 1 and r["device"] == sys.argv[2], r
assert r["direct_io"] is True and r["read_only"] is False and r["size_bytes"] == 256 << 20, r
assert r["counters"]["reads"] > 0 and r["rss_bytes"] > 0 and r["threads"] > 1, r
PY
reply=$(ask '{"cmd": "no-such-command"}')
[[ $reply == *'"ok":false'* && $reply == *NotSupported* ]] || fail "unknown command reply: $reply"
reply=$(ask '{"cmd": "stop"}')
[[ $reply == *'"ok":true'* ]] || fail "stop reply: $reply"
wait_gone "$dd" "$pid"
[[ $("$PLOOP" info "$dd") != *DIRTY* ]] || fail "stop left the image dirty"

note "SIGTERM: the daemon detaches the device and exits cleanly once it is released"
pl mount "$dd"
pid=$(daemon_of "$dd")
kill -TERM "$pid"
wait_gone "$dd" "$pid"
[[ $("$PLOOP" info "$dd") != *DIRTY* ]] || fail "SIGTERM left the image dirty"
m="$TMP/expanded.mnt"
pl mount -m "$m" "$dd"
pid=$(daemon_of "$dd")
kill -TERM "$pid"
# Mounted: the device stays (and keeps working) until the file system goes.
echo "after SIGTERM" >"$m/after"
sync
alive "$pid" || fail "the daemon quit while its file system was mounted"
umount "$m"
wait_gone "$dd" "$pid"
pl mount -r -m "$m" "$dd"
assert_eq "$(cat "$m/after")" "after SIGTERM" "a file written after SIGTERM"
pl umount -m "$m"

note "a descriptor named by a path under /dev is a descriptor, not a device"
# (Disks on /dev/shm; here a link there to a disk of ours.)
link=$(mktemp -u /dev/shm/ploop-kinds.XXXXXX)
trap 'rc=$?; rm -f "$link"; _mount_cleanup; (exit $rc); _cleanup' EXIT
ln -s "$TMP/expanded" "$link"
pl mount "$link/DiskDescriptor.xml"
pid=$(daemon_of "$TMP/expanded/DiskDescriptor.xml")
pl umount "$link/DiskDescriptor.xml"
wait_gone "$TMP/expanded/DiskDescriptor.xml" "$pid"
pl mount "$link/DiskDescriptor.xml"
pid=$(daemon_of "$TMP/expanded/DiskDescriptor.xml")
pl umount "$link"
wait_gone "$TMP/expanded/DiskDescriptor.xml" "$pid"
rm -f "$link"
expect_error 3 "$PLOOP" umount /dev/loop-no-such-device
err_has "no ploop disk is mounted on /dev/loop-no-such-device"

note "a disk in a folder whose name has a space: 'in use by' names the device"
sd="$TMP/with space"
sm="$TMP/with space.mnt"
mkdir -p "$sd" "$sm"
pl init -s 64M "$sd/root.hds"
pl mount -m "$sm" "$sd/DiskDescriptor.xml"
dev=$OUT
pid=$(daemon_of "$sd/DiskDescriptor.xml")
pl snapshot "$sd/DiskDescriptor.xml"
expect_error 9 "$PLOOP" io "$sd/DiskDescriptor.xml" 'read 0 4096'
err_has "in use by $dev \(mounted at $sm\)"
cd "$TMP"
expect_error 9 "$PLOOP" io "with space/DiskDescriptor.xml" 'read 0 4096'
cd - >/dev/null
err_has "in use by $dev \(mounted at $sm\)"
pl umount -m "$sm"
wait_gone "$sd/DiskDescriptor.xml" "$pid"

note "nothing of ours is left in ploop list"
[[ -z $(mounts_of_tmp) ]] || fail "mount records left: $(mounts_of_tmp)"
echo PASS
