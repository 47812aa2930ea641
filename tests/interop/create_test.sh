#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Images that ploop creates and writes are valid for QEMU's parallels
# driver: `qemu-img check` is clean and `qemu-img compare` finds the same
# disk as a raw reference that qemu-io wrote with the same commands. Covers
# init (expanded, preallocated, raw) at 32K..4M clusters, io writes at
# partial / cluster-crossing offsets, zero writes and discards, import of a
# raw file with random data, zero runs and holes, the header bytes against
# a qemu-created image, and resize (including a grow that relocates data
# clusters out of the way of a bigger BAT).
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io perl

KiB=1024
MiB=$((1024 * 1024))

# header_matches_qemu OURS QEMU: the two headers (and the zero BAT) agree
# byte for byte, except CHS geometry (informational, computed differently
# by QEMU) and the flags (ploop sets CIF_Empty on creation, QEMU does not).
header_matches_qemu() {
  local first_block=$(($(get_u32 "$1" 48) * 512))
  cmp <(head -c 20 "$1") <(head -c 20 "$2") || fail "header bytes 0..19 differ from qemu's"
  cmp <(dd if="$1" bs=1 skip=28 count=24 status=none) \
    <(dd if="$2" bs=1 skip=28 count=24 status=none) || fail "header bytes 28..51 differ from qemu's"
  cmp <(head -c "$first_block" "$1" | tail -c +57) <(head -c "$first_block" "$2" | tail -c +57) ||
    fail "header bytes 56.. / BAT differ from qemu's"
}

# The common workload, as qemu-io commands for a disk of at least 12
# clusters of CB bytes. Offsets hit partial clusters, cross cluster
# boundaries, overwrite, zero, discard whole and partial clusters and then
# reuse them.
workload() {
  local img=$1 ref=$2 cb=$3 size=$4
  both "$img" "$ref" "write -P 0x11 0 4096"
  both "$img" "$ref" "write -P 0x22 $((cb - 512)) 1024"
  both "$img" "$ref" "write -P 0x33 $((3 * cb - 1000)) $((2 * cb + 3000))"
  # Several commands in one session: BAT updates are batched until close.
  both "$img" "$ref" "write -P 0x44 $((7 * cb)) $cb" "write -P 0x55 $((8 * cb + 4096)) 512" \
    "write -P 0x66 $((size - 700)) 700"
  # Zeros over allocated data, and over an unallocated cluster.
  both "$img" "$ref" "write -z $((3 * cb)) 8192" "write -z $((10 * cb)) $cb"
  # Discard a whole allocated cluster, a partial range, then reuse: the
  # next new cluster takes the freed space, the file does not grow.
  local before
  before=$(file_size "$img")
  both "$img" "$ref" "discard $((7 * cb)) $cb" "discard 1024 1024"
  both "$img" "$ref" "write -P 0x77 $((9 * cb + 100)) 5000"
  assert_eq "$(file_size "$img")" "$before" "file size after discard and a new cluster"
  random_file data.bin $((cb + 12345)) "$cb"
  pl io "$img" "write -f data.bin $((5 * cb + 333))"
  expect_ok qemu-io -f raw -c "write -s data.bin $((5 * cb + 333)) $((cb + 12345))" "$ref"
}

