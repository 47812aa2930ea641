#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Corrupted images, patched with printf/dd: `ploop info`, `io` and `export`
# refuse them with one clear line on stderr and exit 5 (never a crash or a
# signal) and change nothing; `ploop check` reports them (exit 1 when
# repairable, 5 when not); `ploop check --repair` fixes the repairable ones
# (BAT entries past EOF or inside the BAT, clusters referenced twice, a
# first-block offset that is too large, a file truncated inside the data
# area, junk in BAT padding), after which `qemu-img check` is clean and qemu
# reads the expected disk. A last loop throws odd values at every header
# field and asserts only that nothing crashes.
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io

cb=65536
# Base image, 8M at 64K clusters: virtual clusters 0, 1 and 5 hold data, in
# file clusters 1, 2 and 3 (BAT entries 0, 1 and 5).
pl init --no-descriptor -s 8M -b 64K base.hds
io_cmds=("write -P 0x11 0 $cb" "write -P 0x22 $cb $cb" "write -P 0x33 $((5 * cb)) 100")
truncate -s 8M base.raw
both base.hds base.raw "${io_cmds[@]}"
assert_eq "$(get_u32 base.hds 64)" 1 "BAT entry 0 of the base image"
assert_eq "$(get_u32 base.hds 68)" 2 "BAT entry 1 of the base image"
assert_eq "$(get_u32 base.hds 84)" 3 "BAT entry 5 of the base image"
qemu_clean base.hds

bat() { echo $((64 + 4 * $1)); } # file offset of BAT entry $1

# refused IMG REGEX: every way of opening IMG fails with exit 5 and one
# line matching REGEX, and leaves the file as it was.
refused() {
  local img=$1 re=$2 sum
  sum=$(md5 "$img")
  expect_error 5 "$PLOOP" info "$img"
  err_has "$re"
  expect_error 5 "$PLOOP" info --json "$img"
  err_has "$re"
  expect_error 5 "$PLOOP" io -r "$img" "read 0 512"
  err_has "$re"
  expect_error 5 "$PLOOP" io "$img" "write -P 0x99 0 512"
  err_has "$re"
  expect_error 5 "$PLOOP" export "$img" "$img.out"
  err_has "$re"
  assert_absent "$img.out"
  expect_error 5 "$PLOOP" resize -s 16M "$img"
  err_has "$re"
  assert_eq "$(md5 "$img")" "$sum" "md5 of $img after refused opens"
}

# unrepairable IMG REGEX: refused, and check (with or without --repair)
# exits 5 naming the problem, changing nothing.
unrepairable() {
  local img=$1 re=$2 sum
  sum=$(md5 "$img")
  refused "$img" "$re"
  expect_rc 5 "$PLOOP" check "$img"
  out_has "$re"
  out_has "corrupt beyond repair"
  expect_rc 5 "$PLOOP" check --json "$img"
  out_has '"repairable": false'
  expect_rc 5 "$PLOOP" check --repair "$img"
  out_has "$re"
  assert_eq "$(md5 "$img")" "$sum" "md5 of $img after check --repair"
}

# repairable IMG REGEX REF: refused or not, check exits 1 naming the
# problem; check --repair exits 0, after which ploop and qemu find it clean
# and qemu reads the disk in REF.
repairable() {
  local img=$1 re=$2 ref=$3 sum
  sum=$(md5 "$img")
  expect_rc 1 "$PLOOP" check "$img"
  out_has "$re"
  out_has "run 'ploop check --repair"
  assert_eq "$(md5 "$img")" "$sum" "md5 of $img after check without --repair"
  pl check --repair "$img"
  out_has "$re.*\[repaired\]"
  out_has ": repaired$"
  pl check "$img"
  out_has "no problems found"
  qemu_clean "$img"
  qemu_same "$img" "$ref"
  pl export "$img" "$img.exp"
  cmp <(head -c "$(file_size "$ref")" "$img.exp") "$ref" || fail "export of repaired $img differs"
}

note "BAT entry past EOF"
cp base.hds pasteof.hds
put_u32 pasteof.hds "$(bat 3)" 1000
refused pasteof.hds "pasteof.hds: BAT entry 3 points past the end of the file"
expect_rc 2 qemu-img check -f parallels pasteof.hds
err_has "cluster 3 is outside image"
repairable pasteof.hds "BAT entry 3 points past the end of the file" base.raw
assert_eq "$(get_u32 pasteof.hds "$(bat 3)")" 0 "BAT entry 3 after repair"

note "duplicate BAT entries"
cp base.hds dup.hds
put_u32 dup.hds "$(bat 4)" 1 # virtual cluster 4 shares file cluster 1 with 0
refused dup.hds "cluster 1 is used by more than one BAT entry"
cp base.raw dup.raw
expect_ok qemu-io -f raw -c "write -P 0x11 $((4 * cb)) $cb" dup.raw
repairable dup.hds "cluster 1 is used by BAT entries 0 and 4" dup.raw
# The two clusters are independent again.
both dup.hds dup.raw "write -P 0x44 $((4 * cb)) 512"
qemu_same dup.hds dup.raw
pl io -r dup.hds "read -P 0x11 0 $cb"

note "BAT entry pointing into the BAT area"
pl init --no-descriptor -s 300M -b 32K bigbat.hds # 9600 entries: 2 BAT clusters
pl io bigbat.hds "write -P 0x11 0 32768"
truncate -s 300M bigbat.raw
expect_ok qemu-io -f raw -c "write -P 0x11 0 32768" bigbat.raw
put_u32 bigbat.hds "$(bat 7)" 1
refused bigbat.hds "BAT entry 7 points into the BAT area"
repairable bigbat.hds "BAT entry 7 points into the BAT area" bigbat.raw

