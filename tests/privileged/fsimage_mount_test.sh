#!/usr/bin/env bash
# Privileged: the ext4 we build without root, mounted read-only by the
# kernel's own ext4 through a loop device, holds exactly the source tree.
# Source: every file type, owners, setuid/setgid/sticky, a 1 GiB sparse
# file, deep nesting, unicode names, hard links, xattrs, ns timestamps.
# Built once as is and once with --uid-shift/--gid-shift.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"

[ "$(id -u)" = 0 ] || skip "needs root (loop device and mount)"
need losetup
need mount
need python3
need e2fsck
[ -e /dev/loop-control ] || skip "no loop devices"

src="$TMP/src"
mkdir -p "$src"
python3 - "$src" <<'PY'
import os, sys, socket
root = sys.argv[1]
def p(*a): return os.path.join(root, *a)
os.makedirs(p("etc"), exist_ok=True)
with open(p("etc", "hostname"), "w") as f: f.write("mounted\n")
# Deep nesting and unicode names.
d = root
for i in range(40):
    d = os.path.join(d, "d%02d" % i)
os.makedirs(d)
with open(os.path.join(d, "bottom"), "w") as f: f.write("deep\n")
os.makedirs(p("ünïcödé", "日本語"))
with open(p("ünïcödé", "日本語", "файл.txt"), "w") as f: f.write("unicode\n")
# A 1 GiB sparse file with data at both ends and in the middle.
with open(p("sparse.img"), "wb") as f:
    f.write(b"head" * 1024)
    f.seek(512 << 20); f.write(b"middle" * 1000)
    f.seek((1 << 30) - 4096); f.write(b"t" * 4096)
# Random data, hard links, symlinks.
with open(p("random.bin"), "wb") as f: f.write(os.urandom(3 << 20))
os.link(p("random.bin"), p("etc", "random-link"))
os.symlink("../random.bin", p("etc", "rel-link"))
os.symlink("/" + "x" * 200, p("long-link"))
# Special files, owners, modes.
os.mkfifo(p("fifo"))
os.mknod(p("null"), 0o666 | 0o020000, os.makedev(1, 3))
os.mknod(p("blk"), 0o600 | 0o060000, os.makedev(259, 70000))
s = socket.socket(socket.AF_UNIX); s.bind(p("sock")); s.close()
with open(p("suid"), "w") as f: f.write("#!/bin/sh\n")
os.chmod(p("suid"), 0o4755)
os.makedirs(p("shared")); os.chmod(p("shared"), 0o2775)
os.makedirs(p("tmp")); os.chmod(p("tmp"), 0o1777)
os.chown(p("etc", "hostname"), 1000, 1001)
os.chown(p("tmp"), 0, 5)
os.lchown(p("etc", "rel-link"), 33, 33)
# xattrs, a file capability.
try:
    os.setxattr(p("etc", "hostname"), "user.comment", b"kept")
    os.setxattr(p("suid"), "security.capability",
                bytes.fromhex("0000000200100000000000000000000000000000"))
except OSError:
    pass
# Timestamps with nanoseconds.
os.utime(p("etc", "hostname"), ns=(1600000000123456789, 1700000000987654321))
os.utime(p("random.bin"), ns=(1500000000000000001, 1500000000000000002))
PY

compare() {  # compare SRC MOUNT UID_SHIFT GID_SHIFT
  python3 - "$@" <<'PY'
import os, sys, stat, hashlib
src, mnt, us, gs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bad = []
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""): h.update(chunk)
    return h.hexdigest()
links_src, links_mnt = {}, {}
count = 0
for dirpath, dirnames, filenames in os.walk(src):
    rel = os.path.relpath(dirpath, src)
    for name in dirnames + filenames:
        count += 1
        a = os.path.join(dirpath, name)
        b = os.path.join(mnt, rel, name) if rel != "." else os.path.join(mnt, name)
        sa, sb = os.lstat(a), os.lstat(b)
        what = os.path.join(rel, name)
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode): bad.append((what, "type"))
        if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode) and not stat.S_ISLNK(sa.st_mode):
            bad.append((what, "mode %o vs %o" % (sa.st_mode, sb.st_mode)))
        if sa.st_uid + us != sb.st_uid or sa.st_gid + gs != sb.st_gid:
            bad.append((what, "owner %d:%d vs %d:%d" % (sa.st_uid, sa.st_gid, sb.st_uid, sb.st_gid)))
        if not stat.S_ISDIR(sa.st_mode) and not stat.S_ISLNK(sa.st_mode) and sa.st_mtime_ns != sb.st_mtime_ns:
            bad.append((what, "mtime %d vs %d" % (sa.st_mtime_ns, sb.st_mtime_ns)))
        if stat.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size: bad.append((what, "size"))
            elif digest(a) != digest(b): bad.append((what, "content"))
            if sa.st_blocks * 2 < sb.st_blocks: bad.append((what, "holes filled: %d vs %d blocks" % (sa.st_blocks, sb.st_blocks)))
            if sa.st_nlink > 1:
                links_src.setdefault(sa.st_ino, []).append(what)
                links_mnt.setdefault(sb.st_ino, []).append(what)
        if stat.S_ISLNK(sa.st_mode) and os.readlink(a) != os.readlink(b): bad.append((what, "target"))
        if (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
            bad.append((what, "rdev"))
        if not stat.S_ISLNK(sa.st_mode):
            xa = {k: os.getxattr(a, k) for k in os.listxattr(a)}
            xb = {k: os.getxattr(b, k) for k in os.listxattr(b)}
            if xa != xb: bad.append((what, "xattrs %r vs %r" % (xa, xb)))
if sorted(map(sorted, links_src.values())) != sorted(map(sorted, links_mnt.values())):
    bad.append(("hard links", "groups differ"))
extra = sum(len(d) + len(f) for _, d, f in os.walk(mnt)) - count
if extra != 1:  # lost+found
    bad.append(("tree", "%d entries more in the mount than lost+found" % extra))
for b in bad: print("MISMATCH %s: %s" % b)
print("compared %d entries" % count)
sys.exit(1 if bad else 0)
PY
}

for shift in 0 100000; do
  note "init --from-dir with uid/gid shift $shift, mounted by the kernel"
  d="$TMP/disk$shift"
  mkdir "$d"
  pl init -s 2G --from-dir "$src" --uid-shift "$shift" --gid-shift "$shift" "$d/root.hds"
  pl export "$d/DiskDescriptor.xml" "$TMP/out$shift.raw"
  e2fsck -fn "$TMP/out$shift.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck -fn: $(cat "$TMP/fsck.log")"
  mnt="$TMP/mnt$shift"
  mkdir "$mnt"
  mount -t ext4 -o loop,ro "$TMP/out$shift.raw" "$mnt"
  rc=0
  compare "$src" "$mnt" "$shift" "$shift" || rc=$?
  umount "$mnt"
  [ "$rc" = 0 ] || fail "the mounted tree differs from the source (shift $shift)"
done
echo "PASS"
