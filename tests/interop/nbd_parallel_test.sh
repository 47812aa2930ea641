#!/usr/bin/env bash
# Many requests in flight at once through `ploop serve` (the export serves
# them concurrently, through a ServedDisk):
#  - nbdcopy with 4 connections x 16 requests copies a raw file (random
#    data and holes) into a writable export of a disk whose snapshot holds
#    other data everywhere: partial and whole-cluster writes, copy-ups and
#    zeroes over the snapshot's data race on the same disk. The disk then
#    reads as the file, the snapshot's delta is unchanged, and ploop check
#    and qemu-img check find it clean (verify_disk);
#  - nbdcopy with 4 connections copies the export back out: identical;
#  - qemu-img convert -m 8 -W copies one export into another (a fresh
#    disk): qemu-img compare finds them identical, and the disk verifies.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img qemu-io nbdkit nbdcopy

M=$((1 << 20))
note "a 32 MiB source: random data in pieces not aligned to clusters, holes between"
truncate -s $((32 * M)) src.raw
random_file chunk.raw $((6 * M)) 42
# OFFSET LENGTH pairs (bytes) copied from chunk.raw into src.raw.
for piece in "0 $((3 * M + 4096))" "$((5 * M + 777)) $((M / 2))" "$((9 * M)) $((4 * M))" \
  "$((17 * M - 512)) $((6 * M))" "$((28 * M + 12345)) 70000" "$((31 * M)) $M"; do
  read -r off len <<<"$piece"
  dd if=chunk.raw of=src.raw bs=64K iflag=count_bytes oflag=seek_bytes seek="$off" \
    count="$len" conv=notrunc status=none
done

note "a disk with 256 KiB clusters and a snapshot holding data everywhere"
disk_init d 32M 256K
dio d 'write -P 0x5a 0 12M' 'write -P 0xa5 12M 20M'
dsnap d
base=d/$(file_of d "$SNAP")
base_stamp=$(stamp "$base")

SOCK=$TMP/d.sock
U=$(nbd_uri "$SOCK")

note "nbdcopy --connections=4 --requests=16 into the writable export"
serve_start d/DiskDescriptor.xml --socket "$SOCK"
expect_ok nbdcopy --connections=4 --requests=16 src.raw "$U"
# A client sees the result before the server stops, too.
expect_ok qemu-img compare -f raw src.raw -F raw "$U"
out_has "Images are identical"
serve_stop "$SERVE_PID" "$SERVE_OUT"
assert_eq "$(stamp "$base")" "$base_stamp" "the snapshot's delta"
cp src.raw d.ref/top.raw
verify_disk d

note "nbdcopy --connections=4 out of the export: identical to the source"
serve_start -r d/DiskDescriptor.xml --socket "$SOCK"
ro_server=$SERVE_PID
ro_out=$SERVE_OUT
expect_ok nbdcopy --connections=4 --requests=16 "$U" out.raw
cmp src.raw out.raw || fail "nbdcopy out of the export differs from the source"

note "qemu-img convert -m 8 -W from one export into another (a fresh disk)"
disk_init e 32M 256K
SOCK2=$TMP/e.sock
U2=$(nbd_uri "$SOCK2")
serve_start e/DiskDescriptor.xml --socket "$SOCK2"
expect_ok qemu-img convert -n -m 8 -W -f raw -O raw "$U" "$U2"
expect_ok qemu-img compare -f raw "$U" -F raw "$U2"
out_has "Images are identical"
serve_stop "$SERVE_PID" "$SERVE_OUT"
serve_stop "$ro_server" "$ro_out"
cp src.raw e.ref/top.raw
verify_disk e
