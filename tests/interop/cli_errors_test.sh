#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The CLI on bad input: unknown flags, missing arguments, invalid or too
# big sizes, bad cluster sizes, missing files, existing destinations, a raw
# file without -f raw, I/O past the end of the disk, shrinking, and a full
# disk (PLOOP_FAULT=...:ENOSPC) during import and io. Every error is one
# line on stderr with the documented exit code, and leaves the files it
# was given as they were (no half-written destination, an image that still
# passes check with its flushed data intact).
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io perl

MiB=$((1024 * 1024))

# listing: the files in the working directory, to prove nothing was left.
listing() { ls -A; }

note "help and version"
pl --help
out_has "Exit codes:"
out_has " 9  image is in use by another program"
pl io --help
out_has "sleep MS"
pl --version
out_has "^ploop [0-9]+\.[0-9]+"

note "usage errors (exit 2)"
before=$(listing)
expect_error 2 "$PLOOP"
expect_error 2 "$PLOOP" frobnicate
expect_error 2 "$PLOOP" --bogus
expect_error 2 "$PLOOP" init --no-descriptor --bogus -s 1M a.hds
err_has -- "--bogus"
expect_error 2 "$PLOOP" init a.hds
err_has -- "--size is required"
expect_error 2 "$PLOOP" init --no-descriptor -s 10M
err_has "FILE is required"
expect_error 2 "$PLOOP" init --no-descriptor -s
expect_error 2 "$PLOOP" info
expect_error 2 "$PLOOP" check --frob a.hds
expect_error 2 "$PLOOP" import only-one.raw
expect_error 2 "$PLOOP" export only-one.hds
expect_error 2 "$PLOOP" io a.hds
err_has "CMD is required"
expect_error 2 "$PLOOP" resize a.hds
expect_error 2 "$PLOOP" init --no-descriptor -s 10M a.hds extra-arg
for size in 10X abc -5M "" 1.5G 0x10 10MM 16E 99999999999999999999; do
  expect_error 2 "$PLOOP" init --no-descriptor -s "$size" a.hds
  err_has "invalid size"
done
expect_error 2 "$PLOOP" init --no-descriptor -s 0 a.hds
err_has "must not be zero"
for size in 1000P 60T 51T $(((50 << 40) + 512)); do
  expect_error 2 "$PLOOP" init --no-descriptor -s "$size" a.hds
  err_has "over the maximum of 50T"
done
expect_error 2 "$PLOOP" init --no-descriptor -s 50T -b 32K a.hds # 2^30 clusters: too many
err_has "use a bigger cluster size"
for cb in 16K 48K 128M 0 1 3K 32769 x; do
  expect_error 2 "$PLOOP" init --no-descriptor -s 10M -b "$cb" a.hds
  err_has "cluster size"
  expect_error 2 "$PLOOP" import -b "$cb" a.raw a.hds
  err_has "cluster size"
done
expect_error 2 "$PLOOP" init --no-descriptor -s 10M -f qcow2 a.hds
err_has "unknown image kind 'qcow2' \(use expanded, preallocated or raw\)"
expect_error 2 "$PLOOP" import -f raw a.raw a.hds
err_has "unknown image kind 'raw' \(use expanded or preallocated\)"
expect_error 2 "$PLOOP" init --no-descriptor -s 1000 -f raw a.raw
err_has "multiple of 512"
assert_eq "$(listing)" "$before" "files after usage errors"

note "missing files (exit 3)"
expect_error 3 "$PLOOP" info missing.hds
err_has "missing.hds: No such file"
expect_error 3 "$PLOOP" check missing.hds
expect_error 3 "$PLOOP" check --repair missing.hds
expect_error 3 "$PLOOP" io missing.hds "read 0 512"
expect_error 3 "$PLOOP" io -r missing.hds "read 0 512"
expect_error 3 "$PLOOP" export missing.hds out.raw
expect_error 3 "$PLOOP" import missing.raw out.hds
expect_error 3 "$PLOOP" resize -s 1G missing.hds
expect_error 3 "$PLOOP" init --no-descriptor -s 1M no-such-dir/a.hds
pl init --no-descriptor -s 10M -b 64K a.hds
expect_error 3 "$PLOOP" io a.hds "write -f missing.bin 0"
assert_eq "$(listing)" "$before"$'\n'"a.hds" "files after missing-file errors"

