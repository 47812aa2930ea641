#!/usr/bin/env bash
# Tarballs into ext4 through the CLI: init --from-tar and fs-add --from-tar
# read .tar, .gz, .xz and .zst alike (ls/cat show the content, e2fsck -fn
# is clean), hostile members are skipped with one warning line each, and
# bad usage fails with one line.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need e2fsck tar python3

fsck_clean() {
  pl export "$@" "$TMP/fsck.raw"
  expect_ok e2fsck -fn "$TMP/fsck.raw"
  rm -f "$TMP/fsck.raw"
}

mkdir -p src/etc src/bin src/var/empty
printf 'hello\n' >src/etc/motd
ln -s ../etc/motd src/bin/link
ln src/etc/motd src/etc/motd.hard
truncate -s 20M src/sparse
printf 'tail' | dd of=src/sparse bs=1 seek=$((10 * 1024 * 1024)) conv=notrunc status=none
chmod 4755 src/bin
touch -d '2001-02-03 04:05:06.123456789' src/etc/motd

kinds=(tar)
command -v gzip >/dev/null && kinds+=(gz)
command -v xz >/dev/null && kinds+=(xz)
command -v zstd >/dev/null && kinds+=(zst)
for kind in "${kinds[@]}"; do
  note "init --from-tar with a .$kind tarball"
  case $kind in
    tar) flag=() ;;
    gz) flag=(-z) ;;
    xz) flag=(-J) ;;
    zst) flag=(--zstd) ;;
  esac
  tar --format=posix --sparse --numeric-owner "${flag[@]}" -C src -cf "t.$kind" .
  mkdir "d-$kind"
  pl init -s 128M --from-tar "t.$kind" --uid-shift 1000 "d-$kind/root.hds"
  out_has "files copied from t\.$kind"
  pl cat "d-$kind" /etc/motd
  assert_eq "$OUT" hello "cat /etc/motd from .$kind"
  pl ls "d-$kind" /etc
  out_has "^-rw-r--r-- 2 $(($(id -u) + 1000)) [0-9]+ 6 2001-02-03 04:05:06\.123456789 motd$"
  pl ls "d-$kind" /bin/link
  out_has 'link -> \.\./etc/motd$'
  pl ls "d-$kind" /
  out_has '^drwsr-xr-x .* bin$'
  out_has '^-rw-r--r-- 1 .* 20971520 .* sparse$'
  assert_eq "$("$PLOOP" cat "d-$kind" /sparse | tr -d '\0')" tail "data of the sparse file"
  fsck_clean "d-$kind/DiskDescriptor.xml"
done

note "fs-add --from-tar adds to the top delta; the snapshot keeps the old tree"
pl snapshot d-tar/DiskDescriptor.xml
snap=$OUT
mkdir -p add/etc
printf 'changed\n' >add/etc/motd
tar -C add -czf add.tgz .
pl fs-add d-tar --from-tar add.tgz --at /
pl cat d-tar /etc/motd
assert_eq "$OUT" changed "cat after fs-add --from-tar"
pl cat -u "$snap" d-tar/DiskDescriptor.xml /etc/motd
assert_eq "$OUT" hello "cat of the snapshot"
fsck_clean d-tar/DiskDescriptor.xml

note "hostile members are skipped with one warning line each"
python3 - evil.tar <<'PY'
import io, sys, tarfile
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b"", link=""):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.linkname = link
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    i.mode = 0o644
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
add("ok", data=b"fine\n")
add("/etc/passwd", data=b"root::0:0\n")
add("../../escape", data=b"x")
add("lnk", tarfile.SYMTYPE, link="/etc")
add("lnk/shadow", data=b"x")
add("hl", tarfile.LNKTYPE, link="/etc/shadow")
t.close()
PY
mkdir e
run "$PLOOP" init -s 64M --from-tar evil.tar e/root.hds
assert_eq "$RC" 0 "init with hostile members"
assert_eq "$(grep -c '^ploop init: warning: member .* (skipped)$' <<<"$ERR")" 4 "warning lines"
assert_eq "$(wc -l <<<"$ERR")" 4 "stderr lines"
pl cat e /ok
assert_eq "$OUT" fine "cat /ok"
expect_error 3 "$PLOOP" cat e /etc/passwd
pl ls e /lnk
out_has 'lnk -> /etc$'
fsck_clean e/DiskDescriptor.xml

note "bad usage: not a tarball, both sources, no source"
printf 'just text\n' >notatar
mkdir f
expect_error 2 "$PLOOP" init -s 64M --from-tar notatar f/root.hds
err_has 'not a tar archive'
assert_absent f/root.hds
assert_absent f/DiskDescriptor.xml
expect_error 3 "$PLOOP" init -s 64M --from-tar missing.tar f/root.hds
expect_error 2 "$PLOOP" init -s 64M --from-tar t.tar --from-dir src f/root.hds
expect_error 2 "$PLOOP" init -s 64M -t none --from-tar t.tar f/root.hds
expect_error 2 "$PLOOP" fs-add e/DiskDescriptor.xml
err_has 'one of --from-dir and --from-tar'
expect_error 2 "$PLOOP" fs-add e/DiskDescriptor.xml --from-dir src --from-tar t.tar
echo PASS
