#!/usr/bin/env bash
# Writing through `ploop serve`, and stopping it every way it can stop:
#  - qemu-io writes, zeroes and discards through the export land in the
#    top delta only: the disk reads back as the model, the snapshot's delta
#    is byte-for-byte unchanged, and every delta passes qemu-img check;
#  - SIGTERM and SIGINT close the disk cleanly (no in-use mark), also while
#    a client is still connected and idle;
#  - `-r` refuses writes and leaves every file untouched;
#  - kill -9 of nbdkit leaves the disk marked in use; ploop serve says so
#    (exit 7); data flushed before the kill is there, and the next writable
#    open repairs the mark;
#  - kill -9 of ploop serve itself: nbdkit still closes the disk cleanly.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img qemu-io nbdkit nbdinfo

DD=d/DiskDescriptor.xml
SOCK=$TMP/d.sock
U=$(nbd_uri "$SOCK")

# nio IOCMD...: run qemu-io commands through the export and on the model.
nio() {
  local cmd qargs=() rargs=()
  for cmd in "$@"; do
    qargs+=(-c "$cmd")
    [[ $cmd == discard* ]] && cmd="write -z ${cmd#discard }"
    rargs+=(-c "$cmd")
  done
  expect_ok qemu-io -f raw "${qargs[@]}" "$U"
  grep -q 'verification failed' "$TMP/.out" && fail "qemu-io through the export: $OUT"
  expect_ok qemu-io -f raw "${rargs[@]}" d.ref/top.raw
}

note "a disk with a snapshot below the top"
disk_init d 64M 1M
dio d 'write -P 0x11 0 2M' 'write -P 0x22 20M 3M' 'write -P 0x33 63M 1M'
dsnap d
base=d/$(file_of d "$SNAP")
base_stamp=$(stamp "$base")

note "writes, zeroes and discards through the export go to the top"
serve_start "$DD" --socket "$SOCK"
out_file=$SERVE_OUT
out_has_rw=$(head -1 "$out_file")
[[ $out_has_rw == *" read-write at $U "* ]] || fail "not served read-write: $out_has_rw"
expect_ok nbdinfo "$U"
out_has "is_read_only: false"
out_has "can_trim: true"
out_has "can_zero: true"
out_has "can_fast_zero: true"
# Partial writes over snapshot data (copy-up), a whole new cluster, zeroes
# and a discard over snapshot data (must hide it), and a flush.
nio 'write -P 0x44 1M 64K' 'write -P 0x55 40M 1M' 'write -z 20M 4K' 'discard 21M 1M' \
  'write -z 63M 1M' 'flush'
# A client sees its writes at once.
nio 'read -P 0x44 1M 64K' 'read -P 0 21M 1M' 'read -P 0x22 20975616 4K'
[[ $(top_dirty "$DD") == yes ]] || fail "the top is not marked in use while written"
serve_stop "$SERVE_PID" "$out_file"
assert_absent "$SOCK"
[[ $(top_dirty "$DD") == no ]] || fail "SIGTERM left the top marked in use"
assert_eq "$(stamp "$base")" "$base_stamp" "the snapshot's delta"
verify_disk d

note "SIGINT with an idle client still connected: the disk is closed cleanly"
serve_start "$DD" --socket "$SOCK"
out_file=$SERVE_OUT
nio 'write -P 0x66 50M 300K'
mkfifo idle.in
exec 7<>idle.in
qemu-io -f raw "$U" <&7 >idle.out 2>&1 &
idle=$!
_bg_pids+=("$idle")
echo 'write -P 0x77 10M 4K' >&7
wait_for_output idle.out 'wrote 4096/4096 bytes at offset 10485760$' "$idle"
serve_stop "$SERVE_PID" "$out_file" INT
[[ $(top_dirty "$DD") == no ]] || fail "SIGINT left the top marked in use"
# The idle client lost its server; it must not have written anything more.
kill_bg "$idle"
exec 7>&-
expect_ok qemu-io -f raw -c 'write -P 0x77 10M 4K' d.ref/top.raw
verify_disk d

note "-r refuses writes and changes no file"
stamps=$(folder_stamps d)
serve_start -r "$DD" --socket "$SOCK"
out_file=$SERVE_OUT
expect_rc 1 qemu-io -f raw -c 'write -P 0x99 0 4K' "$U"
expect_ok qemu-io -r -f raw -c 'read -P 0x44 1M 64K' "$U"
grep -q 'verification failed' "$TMP/.out" && fail "read through -r: $OUT"
serve_stop "$SERVE_PID" "$out_file"
assert_eq "$(folder_stamps d)" "$stamps" "files after serving -r"

note "kill -9 of nbdkit: flushed data survives, the mark is repaired on the next open"
serve_start "$DD" --socket "$SOCK"
server=$SERVE_PID
out_file=$SERVE_OUT
nio 'write -P 0x88 30M 1M' 'write -P 0x89 32506368 1000' 'flush'
kill -KILL "$(nbdkit_of "$server")"
serve_wait_exit "$server"
assert_eq "$RC" 7 "exit code of ploop serve after nbdkit was killed"
grep -q 'before closing the disk' "$out_file" || fail "no word of the unclean stop: $(cat "$out_file")"
[[ $(grep -c '^ploop serve: ' "$out_file") == 1 ]] || fail "not one error line: $(cat "$out_file")"
assert_absent "$SOCK"
[[ $(top_dirty "$DD") == yes ]] || fail "a killed server left the top marked clean"
expect_rc 1 "$PLOOP" check "$DD"
pl io "$DD" 'read -P 0x88 30M 1M' 'read -P 0x89 32506368 1000'
[[ $(top_dirty "$DD") == no ]] || fail "the writable open did not repair the mark"
verify_disk d

note "kill -9 of ploop serve: nbdkit notices and closes the disk cleanly"
serve_start "$DD" --socket "$SOCK"
server=$SERVE_PID
nbdkit=$(nbdkit_of "$server")
nio 'write -P 0xab 45M 2M'
kill_bg "$server"
wait_gone "$nbdkit" "nbdkit after its parent was killed"
[[ $(top_dirty "$DD") == no ]] || fail "nbdkit left the top marked in use after ploop serve died"
rm -f "$SOCK" # nobody was left to remove it
verify_disk d
