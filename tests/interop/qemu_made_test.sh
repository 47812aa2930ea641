#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Images made and written by QEMU (`qemu-img create -f parallels`,
# `qemu-io`, `qemu-img convert -O parallels`) read back identically through
# ploop (export, `io -r ... read -P`), pass `ploop check`, and stay valid for
# QEMU after ploop writes into them: QEMU reads ploop's writes and ploop
# reads QEMU's, in turns.
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io perl

KiB=1024
MiB=$((1024 * 1024))

# qemu_io IMG CMD...: run qemu-io commands on a parallels image.
qemu_io() {
  local img=$1 cmd
  shift
  local args=()
  for cmd in "$@"; do args+=(-c "$cmd"); done
  expect_ok qemu-io -f parallels "${args[@]}" "$img"
  if grep -q "Pattern verification failed" "$TMP/.out"; then
    fail "qemu-io on $img: $OUT"
  fi
}

random_file rand.bin $((2 * MiB + 999)) 42

for cb_k in 32 64 1024 4096; do
  cb=$((cb_k * KiB))
  size=$((cb * 24 > 40 * MiB ? cb * 24 : 40 * MiB))
  note "qemu-img create -o cluster_size=${cb_k}K"
  img=q-$cb_k.hds
  ref=q-$cb_k.raw
  expect_ok qemu-img create -q -f parallels -o "cluster_size=${cb_k}K" "$img" "$size"
  truncate -s "$size" "$ref"

  # A fresh qemu image: clean for ploop, right geometry, empty.
  pl check "$img"
  out_has "no problems found; 0 clusters allocated"
  pl info --json "$img"
  out_has "\"virtual_size\": $size"
  out_has "\"cluster_size\": $cb"
  out_has '"dirty": false'

  # QEMU writes.
  cmds=("write -P 0xa1 0 4096" "write -P 0xa2 $((cb - 100)) 300"
    "write -P 0xa3 $((2 * cb + 512)) $((2 * cb))" "write -s rand.bin $((6 * cb + 4096)) $((2 * MiB + 999))"
    "write -z $((2 * cb + 1024)) 1024" "write -P 0xa4 $((size - 512)) 512")
  qargs=()
  for c in "${cmds[@]}"; do qargs+=(-c "$c"); done
  expect_ok qemu-io -f parallels "${qargs[@]}" "$img"
  expect_ok qemu-io -f raw "${qargs[@]}" "$ref"
  qemu_clean "$img"

  # ploop reads what QEMU wrote.
  pl check "$img"
  out_has "no problems found"
  pl export "$img" "$img.exp"
  cmp "$img.exp" "$ref" || fail "ploop export of the qemu image differs from the reference"
  qemu_same "$img.exp" "$ref" raw
  pl io -r "$img" "read -P 0xa1 0 4096" "read -P 0xa2 $((cb - 100)) 300" \
    "read -P 0xa3 $((2 * cb + 512)) 512" "read -P 0 $((2 * cb + 1024)) 1024" \
    "read -P 0xa3 $((2 * cb + 2048)) $((2 * cb - 1536))" "read -P 0xa4 $((size - 512)) 512" \
    "read -P 0 $((size - 2 * cb)) $cb"
  expect_rc 1 "$PLOOP" io -r "$img" "read -P 0xa1 4096 1"
  err_has "offset 4096"

  # ploop writes into the qemu image; QEMU reads ploop's writes.
  both "$img" "$ref" "write -P 0xb1 $((cb - 50)) 100" "write -P 0xb2 $((12 * cb)) $((cb + 5))" \
    "discard $((2 * cb)) $cb" "write -P 0xb3 $((2 * cb + 7)) 9"
  qemu_clean "$img"
  qemu_same "$img" "$ref"
  qemu_io "$img" "read -P 0xb1 $((cb - 50)) 100" "read -P 0xb2 $((12 * cb)) $((cb + 5))" \
    "read -P 0xb3 $((2 * cb + 7)) 9" "read -P 0 $((2 * cb)) 7"

  # And once more in turns: QEMU, then ploop, on the same image.
  qemu_io "$img" "write -P 0xc1 $((20 * cb)) 8192"
  expect_ok qemu-io -f raw -c "write -P 0xc1 $((20 * cb)) 8192" "$ref"
  pl check "$img"
  out_has "no problems found"
  pl io -r "$img" "read -P 0xc1 $((20 * cb)) 8192"
  both "$img" "$ref" "write -P 0xd1 $((20 * cb + 4096)) $((cb + 4096))"
  qemu_clean "$img"
  qemu_same "$img" "$ref"
  pl check "$img"
