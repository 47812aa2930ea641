#!/usr/bin/env bash
# `ploop serve` read by real NBD clients: qemu-img convert of the export
# equals our own `ploop export`; qemu-img compare finds the served disk and
# the exported raw identical; nbdinfo --map shows holes exactly where no
# delta holds a cluster (so clients copy sparsely); nbdcopy (several
# connections at once) copies it identically; two clients read at once
# while a third holds its connection open; nbdinfo sees the capabilities
# the export promises. The disk is a chain (a snapshot below the top), so
# every read goes through copy-up-free chain lookups.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img qemu-io nbdkit nbdinfo nbdcopy

M=$((1 << 20))
note "a 64 MiB disk, 1 MiB clusters: data in clusters 0, 5, 20-21 (below a snapshot) and 40"
disk_init d 64M 1M
dio d 'write -P 0x11 0 1M' 'write -P 0x22 5M 300K' 'write -P 0x33 20M 2M' 'write -P 0 30M 1M'
dsnap d
dio d 'write -P 0x44 5M 4K' 'write -P 0x55 40M 1M'
pl export d/DiskDescriptor.xml exp.raw
same_disk exp.raw d.ref/top.raw

SOCK=$TMP/d.sock
U=$(nbd_uri "$SOCK")
serve_start -r d/DiskDescriptor.xml --socket "$SOCK"
assert_eq "$(head -1 "$SERVE_OUT")" \
  "Serving d/DiskDescriptor.xml read-only at $U (stop with Ctrl-C or SIGTERM)" "ready line"
server=$SERVE_PID
server_out=$SERVE_OUT

note "nbdinfo: size, read-only, multi-conn, base:allocation"
expect_ok nbdinfo "$U"
out_has "export-size: $((64 * M))"
out_has "is_read_only: true"
out_has "can_multi_conn: true"
out_has "can_flush: true"
out_has "base:allocation"

note "nbdinfo --map: data exactly where a delta holds a cluster, hole+zero elsewhere"
expect_ok nbdinfo --map "$U"
got=$(awk '{ print $1, $2, $3 }' "$TMP/.out")
want=$(printf '%s\n' "0 $M 0" "$M $((4 * M)) 3" "$((5 * M)) $M 0" "$((6 * M)) $((14 * M)) 3" \
  "$((20 * M)) $((2 * M)) 0" "$((22 * M)) $((18 * M)) 3" "$((40 * M)) $M 0" \
  "$((41 * M)) $((23 * M)) 3")
assert_eq "$got" "$want" "allocation map"
grep -q 'hole,zero' "$TMP/.out" || fail "holes are not reported as hole,zero: $OUT"

note "qemu-img convert from the export equals ploop export, and is as sparse"
expect_ok qemu-img convert -f raw "$U" -O raw conv.raw
cmp conv.raw exp.raw || fail "qemu-img convert of the export differs from ploop export"
(($(allocated_bytes conv.raw) <= 5 * M)) ||
  fail "qemu-img convert wrote $(allocated_bytes conv.raw) bytes; the data is 5 MiB"

note "qemu-img compare: the served disk and the exported raw are identical"
expect_ok qemu-img compare -f raw "$U" -F raw exp.raw
out_has "Images are identical"
expect_ok qemu-img compare -f raw "$U" -F raw d.ref/top.raw
out_has "Images are identical"
# And it does see a difference when there is one.
cp exp.raw other.raw
expect_ok qemu-io -f raw -c 'write -P 0x99 33M 512' other.raw
expect_rc 1 qemu-img compare -f raw "$U" -F raw other.raw
out_has "Content mismatch at offset $((33 * M))"

note "nbdcopy (multi-conn: several connections reading at once) copies it identically"
expect_ok nbdcopy "$U" copy.raw
cmp copy.raw exp.raw || fail "nbdcopy copy differs"

note "two clients at once: one holds its connection while others read"
mkfifo holder.in
exec 7<>holder.in # read-write: opening does not wait for the other end
# (not start_bg: a background command without its own redirection reads
# /dev/null)
qemu-io -r -f raw "$U" <&7 >holder.out 2>&1 &
holder=$!
_bg_pids+=("$holder")
echo 'read -P 0x11 0 1M' >&7
wait_for_output holder.out 'read 1048576/1048576 bytes at offset 0$' "$holder"
rm -f copy2.raw copy3.raw
nbdcopy "$U" copy2.raw &
c2=$!
qemu-img convert -f raw "$U" -O raw copy3.raw &
c3=$!
wait "$c2" || fail "nbdcopy beside an open connection failed"
wait "$c3" || fail "qemu-img convert beside an open connection failed"
cmp copy2.raw exp.raw || fail "nbdcopy copy (concurrent) differs"
cmp copy3.raw exp.raw || fail "qemu-img copy (concurrent) differs"
still_running "$holder" "the qemu-io holding a connection"
# One command at a time: qemu-io reads its next line only when stdin
# becomes readable again.
echo 'read -P 0x55 40M 1M' >&7
wait_for_output holder.out 'read 1048576/1048576 bytes at offset 41943040$' "$holder"
echo 'read -P 0x44 5M 4K' >&7
wait_for_output holder.out 'read 4096/4096 bytes at offset 5242880$' "$holder"
echo 'quit' >&7
wait "$holder" || fail "qemu-io holding a connection failed: $(cat holder.out)"
exec 7>&-
grep -q 'verification failed' holder.out && fail "qemu-io read wrong data: $(cat holder.out)"
[[ $(grep -Ec 'read [0-9]+/[0-9]+ bytes' holder.out) == 3 ]] || fail "qemu-io did not do its reads: $(cat holder.out)"

note "a read-only export refuses writes"
expect_rc 1 qemu-io -f raw -c 'write -P 0x66 0 4K' "$U"
grep -Eqi 'permission denied|not permitted|read-only' "$TMP/.out" "$TMP/.err" ||
  fail "no read-only error from qemu-io: $OUT $ERR"

serve_stop "$server" "$server_out"
assert_absent "$SOCK"
verify_disk d
