#!/usr/bin/env bash
# `ploop convert`: a disk (or a snapshot) to raw, qcow2 and vmdk and back.
# Every output compares identical (qemu-img compare) to `ploop export`, is
# sparse (its allocated size close to the data, not the disk size), and
# every disk made back from it allocates exactly the clusters holding
# non-zero data (zero writes allocate nothing) and passes check and
# qemu-img check. Failures (a bad input, a full disk part-way, missing
# tools) leave nothing at the destination.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img qemu-io nbdkit

M=$((1 << 20))
DD=d/DiskDescriptor.xml
note "a 256 MiB disk: 7 clusters of data in 3 deltas, a cluster of written zeros"
disk_init d 256M 1M
dio d 'write -P 0x11 0 1M' 'write -P 0x44 7340155 1000' 'write -P 0 50M 1M'
dsnap d
snap=$SNAP
dio d 'write -P 0x22 100M 3M'
dsnap d
dio d 'write -P 0x33 200M 2M' 'write -P 0x55 101M 4K'
pl export "$DD" exp.raw
pl export -u "$snap" "$DD" snap.raw
data_clusters=7

# allocated_clusters DD: the disk's allocated clusters, from info --json.
allocated_clusters() {
  "$PLOOP" info --json "$1/$(file_of "$1" "$TOP_GUID")" |
    sed -n 's/^ *"allocated_clusters": \([0-9]*\),*$/\1/p'
}

for fmt in raw qcow2 vmdk; do
  note "$fmt: to, compare, sparse, and back"
  pl convert --to "$fmt" "$DD" "out.$fmt"
  out_has "^Created out.$fmt \\($fmt\\) from $DD\$"
  assert_absent "out.$fmt.convert-tmp"
  qemu_same "out.$fmt" exp.raw "$fmt"
  [[ $(qemu_vsize "out.$fmt" "$fmt" | head -1) == $((256 * M)) ]] || fail "out.$fmt has the wrong size"
  alloc=$(allocated_bytes "out.$fmt")
  ((alloc <= (data_clusters + 2) * M)) ||
    fail "out.$fmt occupies $alloc bytes for $data_clusters MiB of data"
  mkdir "n_$fmt"
  pl convert --from "$fmt" "out.$fmt" "n_$fmt/root.hds"
  out_has "^Created n_$fmt/root.hds and n_$fmt/DiskDescriptor.xml from out.$fmt \\($fmt\\)\$"
  assert_eq "$(ls "n_$fmt" | tr '\n' ' ')" "DiskDescriptor.xml root.hds " "files in n_$fmt"
  pl check "n_$fmt/DiskDescriptor.xml"
  out_has "no problems found"
  qemu_clean "n_$fmt/root.hds"
  rm -f back.raw
  pl export "n_$fmt/DiskDescriptor.xml" back.raw
  same_disk back.raw exp.raw
  assert_eq "$(allocated_clusters "n_$fmt")" "$data_clusters" "clusters allocated by --from $fmt"
done

note "data that is all zeros allocates nothing (qcow2 and raw inputs)"
expect_ok qemu-img create -q -f qcow2 zeros.qcow2 16M
expect_ok qemu-io -f qcow2 -c 'write -P 0 0 4M' -c 'write -P 0x5a 8M 1M' -c 'write -P 0 12M 2M' \
  zeros.qcow2
expect_ok qemu-img map -f qcow2 --output=json zeros.qcow2
grep -q '"start": 0, "length": 4194304, "depth": 0, "present": true, "zero": false, "data": true' \
  "$TMP/.out" || fail "the zeros are not allocated data in zeros.qcow2: $OUT"
mkdir z1 z2
pl convert --from qcow2 zeros.qcow2 z1/root.hds
assert_eq "$(allocated_clusters z1)" 1 "clusters allocated from zeros.qcow2"
expect_ok qemu-img compare -f parallels z1/root.hds -F qcow2 zeros.qcow2
out_has "Images are identical"
expect_ok qemu-img convert -f qcow2 -O raw -S 0 zeros.qcow2 zeros.raw
(($(allocated_bytes zeros.raw) >= 7 * M)) || fail "zeros.raw is not fully allocated"
pl convert --from raw zeros.raw z2/root.hds
assert_eq "$(allocated_clusters z2)" 1 "clusters allocated from zeros.raw"

note "a snapshot (-u) to qcow2"
pl convert --to qcow2 -u "$snap" "$DD" snap.qcow2
qemu_same snap.qcow2 snap.raw qcow2

note "--from options: preallocated, 256K clusters"
mkdir p
pl convert --from qcow2 -f preallocated -b 256K out.qcow2 p/root.hds
expect_ok "$PLOOP" info --json p/root.hds
out_has '"kind": "preallocated"'
out_has '"cluster_size": 262144'
rm -f back.raw
pl export p/DiskDescriptor.xml back.raw
same_disk back.raw exp.raw

