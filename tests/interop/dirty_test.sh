#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# A dirty image (in-use marker 0x746F6E59 at byte 44 left set) is reported
# by `ploop check` (exit 1), `ploop info` and `qemu-img check`, refused by
# a read-write qemu-io, and repaired by `ploop check --repair` (exit 0,
# qemu-img check clean, data intact). Dirty images are made by patching
# the marker and by a simulated crash (PLOOP_FAULT=cut=N: every file
# operation after the Nth mutating one fails) at every point of a `ploop io`
# session; after repair each cluster reads as before or after the session,
# never anything else.
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-img qemu-io stdbuf

DIRTY=$((0x746F6E59))
cb=65536

# assert_dirty IMG: every tool sees the image as not closed cleanly.
assert_dirty() {
  assert_eq "$(get_u32 "$1" 44)" "$DIRTY" "in-use marker @44 of $1"
  expect_rc 1 "$PLOOP" check "$1"
  out_has "not closed cleanly"
  out_has "problems found; run 'ploop check --repair"
  expect_rc 1 "$PLOOP" check --json "$1"
  out_has '"clean": false'
  out_has '"was_dirty": true'
  pl info "$1"
  out_has "dirty: +yes"
  pl info --json "$1"
  out_has '"dirty": true'
  expect_rc 2 qemu-img check -f parallels "$1"
  err_has "not closed correctly"
  expect_rc 1 qemu-io -f parallels -c "read 0 512" "$1"
  err_has "not closed correctly"
}

# repair IMG: check --repair makes it clean for ploop and qemu.
repair() {
  pl check --repair "$1"
  out_has "not closed cleanly.*\[repaired\]"
  out_has ": repaired$"
  assert_eq "$(get_u32 "$1" 44)" 0 "in-use marker @44 after repair"
  pl check "$1"
  out_has "no problems found"
  qemu_clean "$1"
}

# reads IMG BYTE OFF LEN: qemu-io finds BYTE throughout [OFF, OFF+LEN).
reads() {
  run qemu-io -r -f parallels -c "read -P $2 $3 $4" "$1"
  [[ $RC == 0 ]] && ! grep -q "verification failed" "$TMP/.out"
}

# The base image: clusters 0 and 2 hold 0x11 / 0x22, flushed and closed.
pl init --no-descriptor -s 8M -b 64K base.hds
pl io base.hds "write -P 0x11 0 $cb" "write -P 0x22 $((2 * cb)) $cb"
truncate -s 8M base.raw
expect_ok qemu-io -f raw -c "write -P 0x11 0 $cb" -c "write -P 0x22 $((2 * cb)) $cb" base.raw
qemu_clean base.hds

note "marker patched at byte 44"
cp base.hds patched.hds
put_u32 patched.hds 44 "$DIRTY"
assert_dirty patched.hds
repair patched.hds
qemu_same patched.hds base.raw
pl check --repair patched.hds
out_has "no problems found"

note "a writable ploop open of a dirty image repairs it first"
cp base.hds reopen.hds
put_u32 reopen.hds 44 "$DIRTY"
pl io reopen.hds "write -P 0x33 $((3 * cb)) 512"
qemu_clean reopen.hds
expect_ok qemu-io -f raw -c "write -P 0x33 $((3 * cb)) 512" base.raw
qemu_same reopen.hds base.raw
expect_ok qemu-io -f raw -c "write -z $((3 * cb)) 512" base.raw

note "qemu-io killed while writing"
# QEMU preallocates (128M by default) past its data and keeps the BAT in
# memory until a flush; killed, it leaves a dirty image with a long tail.
cp base.hds qkill.hds
# stdbuf: qemu-io's -c output is block-buffered into a file otherwise.
start_bg qkill.out stdbuf -oL qemu-io -f parallels -c "write -P 0x55 $((6 * cb)) 100000" -c flush \
  -c "write -P 0x56 $((9 * cb)) $cb" -c "sleep 120000" qkill.hds
