#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# ploop send | ploop receive through real pipes, checked with qemu-img:
#   - a full stream (flattened and layered) and incremental streams: every
#     snapshot exported on both sides (`ploop export -u`) is byte-identical
#     (qemu-img compare, and the model disk_lib.sh keeps), every received
#     delta passes `qemu-img check -f parallels`, QEMU reading the received
#     base delta alone sees the snapshot, `ploop check` is clean;
#   - two "hosts" (two folders, each command run from its own folder) kept
#     in sync through a pipe: a full stream then three incremental ones;
#   - resume: the sender killed at a random point (several rounds, seeded:
#     STREAM_TEST_SEED replays one), the token from `receive --token`, the
#     continuation from `send --resume`: the received files are
#     byte-identical to an uninterrupted receive; also a receiver that
#     crashes (PLOOP_FAULT=cut) and resumes, and one whose disk fills up
#     (PLOOP_FAULT=failfrom=write:N:ENOSPC) and resumes; a file system
#     that cannot reserve space (fallocate refused) still receives;
#   - bad streams: garbage, a truncated header, a flipped bit, a stream cut
#     short, a wrong or missing base, a disk already there -- each refused
#     with its documented exit code and one line on stderr;
#   - the zero-copy sender: the same stream bytes spliced into a pipe
#     from the mapped deltas, written into a file, and read with pread;
#     the same bytes through a reader that splices them on into another
#     pipe and reads them late (`pv` does the former); a
#     delta cut short under the sender gives one line and exit 5 or 7 (a
#     SIGBUS on the mapping is caught), not a crash;
#   - progress: --progress=json lines on stderr; nothing on stderr by
#     default when it is not a terminal.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=disk_lib.sh
. "$here/disk_lib.sh"
need qemu-img qemu-io perl python3

KiB=1024
MiB=$((1024 * KiB))
cb=$((64 * KiB))
seed=${STREAM_TEST_SEED:-$RANDOM}
echo "STREAM_TEST_SEED=$seed"
RANDOM=$seed

# same_snapshot A B GUID: snapshot GUID (or the top, for "top") of disk
# folders A and B exports to the same bytes, and to the model A.ref.
same_snapshot() {
  local a=$1 b=$2 g=$3 u=()
  [[ $g == top ]] || u=(-u "$g")
  rm -f "$TMP/ea.raw" "$TMP/eb.raw"
  pl export "${u[@]}" "$a/DiskDescriptor.xml" "$TMP/ea.raw"
  pl export "${u[@]}" "$b/DiskDescriptor.xml" "$TMP/eb.raw"
  same_disk "$TMP/eb.raw" "$TMP/ea.raw"
  if [[ -f $a.ref/$g.raw ]]; then same_disk "$TMP/eb.raw" "$a.ref/$g.raw"; fi
}

# dfile D FILE OFF: write FILE at OFF into disk D and its model.
dfile() {
  pl io "$1/DiskDescriptor.xml" "write -f $2 $3"
  dd if="$2" of="$1.ref/top.raw" bs=64K seek="$3" oflag=seek_bytes conv=notrunc status=none
}

# received_ok D: ploop check is clean, every delta passes qemu-img check,
# no receive state is left.
received_ok() {
  local d=$1 f
  pl check "$d/DiskDescriptor.xml"
  out_has "no problems found"
  for f in "$d"/root.hds*; do qemu_clean "$f"; done
  assert_absent "$d/ploop-receive.state"
}

# A source disk with three snapshots and a top, data in every layer,
# zeros written over older data and a discard.
note "the source disk"
disk_init a 48M 64K
random_file r1 $((6 * MiB)) 1
random_file r2 $((2 * MiB)) 2
dfile a r1 0
dio a "write -P 0x11 $((20 * MiB)) $((3 * MiB))" "write -P 0x22 $((40 * MiB)) 100000"
dsnap a
S1=$SNAP
dfile a r2 $((1 * MiB))
dio a "write -z $((20 * MiB)) $((1 * MiB))" "write -P 0x33 $((30 * MiB)) 5000"
dsnap a
S2=$SNAP
dio a "discard $((2 * MiB)) $cb" "write -P 0x44 $((47 * MiB)) $((1 * MiB))"
dsnap a
S3=$SNAP
dio a "write -P 0x55 0 4096"
cp a.ref/top.raw a.ref/top-now.raw