done

note "qemu image whose size is not a multiple of the cluster"
expect_ok qemu-img create -q -f parallels -o cluster_size=64K odd.hds 1000001
vs=$(qemu_vsize odd.hds) # QEMU rounds up to a sector: 1000448
assert_eq "$vs" 1000448 "virtual size of the odd qemu image"
pl check odd.hds
pl info --json odd.hds
out_has "\"virtual_size\": $vs"
truncate -s "$vs" odd.raw
qemu_io odd.hds "write -P 0x42 $((vs - 1448)) 1448"
expect_ok qemu-io -f raw -c "write -P 0x42 $((vs - 1448)) 1448" odd.raw
both odd.hds odd.raw "write -P 0x43 $((vs - 3000)) 1000"
expect_error 2 "$PLOOP" io odd.hds "write -P 0x44 $((vs - 1)) 2"
err_has "past the end of the disk \($vs bytes\)"
pl export odd.hds odd.exp
cmp odd.exp odd.raw || fail "export of the odd-sized qemu image differs"
qemu_clean odd.hds
qemu_same odd.hds odd.raw
# Growing rounds up to whole clusters; the old partial tail reads as zeros.
pl resize -s 2000000 odd.hds
assert_eq "$(qemu_vsize odd.hds)" $((31 * 65536)) "virtual size after the grow"
truncate -s $((31 * 65536)) odd.raw
qemu_clean odd.hds
qemu_same odd.hds odd.raw

note "v1 image (WithoutFreeSpace: BAT entries in sectors)"
# QEMU cannot create v1 images but reads them: make one from a v2 image by
# rewriting the signature and turning each BAT entry into sectors.
pl init --no-descriptor -s 8M -b 64K v1.hds
truncate -s 8M v1.raw
both v1.hds v1.raw "write -P 0x11 0 65536" "write -P 0x22 204800 10240" \
  "write -P 0x33 $((8 * MiB - 512)) 512"
put_bytes v1.hds 0 "WithoutFreeSpace"
for ((i = 0; i < 128; i++)); do
  e=$(get_u32 v1.hds $((64 + 4 * i)))
  ((e == 0)) || put_u32 v1.hds $((64 + 4 * i)) $((e * 128))
done
assert_eq "$(get_u32 v1.hds 64)" 128 "v1 BAT entry 0 (sectors)"
qemu_clean v1.hds
qemu_same v1.hds v1.raw
pl info v1.hds
out_has "format: +ploop v1 \(WithoutFreeSpace\)"
pl check v1.hds
out_has "no problems found; 3 clusters allocated"
pl export v1.hds v1.exp
cmp v1.exp v1.raw || fail "export of the v1 image differs"
pl io -r v1.hds "read -P 0x22 204800 10240" "read -P 0x33 $((8 * MiB - 512)) 512"
expect_error 6 "$PLOOP" io v1.hds "write -P 0x44 0 512"
err_has "v1 \(WithoutFreeSpace\) images are read-only here"
# A dirty v1 image is repaired in its own units.
put_u32 v1.hds 44 $((0x746F6E59))
put_u32 v1.hds $((64 + 4 * 100)) 99999 # past EOF (in sectors)
expect_rc 1 "$PLOOP" check v1.hds
pl check --repair v1.hds
qemu_clean v1.hds
qemu_same v1.hds v1.raw
assert_eq "$(get_u32 v1.hds 64)" 128 "v1 BAT entry 0 after repair"
import_v1=$(head -c 16 v1.hds)
assert_eq "$import_v1" "WithoutFreeSpace" "signature after repairing a v1 image"

note "qemu-img convert -O parallels"
random_file src.raw $((5 * MiB)) 5
dd if=/dev/zero of=src.raw bs=$MiB seek=1 count=2 conv=notrunc status=none
expect_ok qemu-img convert -f raw -O parallels src.raw conv.hds
pl check conv.hds
pl export conv.hds conv.raw
cmp <(head -c $((5 * MiB)) conv.raw) src.raw || fail "export of qemu-img convert output differs"
qemu_same conv.hds src.raw
# And the other way: qemu-img converts our image back to the same raw.
pl import -b 64K src.raw ours.hds
expect_ok qemu-img convert -f parallels -O raw ours.hds back.raw
cmp back.raw src.raw || fail "qemu-img convert of our import differs from the source"

echo PASS