qemu_pid=$BG_PID
# The second write printed: the flush before it is done.
wait_for_output qkill.out "wrote $cb/$cb bytes at offset $((9 * cb))" "$qemu_pid"
kill_bg "$qemu_pid"
assert_dirty qkill.hds
(($(file_size qkill.hds) > 64 * cb)) || fail "qemu left no preallocated tail; the test is void"
expect_rc 1 "$PLOOP" check qkill.hds
out_has "unreferenced clusters at the end of the file"
repair qkill.hds
(($(file_size qkill.hds) <= 16 * cb)) || fail "repair kept the preallocated tail: $(file_size qkill.hds)"
reads qkill.hds 0x11 0 "$cb" || fail "cluster 0 changed"
reads qkill.hds 0x22 $((2 * cb)) "$cb" || fail "cluster 2 changed"
reads qkill.hds 0x55 $((6 * cb)) 100000 || fail "data flushed by qemu was lost"
reads qkill.hds 0x56 $((9 * cb)) "$cb" || reads qkill.hds 0 $((9 * cb)) "$cb" ||
  fail "unflushed cluster 9 is neither old nor new"
pl io qkill.hds "write -P 0x57 $((12 * cb)) 512"
qemu_clean qkill.hds

note "crash (PLOOP_FAULT=cut=N) at every point of an io session"
# The session overwrites cluster 0 in place, allocates clusters 1 and 5,
# and flushes. Each cut leaves the image dirty (or untouched / complete);
# after repair each cluster holds its old or its new content.
dirty_runs=0
for ((n = 0; n < 40; n++)); do
  img=cut-$n.hds
  cp base.hds "$img"
  run env PLOOP_FAULT="cut=$n" "$PLOOP" io "$img" "write -P 0xee 0 $((2 * cb))" \
    "write -P 0xef $((5 * cb)) $cb" flush
  if ((RC == 0)); then
    break
  fi
  if [[ $RC != 7 || $(wc -l <"$TMP/.err") != 1 ]]; then
    fail "cut=$n: expected exit 7 (I/O error) with one line on stderr, got $RC: $ERR"
  fi
  if [[ $(get_u32 "$img" 44) == "$DIRTY" ]]; then
    ((++dirty_runs))
    assert_dirty "$img"
    repair "$img"
  else
    # Cut before the marker was written, or after it was cleared.
    pl check "$img"
    qemu_clean "$img"
  fi
  reads "$img" 0xee 0 "$cb" || reads "$img" 0x11 0 "$cb" || fail "cut=$n: cluster 0 is mixed"
  reads "$img" 0xee "$cb" "$cb" || reads "$img" 0 "$cb" "$cb" || fail "cut=$n: cluster 1 is mixed"
  reads "$img" 0xef $((5 * cb)) "$cb" || reads "$img" 0 $((5 * cb)) "$cb" ||
    fail "cut=$n: cluster 5 is mixed"
  reads "$img" 0x22 $((2 * cb)) "$cb" || fail "cut=$n: untouched cluster 2 changed"
  # The repaired image takes writes again, from both programs.
  pl io "$img" "write -P 0x44 $((4 * cb)) 4096"
  expect_ok qemu-io -f parallels -c "read -P 0x44 $((4 * cb)) 4096" -c "write -P 0x45 $((6 * cb)) 512" "$img"
  qemu_clean "$img"
  pl check "$img"
done
((RC == 0)) || fail "the io session never completed, even with cut=$n"
((dirty_runs >= 5)) || fail "only $dirty_runs cut points left the image dirty; is cut=N working?"
note "$dirty_runs of $n cut points left a dirty image"
# The uncut session wrote everything.
reads "$img" 0xee 0 $((2 * cb)) || fail "complete session: cluster 0-1 wrong"
reads "$img" 0xef $((5 * cb)) "$cb" || fail "complete session: cluster 5 wrong"
qemu_clean "$img"

note "crash (PLOOP_FAULT=cut=N) at every point of an import"
# A crashed import never leaves a half-written image under the destination
# name, and the next import succeeds and leaves no temporary file behind.
truncate -s 1M src.raw
qemu-io -f raw -c "write -P 0x66 0 300000" -c "write -P 0x67 700000 100" src.raw >/dev/null
for ((n = 0; n < 200; n++)); do
  before=$(ls -A)
  run env PLOOP_FAULT="cut=$n" "$PLOOP" import -b 32K src.raw imp.hds
  ((RC == 0)) && break
  [[ $RC == 7 && $(wc -l <"$TMP/.err") == 1 ]] || fail "import cut=$n: exit $RC: $ERR"
  assert_absent imp.hds
  pl import -b 32K src.raw imp.hds
  qemu_clean imp.hds
  qemu_same imp.hds src.raw
  rm imp.hds
  assert_eq "$(ls -A)" "$before" "files after import cut=$n and a retry"
done
((RC == 0 && n > 10)) || fail "import with cut=N: RC=$RC after $n tries"
qemu_same imp.hds src.raw

echo PASS