note "existing destinations (exit 4, untouched)"
pl io a.hds "write -P 0x11 0 100000"
random_file a.raw $((2 * MiB)) 1
echo "precious" >keep.txt
for dst in a.hds a.raw keep.txt; do
  sum=$(md5 "$dst")
  expect_error 4 "$PLOOP" init --no-descriptor -s 1M "$dst"
  err_has "$dst: File exists"
  expect_error 4 "$PLOOP" init --no-descriptor -s 1M -f raw "$dst"
  expect_error 4 "$PLOOP" init --no-descriptor -s 1M -f preallocated "$dst"
  expect_error 4 "$PLOOP" import a.raw "$dst"
  err_has "$dst: File exists"
  expect_error 4 "$PLOOP" export a.hds "$dst"
  err_has "$dst: File exists"
  assert_eq "$(md5 "$dst")" "$sum" "md5 of existing $dst"
done
qemu_clean a.hds

note "a raw file without -f raw (exit 5 with a hint)"
before=$(listing)
for args in "info a.raw" "io a.raw read_0_512" "io -r a.raw read_0_512" "export a.raw x.raw" \
  "resize -s 4M a.raw"; do
  read -ra argv <<<"$args"
  [[ ${argv[-1]} == read_0_512 ]] && argv[-1]="read 0 512"
  expect_error 5 "$PLOOP" "${argv[@]}"
  err_has "a.raw: not a ploop image.*use -f raw"
done
expect_rc 5 "$PLOOP" check a.raw
out_has "not a ploop image"
assert_eq "$(listing)" "$before" "files after raw-without--f-raw errors"
pl info -f raw a.raw
out_has "format: +raw"
pl export -f raw a.raw a-copy.raw
cmp a.raw a-copy.raw || fail "export -f raw changed the data"
expect_error 2 "$PLOOP" io -f qcow2 a.hds "read 0 512"
err_has "unknown format 'qcow2'"

note "io out of range and bad io commands"
size=$((10 * MiB))
sum=$(md5 a.hds)
for cmd in "read $size 1" "read $((size - 511)) 512" "read 0 $((size + 1))" "read 0 11M" \
  "write -P 1 $size 1" "write -z $((size - 1)) 2" "discard $size 512" \
  "read 18446744073709551615 2" "write -P 1 18446744073709551104 1024"; do
  expect_error 2 "$PLOOP" io a.hds "$cmd"
  err_has "past the end of the disk \($size bytes\)"
done
pl io -r a.hds "read $((size - 512)) 512" "read -P 0 $((size - 1)) 1"
random_file big.bin $((64 * 1024)) 2
expect_error 2 "$PLOOP" io a.hds "write -f big.bin $((size - 4096))"
err_has "past the end of the disk"
for cmd in "frob 1" "read" "read 1x 2" "read -P 300 0 1" "read -P" "write 0 1" "write -P 1 0" \
  "flush now" "sleep" "sleep abc" "sleep -1" "sleep 99999999999" "sleep 1 2" "discard 0" ""; do
  expect_error 2 "$PLOOP" io a.hds "$cmd"
  err_has "^ploop io: "
done
pl io -r a.hds "sleep 0" "read 0 512" "sleep 1"
# A failing command stops the session; what came before it is kept.
expect_error 2 "$PLOOP" io a.hds "write -P 0x22 0 512" "read 0 99M" "write -P 0x33 0 512"
pl io -r a.hds "read -P 0x22 0 512"
expect_error 10 "$PLOOP" io -r a.hds "write -P 0x44 0 512"
err_has "read-only"
expect_error 1 "$PLOOP" io -r a.hds "read -P 0x23 0 512"
err_has "offset 0 is 0x22"
pl io a.hds "write -P 0x11 0 512"
assert_eq "$(md5 a.hds)" "$sum" "md5 after failed io"
qemu_clean a.hds

