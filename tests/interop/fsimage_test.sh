#!/usr/bin/env bash
# ext4 inside ploop disks through the CLI, without root or a mount:
# init makes ext4 by default (e2fsck -fn clean, the features mke2fs uses),
# -t none leaves the disk empty, --from-dir copies a tree in (uid/gid
# shifted), ls/cat read it back (also from a snapshot with -u), fs-add
# writes to the top delta only, and bad input fails with one line.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need e2fsck dumpe2fs

fsck_clean() {
  pl export "$@" "$TMP/fsck.raw"
  expect_ok e2fsck -fn "$TMP/fsck.raw"
  rm -f "$TMP/fsck.raw"
}

note "init defaults to ext4 with mke2fs' ext4 features, label and inode count"
mkdir d
pl init -s 512M -L vol1 --inodes 5000 d/root.hds
out_has 'ext4 \(UUID [0-9a-f-]{36}, label vol1'
pl export d/DiskDescriptor.xml whole.raw
run dumpe2fs -h whole.raw
for f in has_journal extent 64bit flex_bg dir_index huge_file dir_nlink extra_isize \
         metadata_csum sparse_super; do
  out_has "features:.*\b$f\b"
done
out_has 'volume name: +vol1$'
expect_ok e2fsck -fn whole.raw
rm whole.raw

note "-t none leaves an empty disk; ls then says there is no file system"
mkdir e
pl init -s 64M -t none e/root.hds
expect_error 5 "$PLOOP" ls e/DiskDescriptor.xml
err_has 'no ext4 file system'
expect_error 2 "$PLOOP" init -s 64M -t xfs f/root.hds
expect_error 2 "$PLOOP" init -s 64M -t none -L x f/root.hds

note "--from-dir with --uid-shift; ls and cat read it back"
mkdir -p src/etc src/bin
printf 'hello\n' >src/etc/motd
ln -s ../etc/motd src/bin/link
chown 10:20 src/etc/motd 2>/dev/null || true
uid=$(stat -c %u src/etc/motd)
mkdir g
pl init -s 256M --from-dir src --uid-shift 100000 --gid-shift 200000 g/root.hds
fsck_clean g/DiskDescriptor.xml
pl ls g/DiskDescriptor.xml /etc
out_has "^-rw-r--r-- 1 $((uid + 100000)) [0-9]+ 6 .* motd$"
pl ls g /bin
out_has 'link -> \.\./etc/motd$'
pl cat g/DiskDescriptor.xml /etc/motd
assert_eq "$OUT" hello "cat /etc/motd"
expect_error 3 "$PLOOP" cat g/DiskDescriptor.xml /etc/nope
expect_error 2 "$PLOOP" cat g/DiskDescriptor.xml /etc

note "fs-add writes to the top; the snapshot still shows the old tree"
pl snapshot g/DiskDescriptor.xml
snap=$OUT
base_sum=$(md5sum <g/root.hds)
mkdir -p add/etc
printf 'changed\n' >add/etc/motd
printf 'new\n' >add/etc/new
pl fs-add g/DiskDescriptor.xml --from-dir add
assert_eq "$(md5sum <g/root.hds)" "$base_sum" "base delta after fs-add"
pl cat g /etc/motd
assert_eq "$OUT" changed "cat after fs-add"
pl cat -u "$snap" g/DiskDescriptor.xml /etc/motd
assert_eq "$OUT" hello "cat of the snapshot"
expect_error 3 "$PLOOP" cat -u "$snap" g/DiskDescriptor.xml /etc/new
fsck_clean g/DiskDescriptor.xml

note "a tree larger than the disk: needs N more bytes, nothing written"
mkdir big
head -c 40M /dev/urandom >big/blob
mkdir h
pl init -s 64M h/root.hds
before=$(md5sum <h/root.hds)
for i in 1 2; do cp big/blob "big/blob$i"; done
expect_error 8 "$PLOOP" fs-add h/DiskDescriptor.xml --from-dir big
err_has 'needs [0-9]+ more bytes'
assert_eq "$(md5sum <h/root.hds)" "$before" "image after a refused fs-add"
fsck_clean h/DiskDescriptor.xml

note "an id that overflows with the shift is refused"
expect_error 2 "$PLOOP" fs-add g/DiskDescriptor.xml --from-dir src --uid-shift 4294967295
err_has 'passes the largest id'
echo PASS