note "first block offset too large"
cp base.hds fbo.hds
put_u32 fbo.hds 48 256
refused fbo.hds "fbo.hds: BAT entry 0 points into the BAT area"
repairable fbo.hds "first block offset is 131072 bytes, expected 65536" base.raw
assert_eq "$(get_u32 fbo.hds 48)" 128 "first block offset after repair"
cp base.hds fbo-odd.hds
put_u32 fbo-odd.hds 48 129
refused fbo-odd.hds "bad first block offset 66048 bytes"
repairable fbo-odd.hds "first block offset is 66048 bytes, expected 65536" base.raw
assert_eq "$(get_u32 fbo-odd.hds 48)" 128 "first block offset after repair"

note "file truncated inside the data area"
cp base.hds trunc.hds
truncate -s $((2 * cb + 1000)) trunc.hds # half of file cluster 2 remains
refused trunc.hds "BAT entry 1 points past the end of the file"
expect_rc 2 qemu-img check -f parallels trunc.hds
cp base.raw trunc.raw # the clusters past EOF are lost: zeros
expect_ok qemu-io -f raw -c "write -z $cb $cb" -c "write -z $((5 * cb)) $cb" trunc.raw
repairable trunc.hds "BAT entry 1 points past the end of the file" trunc.raw
assert_eq "$(file_size trunc.hds)" $((2 * cb)) "size of the repaired file"

note "junk in the BAT padding"
cp base.hds pad.hds
put_u32 pad.hds "$(bat 1000)" 2 # slot 1000 > 128 entries, inside the BAT cluster
pl io -r pad.hds "read -P 0x11 0 $cb" # harmless for readers
repairable pad.hds "BAT slot 1000 is past the disk size" base.raw

note "unrepairable headers"
cp base.hds sig.hds
put_bytes sig.hds 0 'X'
unrepairable sig.hds "not a ploop image"
expect_error 5 "$PLOOP" info sig.hds
err_has "use -f raw"
cp base.hds type.hds
put_u32 type.hds 16 3
unrepairable type.hds "wrong image type 3"
cp base.hds cs.hds
put_u32 cs.hds 28 100
unrepairable cs.hds "wrong cluster size: 100 sectors"
cp base.hds cs0.hds
put_u32 cs0.hds 28 0
unrepairable cs0.hds "wrong cluster size: 0 sectors"
cp base.hds fbo0.hds
put_u32 fbo0.hds 48 0
unrepairable fbo0.hds "bad first block offset 0 bytes"
cp base.hds count.hds
put_u32 count.hds 32 7
unrepairable count.hds "BAT has 7 entries but the disk size of 16384 sectors needs 128"
cp base.hds huge.hds
put_u32 huge.hds 32 4000000000
unrepairable huge.hds "BAT too large"
# A consistent but enormous BAT (2^29-1 entries) in a small file.
cp base.hds hugeok.hds
put_u32 hugeok.hds 32 $((0x1fffffff))
put_u32 hugeok.hds 36 $((0x1fffffff * 128))
put_u32 hugeok.hds 40 $((0x1fffffff * 128 >> 32))
hugeok_clusters=$(((64 + 4 * 0x1fffffff + 65535) / 65536))
put_u32 hugeok.hds 48 $((hugeok_clusters * 128))
unrepairable hugeok.hds "truncated"
cp base.hds trunc-hdr.hds
truncate -s 32768 trunc-hdr.hds # inside the header/BAT cluster
refused trunc-hdr.hds "points past the end of the file"
expect_rc 5 "$PLOOP" check --repair trunc-hdr.hds
out_has "file is truncated: 32768 bytes"
head -c 40 base.hds >tiny.hds
unrepairable tiny.hds "too short for a ploop header"
: >empty.hds
unrepairable empty.hds "too short for a ploop header \(0 bytes\)"
# QEMU makes 16K clusters; OpenVZ ploop (and we) allow 32K..64M only.
expect_ok qemu-img create -q -f parallels -o cluster_size=16K q16.hds 8M
unrepairable q16.hds "wrong cluster size: 32 sectors"

note "odd values in every header field"
# Nothing may crash or hang: every command exits with a documented code
# below 128 and errors are one line.
for off in 16 20 24 28 32 36 40 44 48 52 56 60 64 68; do
  for val in 0 1 129 $((0x80000000)) $((0xffffffff)) $((0x746F6E59)); do
    img=f-$off-$val.hds
    cp base.hds "$img"
    put_u32 "$img" "$off" "$val"
    for cmd in "info" "io -r" "check --repair" "io"; do
      args=()
      read -ra args <<<"$cmd"
      case $cmd in
        "io -r") args+=("$img" "read 0 $((8 << 20))") ;;
        io) args+=("$img" "write -P 0x5 4096 70000") ;;
        *) args+=("$img") ;;
      esac
      run "$PLOOP" "${args[@]}"
      case $RC in
        0 | 1 | 5 | 6 | 10) ;;
        *) fail "ploop ${args[*]} (offset $off = $val): exit $RC: $ERR" ;;
      esac
      # check reports on stdout; other commands fail with one stderr line.
      lines=$(wc -l <"$TMP/.err")
      if ((lines > 1)) || [[ $cmd != check* ]] && ((RC > 1 && lines != 1)); then
        fail "ploop ${args[*]} (offset $off = $val): exit $RC, $lines lines on stderr: $ERR"
      fi
    done
  done
done

echo PASS
