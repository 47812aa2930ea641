#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Image locks interoperate with QEMU's (byte-range OFD locks at 100+P and
# 200+P). While ploop holds an image for writing, qemu-io and qemu-img
# cannot open it, not even read-only, and other ploop commands get exit 9;
# while qemu-io holds it for writing, every locking ploop command gets exit 9
# with one clear line, and `ploop info` (which does not lock) still works.
# Readers share: two ploop readers, ploop and qemu readers; a reader blocks
# writers of both programs.
#
# Holders are long-lived processes: `ploop io ... 'sleep MS'`, and qemu-io
# in interactive mode fed through a FIFO (so the test decides when it
# quits). Readiness is a line the holder printed, never a fixed sleep.
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io mkfifo

LOCK_ERR="is in use by another program"
QEMU_LOCK_ERR='Failed to get .*"(write|consistent read)" lock'
HOLD_MS=120000 # killed long before; the bound keeps a stray holder finite

# refused_while_held IMG: every locking ploop command fails with exit 9,
# one stderr line, and leaves no output file behind.
refused_while_held() {
  local img=$1
  expect_error 9 "$PLOOP" io "$img" "write -P 0x99 0 512"
  err_has "$LOCK_ERR"
  expect_error 9 "$PLOOP" io -r "$img" "read 0 512"
  err_has "$LOCK_ERR"
  expect_error 9 "$PLOOP" check "$img"
  err_has "$LOCK_ERR"
  expect_error 9 "$PLOOP" check --repair "$img"
  err_has "$LOCK_ERR"
  expect_error 9 "$PLOOP" export "$img" "$img.out"
  err_has "$LOCK_ERR"
  assert_absent "$img.out"
  expect_error 9 "$PLOOP" resize -s 16M "$img"
  err_has "$LOCK_ERR"
  expect_error 9 "$PLOOP" import "$img" "$img.copy" # the source is locked too
  err_has "$LOCK_ERR"
  assert_absent "$img.copy"
}

# qemu_refused IMG: neither a qemu writer nor a qemu reader can open IMG.
qemu_refused() {
  expect_rc 1 qemu-io -f parallels -c "write -P 0x98 0 4096" "$1"
  err_has "$QEMU_LOCK_ERR"
  err_has "Is another process using the image"
  expect_rc 1 qemu-io -r -f parallels -c "read 0 4096" "$1"
  err_has "$QEMU_LOCK_ERR"
  expect_rc 1 qemu-img check -f parallels "$1"
  err_has "$QEMU_LOCK_ERR"
}

pl init --no-descriptor -s 8M -b 64K img.hds
pl io img.hds "write -P 0x5a 0 65536"
truncate -s 8M img.raw
expect_ok qemu-io -f raw -c "write -P 0x5a 0 65536" img.raw

note "ploop holds the image for writing"
cp img.hds w.hds
start_bg w.out "$PLOOP" io w.hds "write -P 0x6b 65536 65536" flush "sleep $HOLD_MS"
writer=$BG_PID
wait_for_output w.out "^wrote 65536 bytes at offset 65536" "$writer"
qemu_refused w.hds
refused_while_held w.hds
# info does not lock: it shows the open image as dirty.
pl info w.hds
out_has "dirty: +yes"
still_running "$writer" "ploop writer"
# Killed while open: the flushed write survives, the image needs a repair,
# and the lock went with the process.
kill_bg "$writer"
expect_rc 1 "$PLOOP" check w.hds
out_has "not closed cleanly"
pl check --repair w.hds
qemu_clean w.hds
expect_ok qemu-io -f raw -c "write -P 0x6b 65536 65536" img.raw
qemu_same w.hds img.raw
expect_ok qemu-io -f parallels -c "write -P 0x6c 131072 512" w.hds

note "ploop holds the image for reading"
cp img.hds r.hds
sum=$(md5 r.hds)
start_bg r.out "$PLOOP" io -r r.hds "read -P 0x5a 0 65536" "sleep $HOLD_MS"
reader=$BG_PID
wait_for_output r.out "^read 65536 bytes at offset 0" "$reader"
# Readers share: another ploop reader, check, export, info, a qemu reader.
pl io -r r.hds "read -P 0x5a 0 65536"
pl check r.hds
pl export r.hds r.exp
pl info r.hds
out_has "dirty: +no"
expect_ok qemu-io -r -f parallels -c "read -P 0x5a 0 65536" r.hds
expect_ok qemu-img compare -f parallels r.hds -F raw r.exp
# Writers of both kinds are refused.
expect_error 9 "$PLOOP" io r.hds "write -P 0x99 0 512"
err_has "$LOCK_ERR"
expect_error 9 "$PLOOP" check --repair r.hds
err_has "$LOCK_ERR"
expect_error 9 "$PLOOP" resize -s 16M r.hds
err_has "$LOCK_ERR"
expect_rc 1 qemu-io -f parallels -c "write -P 0x98 0 4096" r.hds
err_has "$QEMU_LOCK_ERR"
still_running "$reader" "ploop reader"
kill_bg "$reader"
assert_eq "$(md5 r.hds)" "$sum" "md5 of the image held by readers"
pl check r.hds
out_has "no problems found"

# qemu_holder IMG OUT ARGS...: start interactive qemu-io (with ARGS) on
# IMG, commands written to fd 7; its pid goes to $QEMU_PID.
qemu_holder() {
  local img=$1 out=$2
  shift 2
  rm -f q.fifo
  mkfifo q.fifo
  qemu-io "$@" "$img" <q.fifo >"$out" 2>&1 &
  QEMU_PID=$!
  _bg_pids+=("$QEMU_PID")
  exec 7>q.fifo
}
# qemu_send OUT CMD: give the holder one command. Send the next only after
# waiting for this one's output: qemu-io reads a FIFO line by line only as
# long as each line arrives on its own.
qemu_send() {
  echo "$2" >&7 2>/dev/null || fail "qemu-io is gone: $(cat "$1")"
}
qemu_quit() {
  qemu_send "$1" quit
  exec 7>&-
  wait "$QEMU_PID" || fail "qemu-io exited with $?: $(cat "$1")"
}
# A holder that died must fail the test with its output, not kill it with
# SIGPIPE.
trap '' PIPE

note "qemu-io holds the image for writing"
cp img.hds q.hds
qemu_holder q.hds q.out -f parallels
qemu_send q.out "write -P 0x7c 0 4096"
wait_for_output q.out "wrote 4096/4096 bytes at offset 0" "$QEMU_PID"
refused_while_held q.hds
pl info q.hds
out_has "dirty: +yes"
still_running "$QEMU_PID" "qemu-io writer"
qemu_quit q.out
# Released: ploop opens it, sees QEMU's write, and writes.
pl io q.hds "read -P 0x7c 0 4096" "read -P 0x5a 4096 61440" "write -P 0x7d 8192 512"
qemu_clean q.hds

note "qemu-io holds the image read-only"
qemu_holder q.hds qr.out -r -f parallels
qemu_send qr.out "read -P 0x7d 8192 512"
wait_for_output qr.out "read 512/512 bytes at offset 8192" "$QEMU_PID"
pl io -r q.hds "read -P 0x7d 8192 512"
pl check q.hds
expect_error 9 "$PLOOP" io q.hds "write -P 0x99 0 512"
err_has "$LOCK_ERR"
expect_error 9 "$PLOOP" check --repair q.hds
err_has "$LOCK_ERR"
still_running "$QEMU_PID" "qemu-io reader"
qemu_quit qr.out
grep -q "Pattern verification failed" qr.out && fail "qemu-io read the wrong data: $(cat qr.out)"

echo PASS