note "resize to a smaller size (exit 2, unchanged)"
sum=$(md5 a.hds)
expect_error 2 "$PLOOP" resize -s 5M a.hds
err_has "shrinking is not supported"
expect_error 2 "$PLOOP" resize -s 0 a.hds
expect_error 2 "$PLOOP" resize -s 60T a.hds
expect_error 2 "$PLOOP" resize -s 10Q a.hds
pl resize -s 10M a.hds # same size: nothing to do
assert_eq "$(md5 a.hds)" "$sum" "md5 after refused resizes"
sum=$(md5 a.raw)
expect_error 2 "$PLOOP" resize -f raw -s 1M a.raw
assert_eq "$(md5 a.raw)" "$sum" "md5 of the raw file after a refused resize"

note "disk full during import (exit 8, nothing left behind)"
random_file src.raw $((3 * MiB + 1000)) 3
dd if=/dev/zero of=src.raw bs=$MiB seek=1 count=1 conv=notrunc status=none
before=$(listing)
for kind in expanded preallocated; do
  for op in write sync allocate truncate create rename; do
    for ((n = 1; n < 100; n++)); do
      run env PLOOP_FAULT="failfrom=$op:$n:ENOSPC" "$PLOOP" import -f "$kind" -b 64K src.raw imp.hds
      ((RC == 0)) && break
      if [[ $RC != 8 || $(wc -l <"$TMP/.err") != 1 ]] || ! grep -q "No space left" "$TMP/.err"; then
        _show "PLOOP_FAULT=failfrom=$op:$n:ENOSPC $PLOOP import -f $kind src.raw imp.hds" >&2
        fail "import with ENOSPC at $op $n: expected exit 8 and one line"
      fi
      assert_eq "$(listing)" "$before" "files after import failed at $op $n"
    done
    ((RC == 0)) || fail "import never succeeded with ENOSPC on $op"
    note "import -f $kind: ENOSPC at each of the first $((n - 1)) ${op}s handled"
    [[ $op != write || $n -gt 3 ]] || fail "import did only $((n - 1)) writes; is the fault reaching it?"
    qemu_clean imp.hds
    qemu_same imp.hds src.raw
    rm imp.hds
  done
done

note "disk full during init and export (exit 8, nothing left behind)"
# enospc_loop OP CMD...: run CMD with ENOSPC from the Nth OP on, for N = 1,
# 2, ... until it succeeds; every failure must be exit 8 with one line and
# leave the directory as it was. Sets $n to the first N that succeeded.
enospc_loop() {
  local op=$1 before
  shift
  before=$(listing)
  for ((n = 1; n < 200; n++)); do
    run env PLOOP_FAULT="failfrom=$op:$n:ENOSPC" "$@"
    ((RC == 0)) && return 0
    if [[ $RC != 8 || $(wc -l <"$TMP/.err") != 1 ]] || ! grep -q "No space left" "$TMP/.err"; then
      _show "PLOOP_FAULT=failfrom=$op:$n:ENOSPC $*" >&2
      fail "ENOSPC at $op $n: expected exit 8 and one line"
    fi
    assert_eq "$(listing)" "$before" "files after ENOSPC at $op $n"
  done
  fail "never succeeded with ENOSPC on $op: $*"
}
for kind in expanded preallocated raw; do
  for op in write sync allocate; do
    enospc_loop "$op" "$PLOOP" init --no-descriptor -s 4M -f "$kind" -b 64K "init-$kind.img"
    rm "init-$kind.img"
  done
done
pl init --no-descriptor -s 8M -b 64K exp-src.hds
pl io exp-src.hds "write -P 0x31 0 200000" "write -P 0x32 $((5 * MiB)) $MiB"
for op in write truncate sync; do
  enospc_loop "$op" "$PLOOP" export exp-src.hds exp.raw
  [[ $op != write ]] || ((n > 10)) || fail "export did only $((n - 1)) writes"
  qemu_same exp-src.hds exp.raw
  rm exp.raw
done