note "a size that is not a multiple of the cluster is rounded up, the data kept"
expect_ok qemu-img create -q -f qcow2 odd.qcow2 10000000
expect_ok qemu-io -f qcow2 -c 'write -P 0x77 9999360 640' odd.qcow2
mkdir o
pl convert --from qcow2 odd.qcow2 o/root.hds
assert_eq "$(qemu_vsize o/root.hds)" $((10 * M)) "size of the disk made from odd.qcow2"
expect_ok qemu-img compare -f parallels o/root.hds -F qcow2 odd.qcow2
out_has "Images are identical"

note "the destination exists: exit 4, untouched"
echo keep >taken.qcow2
expect_error 4 "$PLOOP" convert --to qcow2 "$DD" taken.qcow2
assert_eq "$(cat taken.qcow2)" keep "taken.qcow2"
expect_error 4 "$PLOOP" convert --from qcow2 out.qcow2 n_qcow2/root.hds
expect_error 4 "$PLOOP" convert --from qcow2 out.qcow2 n_qcow2/other.hds
assert_absent n_qcow2/other.hds

note "bad input: exit 3 or 5, nothing left behind"
mkdir e
expect_error 3 "$PLOOP" convert --from qcow2 missing.qcow2 e/root.hds
expect_error 5 "$PLOOP" convert --from qcow2 exp.raw e/root.hds
err_has 'not a valid qcow2 image'
expect_error 5 "$PLOOP" convert --from vmdk out.qcow2 e/root.hds
expect_error 3 "$PLOOP" convert --to qcow2 nowhere/DiskDescriptor.xml x.qcow2
expect_error 3 "$PLOOP" convert --to qcow2 "$DD" no-dir/x.qcow2
expect_error 3 "$PLOOP" convert --from qcow2 out.qcow2 no-dir/root.hds
assert_absent no-dir
expect_error 3 "$PLOOP" convert --to qcow2 -u '{12345678-1234-1234-1234-123456789abc}' "$DD" x.qcow2
assert_eq "$(ls e | wc -l)" 0 "files left in e"
assert_absent x.qcow2
assert_absent x.qcow2.convert-tmp

note "the disk fills up part-way: exit 8, nothing left behind"
for fmt in raw qcow2; do
  expect_error 8 env PLOOP_FAULT=failfrom=write:8:ENOSPC "$PLOOP" convert --from "$fmt" \
    "out.$fmt" e/root.hds
  assert_eq "$(ls -A e | wc -l)" 0 "files left in e after ENOSPC ($fmt)"
done

note "a leftover temporary file from a crash is replaced"
echo stale >y.qcow2.convert-tmp
pl convert --to qcow2 "$DD" y.qcow2
assert_absent y.qcow2.convert-tmp
qemu_same y.qcow2 exp.raw qcow2

note "bad arguments: exit 2"
expect_error 2 "$PLOOP" convert "$DD" z.qcow2
expect_error 2 "$PLOOP" convert --to qcow2 --from raw "$DD" z.qcow2
expect_error 2 "$PLOOP" convert --to vdi "$DD" z.vdi
expect_error 2 "$PLOOP" convert --to qcow2 -f preallocated "$DD" z.qcow2
expect_error 2 "$PLOOP" convert --from qcow2 -u "$snap" out.qcow2 e/root.hds
expect_error 2 "$PLOOP" convert --from qcow2 -b 3K out.qcow2 e/root.hds
expect_error 2 "$PLOOP" convert --from qcow2 -f raw out.qcow2 e/root.hds
assert_eq "$(ls -A e | wc -l)" 0 "files left in e"
assert_absent z.qcow2

note "qemu-img, nbdkit or the plugin missing: exit 6 for qcow2, raw still works"
expect_error 6 env PLOOP_NBDKIT=/nonexistent "$PLOOP" convert --to qcow2 "$DD" z.qcow2
expect_error 6 env PATH=/nonexistent "$PLOOP" convert --to qcow2 "$DD" z.qcow2
err_has 'qemu-img is not installed'
expect_error 6 env PLOOP_NBDKIT_PLUGIN=/nonexistent "$PLOOP" convert --from vmdk out.vmdk e/root.hds
expect_ok env PLOOP_NBDKIT=/nonexistent PATH=/nonexistent "$PLOOP" convert --to raw "$DD" z.raw
cmp z.raw exp.raw || fail "raw conversion without helpers differs"
assert_absent z.qcow2
assert_eq "$(ls -A e | wc -l)" 0 "files left in e"

verify_disk d
