#!/usr/bin/env bash
# NBD export benchmark: `ploop serve` against `qemu-nbd -f parallels`
# serving the same ploop image, measured in the same run, several rounds
# with the order alternated, median ratios printed. Not a test: it never
# fails on a slow result, only on a wrong one (a copy that differs).
#
# Two jobs, both driven by nbdcopy (several connections, requests in
# flight, sparse-aware through block status):
#   read   nbdcopy SERVER -> null: of a disk holding SIZE/2 of random data
#          in runs of 1-16 MiB, the rest holes (both servers report holes);
#   write  nbdcopy src.raw -> SERVER, --flush, into a fresh empty image of
#          the same geometry (both servers allocate clusters as data
#          arrives).
# Ratio = ploop's time / qemu-nbd's time: below 1.0 we are faster. The
# image is the page cache's (warm): this measures the servers, not the disk.
#
# Environment:
#   PLOOP      ploop binary (default: build/tools/ploop under the repo root)
#   BENCH_DIR  work directory on a real disk (default: a new directory in
#              the build directory, removed at the end)
#   SIZE_MIB   disk size (default 1024)
#   ROUNDS     rounds (default 5)
#
# Exit status: 0; 1 when a copy differs; 77 when nbdkit, nbdcopy, qemu-nbd,
# qemu-img or the ploop binary is missing (skipped).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ploop="${PLOOP:-$repo_root/build/tools/ploop}"
[[ "$ploop" == /* ]] || ploop="$PWD/$ploop"
rounds="${ROUNDS:-5}"
size_mib="${SIZE_MIB:-1024}"

[[ -x "$ploop" ]] || {
  echo "nbd_bench: no ploop binary at $ploop (set PLOOP)" >&2
  exit 77
}
for tool in nbdkit nbdcopy qemu-nbd qemu-img; do
  command -v "$tool" >/dev/null || {
    echo "nbd_bench: $tool not found" >&2
    exit 77
  }
done

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/nbd-bench.XXXXXX")"
  own_dir=1
fi
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$dir/src.raw" "$dir/disk" "$dir/fresh" "$dir"/*.sock "$dir"/*.out "$dir/back.raw" \
    "$dir/layout" "$dir/qemu.pid"
  if ((own_dir)); then rmdir "$dir" 2>/dev/null || true; fi
}
trap cleanup EXIT
cd "$dir"

# --- the disk -------------------------------------------------------------

echo "creating a $size_mib MiB disk, about half of it random data ..."
truncate -s "${size_mib}M" src.raw
awk -v total="$size_mib" 'BEGIN { x = 20240611; c = 0
  while (c < total) { x = (x * 48271) % 2147483647; n = 1 + x % 16
    if (c + n > total) n = total - c
    print c, n
    c += 2 * n } }' >layout
stream=(cat /dev/urandom)
if command -v openssl >/dev/null; then
  stream=(openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass pass:ploop-nbd-bench -in /dev/zero)
fi
while read -r -u 3 start count; do
  dd of=src.raw bs=1M seek="$start" count="$count" iflag=fullblock conv=notrunc status=none
done 3<layout < <("${stream[@]}" 2>/dev/null)
mkdir disk
"$ploop" import src.raw disk/root.hds >/dev/null
"$ploop" restore-descriptor disk disk/root.hds >/dev/null
echo "data: $(awk '{ n += $2 } END { print n }' layout) MiB in $(wc -l <layout) runs"
cat src.raw disk/root.hds >/dev/null # warm

# --- servers ---------------------------------------------------------------

# start_ploop ARGS...: ploop serve ARGS on ploop.sock; waits until ready.
start_ploop() {
  rm -f ploop.sock
  "$ploop" serve "$@" --socket "$dir/ploop.sock" >ploop.out 2>&1 &
  server_pid=$!
  until grep -q '^Serving ' ploop.out; do
    kill -0 "$server_pid" 2>/dev/null || {
      echo "nbd_bench: ploop serve failed: $(cat ploop.out)" >&2
      exit 1
    }
    sleep 0.01
  done
}
# start_qemu ARGS...: qemu-nbd ARGS on qemu.sock; waits until ready.
start_qemu() {
  rm -f qemu.sock
  qemu-nbd --fork --persistent --shared=8 --pid-file="$dir/qemu.pid" -k "$dir/qemu.sock" "$@"
  server_pid=$(cat qemu.pid)
}
stop_server() {
  kill "$server_pid"
  while kill -0 "$server_pid" 2>/dev/null; do sleep 0.01; done
  server_pid=
}

seconds() { # CMD...: run it, print the elapsed seconds
  local t0 t1
  t0=$EPOCHREALTIME
  "$@"
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

read_ploop() {
  start_ploop -r disk
  seconds nbdcopy "nbd+unix:///?socket=$dir/ploop.sock" null:
  stop_server
}
read_qemu() {
  start_qemu -r -f parallels disk/root.hds
  seconds nbdcopy "nbd+unix:///?socket=$dir/qemu.sock" null:
  stop_server
}
fresh() { # FORMAT-specific empty image in fresh/
  rm -rf fresh
  mkdir fresh
  "$ploop" init -s "${size_mib}M" -t none fresh/root.hds >/dev/null
}
write_ploop() {
  fresh
  start_ploop fresh
  seconds nbdcopy --flush src.raw "nbd+unix:///?socket=$dir/ploop.sock"
  stop_server
}
write_qemu() {
  fresh
  start_qemu -f parallels --cache=writeback fresh/root.hds
  seconds nbdcopy --flush src.raw "nbd+unix:///?socket=$dir/qemu.sock"
  stop_server
}
check_fresh() { # the last write landed intact
  "$ploop" export fresh back.raw
  cmp -s back.raw src.raw || {
    echo "nbd_bench: the image written through $1 differs from the source" >&2
    exit 1
  }
  rm -f back.raw
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -a r_ours r_qemu w_ours w_qemu
for ((i = 1; i <= rounds; i++)); do
  if ((i % 2)); then
    r_ours+=("$(read_ploop)")
    r_qemu+=("$(read_qemu)")
    w_qemu+=("$(write_qemu)")
    check_fresh qemu-nbd
    w_ours+=("$(write_ploop)")
    check_fresh "ploop serve"
  else
    r_qemu+=("$(read_qemu)")
    r_ours+=("$(read_ploop)")
    w_ours+=("$(write_ploop)")
    check_fresh "ploop serve"
    w_qemu+=("$(write_qemu)")
    check_fresh qemu-nbd
  fi
  echo "round $i: read ploop ${r_ours[-1]}s qemu-nbd ${r_qemu[-1]}s;" \
    "write ploop ${w_ours[-1]}s qemu-nbd ${w_qemu[-1]}s"
done
ro=$(printf '%s\n' "${r_ours[@]}" | median)
rq=$(printf '%s\n' "${r_qemu[@]}" | median)
wo=$(printf '%s\n' "${w_ours[@]}" | median)
wq=$(printf '%s\n' "${w_qemu[@]}" | median)
awk -v ro="$ro" -v rq="$rq" -v wo="$wo" -v wq="$wq" -v n="$rounds" 'BEGIN {
  printf "median of %d rounds: read  ploop %.3fs  qemu-nbd %.3fs  ratio %.2f\n", n, ro, rq, ro / rq
  printf "                     write ploop %.3fs  qemu-nbd %.3fs  ratio %.2f\n", wo, wq, wo / wq
}'
