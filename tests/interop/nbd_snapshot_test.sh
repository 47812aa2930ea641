#!/usr/bin/env bash
# Serving a snapshot (-u) while another program writes the disk's top: the
# snapshot's chain is opened read-only with shared locks only, so it works
# beside a writer of the top, beside a second server of the same snapshot,
# and beside qemu-img reading the snapshot's delta; it serves exactly the
# snapshot's content; it refuses writes; and serving the top itself while
# the writer holds it is refused (exit 9).
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img qemu-io nbdkit nbdinfo

DD=d/DiskDescriptor.xml
disk_init d 32M 256K
dio d 'write -P 0x11 0 1M' 'write -P 0x22 8M 1M'
dsnap d
s1=$SNAP
dio d 'write -P 0x33 0 512K' 'write -P 0x44 16M 1M'
dsnap d
s2=$SNAP
dio d 'write -P 0x55 8M 256K'

note "another program holds the top for writing"
start_bg holder.out "$PLOOP" io "$DD" 'write -P 0x66 30M 4K' 'flush' 'sleep 120000'
holder=$BG_PID
wait_for_output holder.out '^wrote 4096 bytes' "$holder"

note "serving the top beside it is refused, read-write or read-only"
expect_error 9 "$PLOOP" serve "$DD" --socket "$TMP/top.sock"
err_has 'in use'
assert_absent "$TMP/top.sock"
expect_error 9 "$PLOOP" serve -r "$DD" --socket "$TMP/top.sock"
expect_error 9 "$PLOOP" serve -u "$TOP_GUID" "$DD" --socket "$TMP/top.sock"
assert_absent "$TMP/top.sock"

note "serving snapshot 1 and snapshot 2 beside the writer, and snapshot 2 twice"
serve_start -u "$s1" "$DD" --socket "$TMP/s1.sock"
srv1=$SERVE_PID out1=$SERVE_OUT
[[ $(head -1 "$out1") == *" snapshot $s1 read-only at "* ]] || fail "$(head -1 "$out1")"
serve_start -u "${s2//[\{\}]/}" "$DD" --socket "$TMP/s2.sock" # GUID without braces
srv2=$SERVE_PID out2=$SERVE_OUT
serve_start -u "$s2" "$DD" --socket "$TMP/s2b.sock"
srv3=$SERVE_PID out3=$SERVE_OUT
U1=$(nbd_uri "$TMP/s1.sock")
U2=$(nbd_uri "$TMP/s2.sock")
expect_ok qemu-img compare -f raw "$U1" -F raw "d.ref/$s1.raw"
out_has "Images are identical"
expect_ok qemu-img compare -f raw "$U2" -F raw "d.ref/$s2.raw"
out_has "Images are identical"
expect_ok qemu-img compare -f raw "$(nbd_uri "$TMP/s2b.sock")" -F raw "d.ref/$s2.raw"
out_has "Images are identical"
# qemu-img reading snapshot 1's own delta file at the same time.
qemu_same "d/$(file_of d "$s1")" "d.ref/$s1.raw"
expect_ok nbdinfo "$U1"
out_has "is_read_only: true"

note "a snapshot export refuses writes"
expect_rc 1 qemu-io -f raw -c 'write -P 0x77 0 4K' "$U1"
expect_ok qemu-io -r -f raw -c 'read -P 0x11 0 1M' -c 'read -P 0x22 8M 1M' "$U1"
grep -q 'verification failed' "$TMP/.out" && fail "snapshot 1 reads wrong data: $OUT"

still_running "$holder" "ploop io holding the top"
for s in "$srv1 $out1" "$srv2 $out2" "$srv3 $out3"; do
  # shellcheck disable=SC2086
  serve_stop $s
done
kill_bg "$holder"
# The holder was killed mid-session: the next writable open repairs it.
pl check --repair "$DD"
expect_ok qemu-io -f raw -c 'write -P 0x66 30M 4K' d.ref/top.raw
verify_disk d
