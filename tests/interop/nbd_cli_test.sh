#!/usr/bin/env bash
# `ploop serve` on the command line: every bad argument or missing piece is
# one line on stderr and its documented exit code, and leaves no socket
# behind; TCP listens on loopback unless told otherwise; a taken port is
# "in use" (exit 9).
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/disk_lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/nbd_lib.sh"
need qemu-img nbdkit nbdinfo

DD=d/DiskDescriptor.xml
disk_init d 16M 1M
dio d 'write -P 0x5c 3M 1M'
dsnap d
S=$TMP/s.sock

note "bad arguments: exit 2"
expect_error 2 "$PLOOP" serve "$DD"
err_has 'one of --socket PATH and --port N'
expect_error 2 "$PLOOP" serve "$DD" --socket "$S" --port 10809
expect_error 2 "$PLOOP" serve "$DD" --socket "$S" --bind 127.0.0.1
err_has '--bind goes with --port'
for p in 0 65536 -1 12ab ''; do
  expect_error 2 "$PLOOP" serve "$DD" --port "$p"
done
expect_error 2 "$PLOOP" serve -u not-a-guid "$DD" --socket "$S"
expect_error 2 "$PLOOP" serve -u "$SNAP" d/root.hds --socket "$S"
err_has 'give its DiskDescriptor.xml'
expect_error 2 "$PLOOP" serve "$DD" --socket "$TMP/$(printf 'x%.0s' {1..120})"
err_has 'longer than'
expect_rc 2 "$PLOOP" serve "$DD" --socket "$S" --bogus
assert_absent "$S"

note "missing things: exit 3"
expect_error 3 "$PLOOP" serve nowhere/DiskDescriptor.xml --socket "$S"
expect_error 3 "$PLOOP" serve -u '{12345678-1234-1234-1234-123456789abc}' "$DD" --socket "$S"
expect_error 3 "$PLOOP" serve "$DD" --socket "$TMP/no-such-dir/s.sock"
mv "d/$(file_of d "$SNAP")" moved
expect_error 3 "$PLOOP" serve -r "$DD" --socket "$S"
mv moved "d/$(file_of d "$SNAP")"
assert_absent "$S"

note "the socket path exists: exit 4, the file untouched"
echo keep >"$S"
expect_error 4 "$PLOOP" serve "$DD" --socket "$S"
assert_eq "$(cat "$S")" keep "the file at the socket path"
rm "$S"

note "not a ploop image: exit 5"
head -c 1M /dev/urandom >junk.hds
expect_error 5 "$PLOOP" serve junk.hds --socket "$S"
assert_absent "$S"

note "nbdkit or the plugin missing: exit 6"
expect_error 6 env PLOOP_NBDKIT=/nonexistent/nbdkit "$PLOOP" serve "$DD" --socket "$S"
err_has 'nbdkit is not installed'
expect_error 6 env PATH=/nonexistent "$PLOOP" serve "$DD" --socket "$S"
expect_error 6 env PLOOP_NBDKIT_PLUGIN=/nonexistent/plugin.so "$PLOOP" serve "$DD" --socket "$S"
assert_absent "$S"

note "a single ploop image (no descriptor) can be served too"
serve_start -r "d/$(file_of d "$SNAP")" --socket "$S"
expect_ok qemu-img compare -f raw "$(nbd_uri "$S")" -F raw "d.ref/$SNAP.raw"
out_has "Images are identical"
serve_stop "$SERVE_PID" "$SERVE_OUT"

note "TCP: loopback by default, and a taken port is exit 9"
# Find a free port: try random ones until the server starts (a port taken
# by someone else is exactly the exit-9 case below).
port=
for _ in $(seq 1 30); do
  p=$((20000 + RANDOM % 40000))
  _serve_n=$((_serve_n + 1))
  SERVE_OUT=$TMP/serve.$_serve_n.out
  start_bg "$SERVE_OUT" "$PLOOP" serve -r "$DD" --port "$p"
  SERVE_PID=$BG_PID
  for ((i = 0; i < 6000; i++)); do
    grep -q '^Serving ' "$SERVE_OUT" && break
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.01
  done
  if grep -q '^Serving ' "$SERVE_OUT"; then
    port=$p
    break
  fi
  wait "$SERVE_PID" || true
done
[[ -n $port ]] || fail "no free TCP port found in 30 tries: $(cat "$SERVE_OUT")"
out_file=$SERVE_OUT
grep -q "at nbd://127.0.0.1:$port/ " "$out_file" || fail "$(cat "$out_file")"
expect_ok nbdinfo --size "nbd://127.0.0.1:$port/"
assert_eq "$OUT" $((16 << 20)) "size over TCP"
expect_ok qemu-img compare -f raw "nbd://127.0.0.1:$port/" -F raw d.ref/top.raw
out_has "Images are identical"
hexport=$(printf '%04X' "$port")
# Listening sockets (state 0A) on our port: only 127.0.0.1 (0100007F).
listeners=$(awk -v p=":$hexport" '$2 ~ p"$" && $4 == "0A" { print $2 }' /proc/net/tcp /proc/net/tcp6)
assert_eq "$listeners" "0100007F:$hexport" "addresses listening on port $port"
expect_error 9 "$PLOOP" serve -r "$DD" --port "$port"
err_has "port $port on 127.0.0.1 is already in use"
serve_stop "$SERVE_PID" "$out_file"

note "--bind chooses the address"
serve_start -r "$DD" --port "$port" --bind 127.0.0.2
grep -q "at nbd://127.0.0.2:$port/ " "$SERVE_OUT" || fail "$(cat "$SERVE_OUT")"
expect_ok nbdinfo --size "nbd://127.0.0.2:$port/"
expect_rc 1 nbdinfo --size "nbd://127.0.0.1:$port/"
serve_stop "$SERVE_PID" "$SERVE_OUT"