# --- full and incremental streams through a pipe ---------------------------------
note "full flattened stream of S1 through a pipe, then incremental S1 -> S2 -> S3"
expect_ok bash -c "set -o pipefail; '$PLOOP' send -u '$S1' a | '$PLOOP' receive b"
assert_eq "$OUT" "$S1" "receive prints the snapshot it received"
[[ -z $ERR ]] || fail "receive wrote on stderr: $ERR"
same_snapshot a b "$S1"
received_ok b
# QEMU reads the received base delta alone as the snapshot.
qemu_same b/root.hds a.ref/"$S1".raw
expect_ok bash -c "set -o pipefail; '$PLOOP' send -u '$S2' --from '$S1' a | '$PLOOP' receive b"
expect_ok bash -c "set -o pipefail; '$PLOOP' send -u '$S3' --from '$S2' a | '$PLOOP' receive b"
for g in "$S1" "$S2" "$S3"; do same_snapshot a b "$g"; done
received_ok b
assert_eq "$(parent_of b "$S3")" "$S2" "parent of S3 on the receiver"
assert_eq "$(parent_of b "$TOP_GUID")" "$S3" "the receiver's top is over S3"
# The receiver's top is empty: it reads as S3.
pl export b/DiskDescriptor.xml "$TMP/btop.raw"
same_disk "$TMP/btop.raw" a.ref/"$S3".raw
grep -q "<ContentDigest>view-xxh3-v2:[0-9a-f]\{64\}</ContentDigest>" b/DiskDescriptor.xml ||
  fail "the receiver recorded no content digests"

note "the live top, incrementally, replaces the receiver's empty top"
# The base's record is an older ploop's kind of digest: it is not trusted
# (nor refused); the receiver digests its copy of the base instead.
sed -i "s/<ContentDigest>view-xxh3-v2:/<ContentDigest>view-sha256-v1:/" b/DiskDescriptor.xml
run bash -c "set -o pipefail; '$PLOOP' send --from '$S3' a | '$PLOOP' receive --progress=json b"
[[ $RC == 0 ]] || { _show; fail "an incremental receive over a base with an old digest record"; }
grep -q '"phase":"verify-base"' "$TMP/.err" || fail "the base was not digested: $ERR"
same_snapshot a b top
received_ok b

note "a full layered stream keeps every delta and GUID"
expect_ok bash -c "set -o pipefail; '$PLOOP' send --layers a | '$PLOOP' receive c"
for g in "$S1" "$S2" "$S3" top; do same_snapshot a c "$g"; done
received_ok c
assert_eq "$(chain_of c | tr '\n' ' ')" "$S1 $S2 $S3 $TOP_GUID " "chain of the layered copy"
qemu_same c/root.hds a.ref/"$S1".raw

note "the same stream bytes read ahead, mapped and spliced into a pipe, mapped and copied"
# --compress=lz4: with auto, what goes into a pipe may differ by the CPUs'
# load (compress_if), never what is received.
# The sender reads the snapshot ahead with direct I/O; PLOOP_SEND_MAP=1 maps
# the delta files instead and vmsplices stored data into a pipe, and
# PLOOP_SEND_NO_SPLICE=1 makes that a write() copy. A slow reader makes the
# splices partial.
expect_ok bash -c "set -o pipefail; '$PLOOP' send --compress=lz4 a | cat > '$TMP/s.ahead'"
expect_ok bash -c "'$PLOOP' send --compress=lz4 a > '$TMP/s.file'"
expect_ok bash -c "set -o pipefail; PLOOP_SEND_MAP=1 '$PLOOP' send --compress=lz4 a | cat > '$TMP/s.pipe'"
expect_ok bash -c "set -o pipefail; PLOOP_SEND_MAP=1 PLOOP_SEND_NO_SPLICE=1 '$PLOOP' send --compress=lz4 a | cat > '$TMP/s.copy'"
expect_ok bash -c "set -o pipefail; PLOOP_SEND_MAP=1 '$PLOOP' send --compress=lz4 -u '$S2' --from '$S1' a | (sleep 0.3; cat) > '$TMP/i.pipe'"
expect_ok bash -c "'$PLOOP' send --compress=lz4 -u '$S2' --from '$S1' a > '$TMP/i.ahead'"
cmp "$TMP/s.ahead" "$TMP/s.file" || fail "the piped stream differs from the one written to a file"
cmp "$TMP/s.ahead" "$TMP/s.pipe" || fail "the stream read ahead differs from the mapped and spliced one"
cmp "$TMP/s.ahead" "$TMP/s.copy" || fail "the stream read ahead differs from the mapped and copied one"
cmp "$TMP/i.pipe" "$TMP/i.ahead" || fail "the incremental streams differ"