# --- init + io, all kinds, several cluster sizes ---
for cb_k in 32 64 1024 4096; do
  cb=$((cb_k * KiB))
  size=$((48 * MiB))
  for kind in expanded preallocated; do
    note "init -f $kind -b ${cb_k}K"
    img=$kind-$cb_k.hds
    pl init --no-descriptor -s 48M -f "$kind" -b "${cb_k}K" "$img"
    qemu_clean "$img"
    assert_eq "$(qemu_vsize "$img")" "$size" "qemu virtual size"
    expect_ok qemu-img info "$img"
    out_has "file format: parallels"
    if [[ $kind == expanded ]]; then
      assert_eq "$(file_size "$img")" "$cb" "size of a new expanded image"
      expect_ok qemu-img create -q -f parallels -o "cluster_size=${cb_k}K" "qemu-$cb_k.hds" 48M
      header_matches_qemu "$img" "qemu-$cb_k.hds"
    else
      assert_eq "$(file_size "$img")" "$((cb + size))" "size of a new preallocated image"
    fi
    assert_eq "$(get_u32 "$img" 28)" "$((cb / 512))" "cluster size in sectors @28"
    assert_eq "$(get_u32 "$img" 32)" "$((size / cb))" "BAT entries @32"
    assert_eq "$(get_u32 "$img" 44)" 0 "in-use marker @44 after init"

    ref=$kind-$cb_k.raw
    truncate -s "$size" "$ref"
    workload "$img" "$ref" "$cb" "$size"
    assert_eq "$(get_u32 "$img" 44)" 0 "in-use marker @44 after io"
    qemu_clean "$img"
    qemu_same "$img" "$ref"
    pl check "$img"
    out_has "no problems found"
    # Our own view agrees too: export, and read back patterns.
    pl export "$img" "$img.out"
    cmp "$img.out" "$ref" || fail "ploop export of $img differs from the reference"
    pl io -r "$img" "read -P 0x22 $((cb - 512)) 1024" "read -P 0x33 $((4 * cb)) $cb" \
      "read -P 0 $((7 * cb)) $cb" "read -P 0x66 $((size - 700)) 700"
    expect_rc 1 "$PLOOP" io -r "$img" "read -P 0x44 $((7 * cb)) $cb"
  done
done

# --- raw kind ---
note "init -f raw"
pl init --no-descriptor -s 12M -f raw plain.img
truncate -s 12M plain.ref
for cmd in "write -P 0x11 0 4096" "write -P 0x22 65000 100000" "write -z 70000 1000" \
  "write -P 0x33 $((12 * MiB - 512)) 512"; do
  pl io -f raw plain.img "$cmd"
  expect_ok qemu-io -f raw -c "$cmd" plain.ref
done
pl io -f raw plain.img "discard 65536 65536"
expect_ok qemu-io -f raw -c "write -z 65536 65536" plain.ref
assert_eq "$(qemu_vsize plain.img raw)" $((12 * MiB)) "raw image size"
qemu_same plain.img plain.ref raw
cmp plain.img plain.ref || fail "raw image differs from the reference"
pl resize -f raw -s 20M plain.img
assert_eq "$(qemu_vsize plain.img raw)" $((20 * MiB)) "raw image size after resize"
truncate -s 20M plain.ref
pl io -f raw plain.img "write -P 0x44 $((20 * MiB - 4096)) 4096"
expect_ok qemu-io -f raw -c "write -P 0x44 $((20 * MiB - 4096)) 4096" plain.ref
qemu_same plain.img plain.ref raw

# --- import of a raw file: random data, zero runs, holes, odd tail ---
note "import"
src=src.raw
random_file part1.bin $((3 * MiB + 4096)) 7
random_file part2.bin $((MiB + 777)) 8
truncate -s $((11 * MiB + 512)) "$src"
dd if=part1.bin of="$src" conv=notrunc status=none
# Written zeros (not a hole) from 3M+4K to 5M, then a hole to 7M.
dd if=/dev/zero of="$src" bs=4096 seek=$(((3 * MiB + 4096) / 4096)) \
  count=$(((2 * MiB - 4096) / 4096)) conv=notrunc status=none