note "disk full during resize (exit 8, image still good)"
pl init --no-descriptor -s 200M -b 32K rs.hds
truncate -s 200M rs.raw
both rs.hds rs.raw "write -P 0x41 0 65536" "write -P 0x42 $((100 * MiB)) 4096"
for ((n = 1; n < 100; n++)); do
  cp rs.hds rs-try.hds
  run env PLOOP_FAULT="failfrom=write:$n:ENOSPC" "$PLOOP" resize -s 300M rs-try.hds
  ((RC == 0)) && break
  [[ $RC == 8 && $(wc -l <"$TMP/.err") == 1 ]] || fail "resize with ENOSPC at write $n: exit $RC: $ERR"
  run "$PLOOP" check rs-try.hds
  [[ $RC == 0 || $RC == 1 ]] || fail "check after resize ENOSPC at write $n: exit $RC: $OUT"
  pl check --repair rs-try.hds
  qemu_clean rs-try.hds
  vs=$(qemu_vsize rs-try.hds)
  [[ $vs == $((200 * MiB)) || $vs == $((300 * MiB)) ]] || fail "size $vs after resize ENOSPC"
  cp rs.raw rs-try.raw
  truncate -s "$vs" rs-try.raw
  qemu_same rs-try.hds rs-try.raw
done
((RC == 0 && n > 3)) || fail "resize with ENOSPC: RC=$RC after $n tries"
assert_eq "$(qemu_vsize rs-try.hds)" $((300 * MiB)) "size after the resize"

note "disk full during io writes (exit 8, image consistent, flushed data intact)"
# Session 1 (flushed, closed): clusters 0-1 of 0x11. Session 2 writes new
# clusters, flushes, proves the flush with a read, then writes more.
pl init --no-descriptor -s 8M -b 64K full.hds
pl io full.hds "write -P 0x11 0 131072"
session2=("write -P 0x22 262144 65536" "write -P 0x23 393216 100" flush
  "read -P 0x22 262144 65536" "write -P 0x24 524288 131072" "write -P 0x25 397312 100" flush)
ALLOWED_AFTER_ENOSPC="^f.hds: (no problems found|image was not closed cleanly|[0-9]+ unreferenced \
clusters at the end of the file|file length [0-9]+ is not a multiple|problems found; run)"
for mode in failfrom fail; do
  for ((n = 1; n < 100; n++)); do
    cp full.hds f.hds
    run env PLOOP_FAULT="$mode=write:$n:ENOSPC" "$PLOOP" io f.hds "${session2[@]}"
    ((RC == 0)) && break
    if [[ $RC != 8 || $(wc -l <"$TMP/.err") != 1 ]] || ! grep -q "No space left" "$TMP/.err"; then
      _show "PLOOP_FAULT=$mode=write:$n:ENOSPC $PLOOP io f.hds ..." >&2
      fail "io with ENOSPC ($mode) at write $n: expected exit 8 and one line"
    fi
    flushed=false
    grep -q "^read 65536 bytes at offset 262144 (pattern verified)" "$TMP/.out" && flushed=true
    # Consistent: check finds at most the in-use marker and leaked space.
    run "$PLOOP" check f.hds
    [[ $RC == 0 || $RC == 1 ]] || fail "check after ENOSPC ($mode) at write $n: exit $RC: $OUT"
    if grep -v -E "$ALLOWED_AFTER_ENOSPC" "$TMP/.out"; then
      fail "ENOSPC ($mode) at write $n left an inconsistent image: $OUT"
    fi
    pl check --repair f.hds
    qemu_clean f.hds
    pl io -r f.hds "read -P 0x11 0 131072"
    expect_ok qemu-io -r -f parallels -c "read -P 0x11 0 131072" f.hds
    out_has "read 131072/131072"
    grep -q "verification failed" "$TMP/.out" && fail "session 1 data lost (ENOSPC $mode at $n)"
    if $flushed; then
      pl io -r f.hds "read -P 0x22 262144 65536" "read -P 0x23 393216 100"
    fi
  done
  ((RC == 0)) || fail "io never succeeded with ENOSPC ($mode)"
  note "io: ENOSPC ($mode) at each of the first $((n - 1)) writes handled"
  ((n > 3)) || fail "io with ENOSPC ($mode) succeeded at write $n; the fault is not reaching it"
  pl io -r f.hds "read -P 0x24 524288 131072" "read -P 0x25 397312 100"
  qemu_clean f.hds
done

echo PASS