note "--compress: auto into a file is lz4 wherever it shrinks; none stores; others are refused"
expect_ok bash -c "'$PLOOP' send a > '$TMP/s.auto'"
expect_ok bash -c "'$PLOOP' send --compress=none a > '$TMP/s.none'"
expect_ok bash -c "'$PLOOP' send --no-compress a > '$TMP/s.nc'"
cmp "$TMP/s.auto" "$TMP/s.file" || fail "auto into a file differs from --compress=lz4"
cmp "$TMP/s.none" "$TMP/s.nc" || fail "--compress=none differs from --no-compress"
(($(file_size "$TMP/s.none") > $(file_size "$TMP/s.file"))) || fail "--compress=none is not larger than lz4"
expect_error 2 bash -c "'$PLOOP' send --compress=zstd a > '$TMP/s.bad'"
err_has "auto, lz4 or none"
expect_error 2 bash -c "'$PLOOP' send --no-compress --compress=lz4 a > '$TMP/s.bad'"
[[ $(wc -l <"$TMP/.err") == 1 ]] || fail "two compress options: more than one line: $ERR"
err_has "excludes"

note "a reader that splices the stream on (as pv does) and reads it late gets the same bytes"
# The sender vmsplices read-ahead buffers into the pipe; a relay that
# splices them into a second pipe keeps the pages after the first pipe is
# empty. 48 MiB of random data in 1 MiB clusters: many more than the
# read-ahead's buffers, which are read into again meanwhile.
disk_init big 64M 1M
random_file rbig $((48 * MiB)) 7
dfile big rbig 0
expect_ok bash -c "'$PLOOP' send --compress=lz4 big > '$TMP/b.file'"
expect_ok bash -c "set -o pipefail; '$PLOOP' send --compress=lz4 big |
  python3 -c 'import os
while os.splice(0, 1, 1 << 20): pass' | (sleep 0.5; cat) > '$TMP/b.relay'"
cmp "$TMP/b.file" "$TMP/b.relay" || fail "the stream spliced on by its reader differs"
rm -rf big big.ref rbig "$TMP"/b.*

# --- two hosts ------------------------------------------------------------------------
note "two hosts, two folders, one pipe: a full stream and three incremental ones"
mkdir hostA hostB
disk_init hostA/ct 16M 64K
dfile hostA/ct r2 0
(cd hostA && "$PLOOP" snapshot -u "$S1" ct >/dev/null) || fail "snapshot on host A"
expect_ok bash -c "set -o pipefail; (cd hostA && '$PLOOP' send -u '$S1' ct) | (cd hostB && '$PLOOP' receive ct)"
prev=$S1
for i in 1 2 3; do
  dio hostA/ct "write -P $((0x60 + i)) $((i * 3 * MiB)) $((i * 100000))" "write -z $((i * 64 * KiB)) 4096"
  next=$(cd hostA && "$PLOOP" snapshot ct) || fail "snapshot on host A"
  expect_ok bash -c "set -o pipefail; (cd hostA && '$PLOOP' send -u '$next' --from '$prev' ct) | (cd hostB && '$PLOOP' receive ct)"
  same_snapshot hostA/ct hostB/ct "$next"
  prev=$next
done
same_snapshot hostA/ct hostB/ct "$S1"
received_ok hostB/ct