dd if=part2.bin of="$src" bs=$MiB seek=7 conv=notrunc status=none
# Random bytes in the last, partial sector of the file.
dd if=part1.bin of="$src" bs=512 seek=$((11 * MiB / 512)) count=1 conv=notrunc status=none
for cb_k in 32 64 1024 4096; do
  cb=$((cb_k * KiB))
  for kind in expanded preallocated; do
    img=import-$kind-$cb_k.hds
    pl import -f "$kind" -b "${cb_k}K" "$src" "$img"
    qemu_clean "$img"
    qemu_same "$img" "$src"
    want=$(((11 * MiB + 512 + cb - 1) / cb * cb))
    assert_eq "$(qemu_vsize "$img")" "$want" "virtual size of $img"
  done
  # Zero runs are not allocated in an expanded image: 3M+4K of data at the
  # start and 1M+777 at 7M (all rounded to clusters) plus the tail.
  pl info --json "import-expanded-$cb_k.hds"
  alloc=$(sed -n 's/^ *"allocated_clusters": \([0-9]*\),*$/\1/p' <<<"$OUT")
  want=$(((3 * MiB + 4096 + cb - 1) / cb + (7 * MiB + MiB + 777 + cb - 1) / cb - 7 * MiB / cb + 1))
  if ((cb == 4 * MiB)); then want=3; fi # clusters 0, 1 and 2 all hold data
  assert_eq "$alloc" "$want" "allocated clusters of the ${cb_k}K import"
done

# Tiny and odd-sized sources: the disk is rounded up to whole clusters.
for bytes in 1 1000 32768 32769; do
  random_file "tiny-$bytes.raw" "$bytes" "$bytes"
  pl import -b 32K "tiny-$bytes.raw" "tiny-$bytes.hds"
  qemu_clean "tiny-$bytes.hds"
  qemu_same "tiny-$bytes.hds" "tiny-$bytes.raw"
  assert_eq "$(qemu_vsize "tiny-$bytes.hds")" $(((bytes + 32767) / 32768 * 32768)) "size of tiny import"
done

# --- resize ---
note "resize"
pl init --no-descriptor -s 20M -b 64K grow.hds
truncate -s 20M grow.ref
both grow.hds grow.ref "write -P 0x5a 0 100000" "write -P 0xa5 $((20 * MiB - 65536)) 65536"
pl resize -s 60M grow.hds
assert_eq "$(qemu_vsize grow.hds)" $((60 * MiB)) "size after resize"
truncate -s 60M grow.ref
qemu_clean grow.hds
qemu_same grow.hds grow.ref
both grow.hds grow.ref "write -P 0x3c $((60 * MiB - 4096)) 4096"
qemu_clean grow.hds
qemu_same grow.hds grow.ref
expect_ok qemu-io -f parallels -c "write -P 0x77 $((40 * MiB)) 65536" grow.hds
expect_ok qemu-io -f raw -c "write -P 0x77 $((40 * MiB)) 65536" grow.ref
qemu_same grow.hds grow.ref

# A grow past 8176 clusters of 32K needs a second BAT cluster; the data
# cluster sitting there is relocated to the end of the file.
for kind in expanded preallocated; do
  note "resize with relocation ($kind)"
  img=reloc-$kind.hds
  ref=reloc-$kind.raw
  pl init --no-descriptor -f "$kind" -s 200M -b 32K "$img"
  assert_eq "$(get_u32 "$img" 48)" 64 "first block (sectors) before the grow"
  truncate -s 200M "$ref"
  both "$img" "$ref" "write -P 0x61 0 32768" "write -P 0x62 32768 70000" \
    "write -P 0x63 $((150 * MiB)) 40000"
  pl resize -s 300M "$img"
  assert_eq "$(get_u32 "$img" 48)" 128 "first block (sectors) after the grow"
  truncate -s 300M "$ref"
  assert_eq "$(qemu_vsize "$img")" $((300 * MiB)) "size after the grow"
  qemu_clean "$img"
  qemu_same "$img" "$ref"
  pl resize -s 700M "$img"
  truncate -s 700M "$ref"
  both "$img" "$ref" "write -P 0x64 $((700 * MiB - 5000)) 5000"
  qemu_clean "$img"
  qemu_same "$img" "$ref"
  pl check "$img"
done

echo PASS
