#!/usr/bin/env bash
# Privileged: mount.ploop, the mount(8) helper.
#   - `cmake --install` puts it into sbin (here: under a DESTDIR);
#   - `mount -t ploop [-o ro,noatime] DD.xml DIR` mounts the disk's ext4
#     (options reach the file system), `umount DIR` leaves no loop device and
#     no daemon behind, and the data is there on the next mount.
# mount(8) looks for helpers only in /sbin, so the test runs mount(8) in a
# private mount namespace where the installed sbin is bound over /sbin; the
# system's own /sbin is never touched.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"
need unshare cmake

build=$(cd "$(dirname "$PLOOP")/.." && pwd)
[[ -f $build/CMakeCache.txt ]] || fail "no build tree above $PLOOP"

note "cmake --install installs mount.ploop into sbin"
DESTDIR="$TMP/root" cmake --install "$build" >"$TMP/install.log" 2>&1 ||
  fail "cmake --install: $(cat "$TMP/install.log")"
helper=$(find "$TMP/root" -path '*sbin/mount.ploop' | head -1)
[[ -n $helper && -x $helper ]] || fail "no executable sbin/mount.ploop installed: $(find "$TMP/root" -type f)"
mkdir -p "$TMP/sbin"
cp "$helper" "$TMP/sbin/mount.ploop"

d="$TMP/ct"
m="$TMP/mnt"
mkdir -p "$d" "$m"
pl init -s 256M "$d/root.hds"
dd="$d/DiskDescriptor.xml"

# in_ns SCRIPT: runs SCRIPT with bash in a private mount namespace whose
# /sbin is our installed sbin. The daemon mount.ploop starts stays in that
# namespace; so do the mounts.
in_ns() {
  PLOOP_BIN=$PLOOP unshare -m --propagation private bash -euc \
    "mount --bind '$TMP/sbin' /sbin; $1"
}

note "mount -t ploop -o noatime, write, umount"
in_ns "
  mount -t ploop -o noatime '$dd' '$m'
  grep -E ' $m ext4 [^ ]*noatime' /proc/self/mounts >/dev/null || { echo 'noatime missing' >&2; exit 1; }
  echo 'written through mount.ploop' >'$m/hello'
  dd if=/dev/urandom of='$m/data' bs=1M count=8 status=none
  sha256sum '$m/data' | cut -d' ' -f1 >'$TMP/data.sha'
  umount '$m'
" || fail "mount -t ploop / umount failed"
# umount DIR released the device (autoclear), which stopped the daemon.
wait_gone "$dd"
[[ -z $(mounts_of_tmp) ]] || fail "a mount record is left after umount: $(mounts_of_tmp)"
pl check "$dd"
out_has "no problems found"

note "mount -t ploop -o ro: the data is there, writes are refused"
in_ns "
  mount -t ploop -o ro '$dd' '$m'
  [ \"\$(cat '$m/hello')\" = 'written through mount.ploop' ] || { echo 'hello differs' >&2; exit 1; }
  [ \"\$(sha256sum '$m/data' | cut -d' ' -f1)\" = \"\$(cat '$TMP/data.sha')\" ] || { echo 'data differs' >&2; exit 1; }
  if touch '$m/new' 2>/dev/null; then echo 'a read-only mount took a write' >&2; exit 1; fi
  umount '$m'
" || fail "read-only mount -t ploop failed"
wait_gone "$dd"

note "a mount failure leaves nothing behind"
in_ns "! mount -t ploop '$d/missing.xml' '$m' 2>/dev/null" || fail "mounting a missing disk succeeded"
in_ns "! mount -t ploop -o fstype=xfs '$dd' '$m' 2>/dev/null" || fail "mounting ext4 as xfs succeeded"
wait_gone "$dd"
[[ -z $(mounts_of_tmp) ]] || fail "a failed mount left a record: $(mounts_of_tmp)"
echo PASS