# --- resume -----------------------------------------------------------------------------
# receive_killed OPTS...: send (OPTS) into a FIFO, let the receiver have a
# random number of bytes of it, then kill the sender with SIGKILL. The
# receive must stop with exit 11 (or 5 when the cut fell in the header).
receive_killed() {
  local dst=$1 resume=$2 size=$3
  shift 3
  local cut=$(((RANDOM * 32768 + RANDOM) % size))
  rm -f fifo
  mkfifo fifo
  "$PLOOP" send "$@" a >fifo 2>/dev/null &
  local sender=$!
  _bg_pids+=("$sender")
  run bash -c "head -c $cut fifo | '$PLOOP' receive $resume $dst"
  kill -KILL "$sender" 2>/dev/null || true
  wait "$sender" 2>/dev/null || true
  KILLED_AT=$cut
}

# receive_with_kills DST ROUNDS SEND-OPTS...: receive the stream, killing
# the sender ROUNDS times at random points and resuming each time.
receive_with_kills() {
  local dst=$1 rounds=$2 i resume="" token size
  shift 2
  "$PLOOP" send "$@" a >full.stream || fail "send $*"
  size=$(file_size full.stream)
  for ((i = 0; i < rounds; i++)); do
    receive_killed "$dst" "$resume" "$size" "$@" ${token:+--resume "$token"}
    if [[ $RC == 5 && -z $resume ]]; then
      # Cut inside the header: nothing was received, start again.
      assert_absent "$dst/ploop-receive.state"
      continue
    fi
    [[ $RC == 11 ]] || { _show "receive (sender killed at $KILLED_AT of $size)"; fail "exit $RC, expected 11"; }
    [[ $(wc -l <"$TMP/.err") == 1 ]] || fail "receive printed more than one line: $ERR"
    err_has "partial receive is kept"
    [[ ! -f $dst/DiskDescriptor.xml || -n ${KEEP_DD:-} ]] || fail "a half-received disk has a descriptor"
    expect_ok "$PLOOP" receive --token "$dst"
    token=$OUT
    resume=--resume
    # The continuation is shorter than the stream; cut the next one there.
    "$PLOOP" send "$@" --resume "$token" a >rest.stream || fail "send --resume"
    size=$(file_size rest.stream)
  done
  if [[ -n $resume ]]; then
    expect_ok bash -c "set -o pipefail; '$PLOOP' send $* --resume '$token' a | '$PLOOP' receive --resume $dst"
  else
    expect_ok bash -c "set -o pipefail; '$PLOOP' send $* a | '$PLOOP' receive $dst"
  fi
}

# files_of D: "GUID md5" per delta, sorted: the bytes of every delta.
files_of() {
  shots "$1" | while read -r g _ _ _ f; do echo "$g $(md5 "$1/$f")"; done | LC_ALL=C sort
}

note "resume after killing the sender at random points (seed $seed)"
rm -rf ref
"$PLOOP" send --layers -u "$S2" a | "$PLOOP" receive ref >/dev/null || fail "reference receive"
"$PLOOP" send --layers -u "$S3" --from "$S2" a | "$PLOOP" receive ref >/dev/null || fail "reference receive"
want=$(files_of ref)
for round in 1 2 3; do
  rm -rf k
  receive_with_kills k $((1 + round % 3)) --layers -u "$S2"
  KEEP_DD=1 receive_with_kills k 2 --layers -u "$S3" --from "$S2"
  assert_eq "$(files_of k)" "$want" "delta files after round $round"
  received_ok k
  for g in "$S1" "$S2" "$S3"; do same_snapshot a k "$g"; done
done

note "a receiver that crashes (PLOOP_FAULT=cut) resumes to the same files"
rm -rf k
run bash -c "'$PLOOP' send --layers -u '$S2' a | PLOOP_FAULT=cut=12 '$PLOOP' receive k"
[[ $RC == 11 ]] || { _show receive; fail "exit $RC, expected 11"; }
assert_absent k/DiskDescriptor.xml
expect_ok "$PLOOP" receive --token k
expect_ok bash -c "set -o pipefail; '$PLOOP' send --layers -u '$S2' --resume '$OUT' a | '$PLOOP' receive --resume k"
"$PLOOP" send --layers -u "$S3" --from "$S2" a | "$PLOOP" receive k >/dev/null || fail "incremental after resume"
assert_eq "$(files_of k)" "$want" "delta files after a crashed receive"

note "a full host disk stops the receive (exit 11, one line); it resumes to the same files"
# The receiver writes into space it reserves ahead (fallocate): a file
# system that is full or cannot reserve still takes the whole stream, and
# no reserve is left in the finished deltas (received_ok: qemu-img check
# finds no leaked space).
"$PLOOP" send --layers -u "$S2" a >s2layers.stream
for err in ENOSPC 95; do # 95: EOPNOTSUPP
  rm -rf k
  run env PLOOP_FAULT="failfrom=allocate:1:$err" "$PLOOP" receive k <s2layers.stream
  [[ $RC == 0 ]] || { _show "receive, allocate failing with $err"; fail "exit $RC"; }
  received_ok k
  run env PLOOP_FAULT="failfrom=allocate:1:$err" bash -c \
    "set -o pipefail; '$PLOOP' send --layers -u '$S3' --from '$S2' a | '$PLOOP' receive k"
  [[ $RC == 0 ]] || { _show "incremental receive, allocate failing with $err"; fail "exit $RC"; }
  assert_eq "$(files_of k)" "$want" "delta files received without reserving ($err)"
  received_ok k
done
for n in 2 9 27; do
  rm -rf k
  run env PLOOP_FAULT="failfrom=write:$n:ENOSPC" "$PLOOP" receive k <s2layers.stream
  [[ $RC == 11 ]] || { _show "receive, writes failing from the ${n}th"; fail "exit $RC, expected 11"; }
  [[ $(wc -l <"$TMP/.err") == 1 ]] || fail "receive printed more than one line: $ERR"
  err_has "No space left on device"
  assert_absent k/DiskDescriptor.xml
  expect_ok "$PLOOP" receive --token k
  expect_ok bash -c "set -o pipefail; '$PLOOP' send --layers -u '$S2' --resume '$OUT' a | '$PLOOP' receive --resume k"
  "$PLOOP" send --layers -u "$S3" --from "$S2" a | "$PLOOP" receive k >/dev/null || fail "incremental after a full disk"
  assert_eq "$(files_of k)" "$want" "delta files after a full disk at write $n"
  received_ok k
done

note "receive --abort discards a partial receive"
rm -rf k
{ "$PLOOP" send --layers -u "$S2" a 2>/dev/null || true; } | head -c 300000 >part.stream
expect_error 11 "$PLOOP" receive k <part.stream
pl receive --abort k
[[ -z $(ls -A k) ]] || fail "abort left files: $(ls -A k)"
expect_error 3 "$PLOOP" receive --token k

# --- bad streams -------------------------------------------------------------------------
note "bad streams are refused with their exit codes"
"$PLOOP" send -u "$S1" a >s1.stream
"$PLOOP" send -u "$S2" --from "$S1" a >s12.stream
head -c 100000 /dev/urandom >garbage.stream
expect_error 5 "$PLOOP" receive bad1 <garbage.stream
err_has "not a ploop stream"
head -c 50 s1.stream >short.stream
expect_error 5 "$PLOOP" receive bad2 <short.stream
assert_absent bad2/ploop-receive.state
# Version 1 (an older ploop's, SHA-256 per cluster) and a future version.
for version in 1 3; do
  cp s1.stream version.stream
  put_u32 version.stream 8 $version
  expect_error 6 "$PLOOP" receive bad3 <version.stream
  err_has "stream version $version"
done
cp s1.stream flip.stream
size=$(file_size s1.stream)
flip_at=$((size / 2))
byte=$(od -An -tu1 -j "$flip_at" -N1 flip.stream | tr -d ' ')
put_bytes flip.stream "$flip_at" "$(printf '\\x%02x' $((byte ^ 4)))"
expect_error 11 "$PLOOP" receive bad4 <flip.stream
# Caught by the chunk's SHA-256, before lz4 decodes the payload.
err_has "digest mismatch"
assert_absent bad4/DiskDescriptor.xml
head -c $((size - 10)) s1.stream >cut.stream
expect_error 11 "$PLOOP" receive bad5 <cut.stream
assert_absent bad5/DiskDescriptor.xml
{ cat s1.stream; printf x; } >long.stream
expect_error 11 "$PLOOP" receive bad6 <long.stream
err_has "after the end of the stream"
assert_absent bad6/DiskDescriptor.xml
# An incremental stream without its base, into a disk without it, and a
# base with the same GUID but other content.
expect_error 3 "$PLOOP" receive bad7 <s12.stream
disk_init other 48M 64K
dio other "write -P 0x99 0 4096"
expect_error 3 "$PLOOP" receive other <s12.stream
err_has "is not in other"
# hostB's disk has a snapshot named S1 too, of another disk.
expect_error 10 "$PLOOP" receive hostB/ct <s12.stream
pl snapshot -u "$S1" other
before=$(folder_stamps other)
expect_error 10 "$PLOOP" receive other <s12.stream
err_has "differs from the sender"
assert_eq "$(folder_stamps other)" "$before" "the disk after a refused incremental stream"
# A full stream into a folder that holds a disk.
before=$(folder_stamps b)
expect_error 4 "$PLOOP" receive b <s1.stream
assert_eq "$(folder_stamps b)" "$before" "the disk after a refused full stream"
# A continuation without --resume, and a fresh stream with --resume.
head -c 200000 s1.stream >part.stream
expect_error 11 "$PLOOP" receive bad8 <part.stream
"$PLOOP" send -u "$S1" --resume "$("$PLOOP" receive --token bad8)" a >cont.stream
expect_error 2 "$PLOOP" receive bad9 <cont.stream
assert_absent bad9/ploop-receive.state
expect_error 11 "$PLOOP" receive --resume bad8 <s1.stream
err_has "starts from the beginning"
pl receive --resume bad8 <cont.stream
same_snapshot a bad8 "$S1"
# send refuses a base that is not an ancestor.
expect_error 2 "$PLOOP" send -u "$S1" --from "$S2" a

note "a delta cut short under the sender: one line and an error code, not a crash"
# Only a writer ignoring the reader locks can do this. The sender maps the
# deltas; depending on how far it got it meets the short files as a short
# pread or a BAT past the end (exit 5), or as SIGBUS or EFAULT on its
# mapping (exit 7) -- never a "Bus error" core dump. The FIFO holds the
# sender back: the first bytes read (the header: the chain is open, the
# data mapped) then nothing until the files were cut.
cp -r a trunc
mkfifo trunc.fifo
"$PLOOP" send trunc >trunc.fifo 2>trunc.err &
sender=$!
exec 3<trunc.fifo
head -c 1 <&3 >/dev/null
for f in trunc/root.hds*; do truncate -s $((64 * KiB)) "$f"; done
cat <&3 >/dev/null
exec 3<&-
set +e
wait "$sender"
rc=$?
set -e
[[ $rc == 5 || $rc == 7 ]] || fail "send of a cut delta: exit code $rc, expected 5 or 7: $(<trunc.err)"
[[ $(wc -l <trunc.err) == 1 && $(<trunc.err) == "ploop send: "* ]] ||
  fail "send of a cut delta: not one line of error: $(<trunc.err)"
echo "  the sender said: $(<trunc.err) (exit $rc)"

note "progress: JSON lines on request, quiet otherwise"
run bash -c "'$PLOOP' send --progress=json -u '$S1' a | '$PLOOP' receive --progress=json p"
[[ $RC == 0 ]] || { _show; fail "send | receive with --progress=json"; }
grep -q '"phase":"transfer","done_bytes":[0-9]*,"total_bytes":[0-9]*' "$TMP/.err" ||
  fail "no JSON progress lines: $ERR"
last=$(grep '"phase":"transfer"' "$TMP/.err" | tail -1)
[[ $last =~ \"done_bytes\":([0-9]+),\"total_bytes\":([0-9]+) ]] || fail "bad progress line: $last"
assert_eq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "progress at the end"
expect_ok bash -c "'$PLOOP' send -u '$S1' a | '$PLOOP' receive q"
[[ -z $ERR ]] || fail "progress output without a terminal: $ERR"

echo "PASS"
