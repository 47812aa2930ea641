#!/usr/bin/env bash
# Merge benchmark: `ploop snapshot-merge` of a snapshot's changes into its
# base, against `qemu-img commit` of a qcow2 overlay holding the same
# changes over the same base content, measured in the same run, several
# rounds, median ratio printed. Also times `ploop snapshot` on a fresh
# 1 GiB and a fresh 64 GiB disk (the same work: it should not depend on
# the disk size). Not a test: it fails only on a wrong result (a merged
# disk that differs from qemu-img's committed one), never on a slow one.
#
# The data (SCALE=full; SCALE=small divides every size by 4):
#   base      a 4 GiB disk with about 2 GiB of random data in runs of 48
#             MiB (48 MiB data, 48 MiB hole, ...);
#   changes   1 GiB of random data in 1 MiB clusters, in 64 runs of 16
#             clusters spread over the whole disk (one run per 64 MiB, at
#             varying places), so some overwrite base data, some fill base
#             holes and some straddle both.
# The data are deterministic (AES-CTR keystreams from openssl), so every
# run and machine merges the same bytes.
#
# The two setups (built once, copied before every round, not timed):
#   ploop     `ploop import` of the base as a raw file (1 MiB clusters),
#             `ploop restore-descriptor`, `ploop snapshot`, then one
#             `ploop io` session writing the changes into the new top
#             ('write -f FILE OFF' per run). Timed: `ploop snapshot-merge`
#             (the top into the base; durable when it returns: data synced
#             before the BAT, then the descriptor saved atomically).
#   qemu-img  the base as a raw file and a qcow2 overlay on it
#             (cluster_size=1M) written by one qemu-io session with the
#             same data at the same offsets. Timed: `qemu-img commit -t
#             writeback` (writeback is also the default: qemu flushes the
#             base with fdatasync when it closes it, so the commit is
#             durable when it returns). Without -d, qemu-img then empties
#             the overlay, giving its 1 GiB back to the file system, as
#             ploop's merge does by removing the merged delta file (each
#             costs ~0.15 s here; `commit -d`, which keeps the overlay's
#             data, is that much faster).
# For both, a `sync FILE` of the merged file right after is timed too and
# reported separately (it should be ~0: both are durable already).
#
# Every timed command starts in the same state: nothing dirty (sync), the
# page cache dropped (CACHE=cold, the default when /proc/sys/vm/drop_caches
# is writable; CACHE=warm leaves it), and both programs' binaries loaded
# once so neither pays for reading its own executable. Rounds alternate
# which tool goes first.
#
# Environment:
#   PLOOP      ploop binary (default: build/tools/ploop under the repo root)
#   BENCH_DIR  work directory on a real disk, not tmpfs (default: a new
#              directory in the ploop binary's build directory, removed at
#              the end); needs about 12 GiB free at SCALE=full
#   SCALE      full (default) or small (a 1 GiB disk, 256 MiB of changes)
#   ROUNDS     merge rounds (default 3)
#   SNAP_ROUNDS  snapshot-create rounds per disk size (default 5)
#   CACHE      cold or warm (see above)
#   KEEP       1 keeps BENCH_DIR and its files
#
# Exit status: 0; 1 when a merged disk differs from qemu-img's; 2 on a bad
# setting; 77 when qemu-img, qemu-io, openssl or the ploop binary is missing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ploop="${PLOOP:-$repo_root/build/tools/ploop}"
rounds="${ROUNDS:-3}"
snap_rounds="${SNAP_ROUNDS:-5}"
scale="${SCALE:-full}"
seed="${SEED:-20240612}"

die() {
  echo "merge_bench: $*" >&2
  exit 2
}

if [[ ! -x "$ploop" ]]; then
  echo "merge_bench: no ploop binary at $ploop (set PLOOP)" >&2
  exit 77
fi
ploop="$(cd "$(dirname "$ploop")" && pwd)/$(basename "$ploop")"
for tool in qemu-img qemu-io openssl; do
  if ! command -v "$tool" >/dev/null; then
    echo "merge_bench: $tool not found" >&2
    exit 77
  fi
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive number"
[[ "$snap_rounds" =~ ^[1-9][0-9]*$ ]] || die "SNAP_ROUNDS must be a positive number"

case "$scale" in
  full) disk_mib=4096 ;;
  small) disk_mib=1024 ;;
  *) die "SCALE must be full or small" ;;
esac
base_run_mib=48                  # base: data and holes alternate in runs of this
change_run_mib=16                # changes: runs of this many 1 MiB clusters
change_mib=$((disk_mib / 4))     # 1 GiB at SCALE=full
change_runs=$((change_mib / change_run_mib))
stride_mib=$((disk_mib / change_runs))

# --- work directory -------------------------------------------------------

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/merge-bench.XXXXXX")"
  own_dir=1
fi
dir="$(cd "$dir" && pwd)"
fs_type="$(stat -f -c %T "$dir")"
if [[ "$fs_type" == tmpfs || "$fs_type" == ramfs ]]; then
  die "$dir is on $fs_type; set BENCH_DIR to a disk file system"
fi
mount_fs="$(df --output=fstype "$dir" 2>/dev/null | tail -1 || true)"
need_kib=$(((disk_mib * 5 / 2 + change_mib * 5) * 1024 + 1024 * 1024))
avail_kib="$(df --output=avail -k "$dir" | tail -1 | tr -d ' ')"
((avail_kib > need_kib)) || die "$dir has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

cleanup() {
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "kept $dir"
    return
  fi
  rm -rf "${dir:?}/src" "$dir/ploop" "$dir/qemu" "$dir/w-ploop" "$dir/w-qemu" "$dir/snap"
  if ((own_dir)); then rmdir "$dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

# --- cache control and timing ---------------------------------------------

cache="${CACHE:-}"
if [[ -z "$cache" ]]; then
  if [[ -w /proc/sys/vm/drop_caches ]]; then cache=cold; else cache=warm; fi
fi
case "$cache" in
  cold) [[ -w /proc/sys/vm/drop_caches ]] || die "CACHE=cold needs a writable /proc/sys/vm/drop_caches" ;;
  warm) ;;
  *) die "CACHE must be cold or warm" ;;
esac

# The state before every timed merge: nothing dirty, the page cache
# dropped (cold), both binaries loaded.
prepare() {
  sync
  if [[ "$cache" == cold ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
  "$ploop" --version >/dev/null
  qemu-img --version >/dev/null
}

# timed CMD...: runs CMD and prints its elapsed seconds (CMD's output goes
# to stderr).
timed() {
  local t0 t1
  t0=$EPOCHREALTIME
  "$@" >&2
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

median() { sort -g | awk '{ v[NR] = $1 } END {
  if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

# --- data -----------------------------------------------------------------

# keystream NAME: an endless deterministic pseudo-random byte stream.
keystream() {
  openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:ploop-merge-bench-$seed-$1" </dev/zero \
    2>/dev/null
}

# The change runs, one a line: "START_MIB COUNT_MIB".
change_layout() {
  local k
  for ((k = 0; k < change_runs; k++)); do
    echo "$((k * stride_mib + (k * 37) % (stride_mib - change_run_mib + 1))) $change_run_mib"
  done
}

make_data() {
  local start count k=0
  mkdir -p "$dir/src/chg"
  echo "creating the base ($disk_mib MiB disk) and $change_mib MiB of changes in $dir/src ..."
  truncate -s "${disk_mib}M" "$dir/src/base.raw"
  # Base: data runs at 0, 2*run, 4*run, ... MiB.
  for ((start = 0; start < disk_mib; start += 2 * base_run_mib)); do
    count=$((disk_mib - start < base_run_mib ? disk_mib - start : base_run_mib))
    dd of="$dir/src/base.raw" bs=1M seek="$start" count="$count" iflag=fullblock conv=notrunc \
      status=none
  done < <(keystream base)
  while read -r -u 3 start count; do
    dd of="$dir/src/chg/$k.bin" bs=1M count="$count" iflag=fullblock status=none
    echo "$k $start $count" >>"$dir/src/chg/layout"
    k=$((k + 1))
  done 3< <(change_layout) < <(keystream changes)
}

# --- the two setups (copied before every round) ---------------------------

make_setups() {
  local k start count io=() qio=()
  echo "building the ploop disk (import, restore-descriptor, snapshot, io) ..."
  mkdir "$dir/ploop"
  "$ploop" import -b 1M "$dir/src/base.raw" "$dir/ploop/root.hds"
  "$ploop" restore-descriptor "$dir/ploop" "$dir/ploop/root.hds" >/dev/null
  "$ploop" snapshot "$dir/ploop" >/dev/null
  while read -r k start count; do
    io+=("write -f $dir/src/chg/$k.bin $((start << 20))")
    qio+=(-c "write -q -s $dir/src/chg/$k.bin $((start << 20)) $((count << 20))")
  done <"$dir/src/chg/layout"
  "$ploop" io "$dir/ploop" "${io[@]}" >/dev/null

  echo "building the qemu overlay (raw base, qcow2 overlay, qemu-io) ..."
  mkdir "$dir/qemu"
  cp --sparse=always "$dir/src/base.raw" "$dir/qemu/base.raw"
  qemu-img create -q -f qcow2 -o cluster_size=1M -b base.raw -F raw "$dir/qemu/ov.qcow2" \
    "${disk_mib}M"
  qemu-io -f qcow2 "${qio[@]}" "$dir/qemu/ov.qcow2" >/dev/null

  # Both setups show the same disk before the merge.
  "$ploop" export "$dir/ploop" "$dir/src/view.raw"
  if ! qemu-img compare -q -f qcow2 "$dir/qemu/ov.qcow2" -F raw "$dir/src/view.raw"; then
    echo "merge_bench: the ploop disk and the qemu overlay differ before the merge" >&2
    exit 1
  fi
  rm -f "$dir/src/view.raw"
}

# --- merge rounds -----------------------------------------------------------

run_ploop() { "$ploop" snapshot-merge "$dir/w-ploop"; }
run_qemu() { qemu-img commit -q -t writeback "$dir/w-qemu/ov.qcow2"; }

verify_round() {
  local n
  # The merged disk is one delta, check-clean, and holds what qemu-img's
  # committed base holds.
  n="$("$ploop" snapshot-list --json "$dir/w-ploop" | grep -c '"guid"')"
  [[ "$n" == 1 ]] || { echo "merge_bench: $n deltas after the merge" >&2; exit 1; }
  "$ploop" check "$dir/w-ploop" >/dev/null ||
    { echo "merge_bench: ploop check fails after the merge" >&2; exit 1; }
  if ! qemu-img compare -q -f parallels "$dir/w-ploop/root.hds" -F raw "$dir/w-qemu/base.raw"; then
    echo "merge_bench: the merged ploop disk differs from qemu-img's committed base" >&2
    exit 1
  fi
}

make_data
base_data_mib=$(($(du -B1M "$dir/src/base.raw" | cut -f1)))
make_setups
rm -rf "$dir/src/chg"

echo
echo "ploop: $ploop"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "file system: $fs_type ($mount_fs) at $dir; cache: $cache; $(nproc) CPUs;" \
  "scale: $scale; rounds: $rounds"
echo "disk ${disk_mib} MiB, base data ${base_data_mib} MiB allocated, changes ${change_mib} MiB" \
  "in $change_runs runs of $change_run_mib x 1 MiB clusters"
echo "ploop delta sizes: $(du -B1M "$dir"/ploop/root.hds* | awk '{ printf "%s MiB ", $1 }');" \
  "qemu overlay: $(du -B1M "$dir/qemu/ov.qcow2" | cut -f1) MiB"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

t_p=() t_q=() ratios=()
printf '%-6s %9s %9s %9s %9s %7s  %s\n' round ploop '+sync' qemu-img '+sync' ratio order
for ((r = 1; r <= rounds; r++)); do
  rm -rf "$dir/w-ploop" "$dir/w-qemu"
  cp -a --sparse=always "$dir/ploop" "$dir/w-ploop"
  cp -a --sparse=always "$dir/qemu" "$dir/w-qemu"
  if ((r % 2)); then order=(ploop qemu); else order=(qemu ploop); fi
  for what in "${order[@]}"; do
    prepare
    if [[ "$what" == ploop ]]; then
      a=$(timed run_ploop)
      sa=$(timed sync "$dir/w-ploop/root.hds")
    else
      b=$(timed run_qemu)
      sb=$(timed sync "$dir/w-qemu/base.raw")
    fi
  done
  verify_round
  t_p+=("$a") t_q+=("$b") ratios+=("$(ratio "$a" "$b")")
  printf '%-6s %8ss %8ss %8ss %8ss %6sx  %s\n' "$r" "$a" "$sa" "$b" "$sb" "${ratios[-1]}" \
    "${order[*]}"
done
rm -rf "$dir/w-ploop" "$dir/w-qemu"
m_p=$(printf '%s\n' "${t_p[@]}" | median)
m_q=$(printf '%s\n' "${t_q[@]}" | median)
m_r=$(printf '%s\n' "${ratios[@]}" | median)

# --- snapshot create ----------------------------------------------------------

echo
echo "snapshot create on fresh expanded disks (1 MiB clusters), $snap_rounds rounds;" \
  "page cache warm, synced before each"
declare -A snap_median
for size in 1G 64G; do
  times=()
  for ((r = 1; r <= snap_rounds; r++)); do
    rm -rf "$dir/snap"
    mkdir "$dir/snap"
    "$ploop" init -t none -s "$size" "$dir/snap/root.hds" >/dev/null
    sync
    times+=("$(timed "$ploop" snapshot "$dir/snap" 2>/dev/null)")
    [[ "$("$ploop" snapshot-list --json "$dir/snap" | grep -c '"guid"')" == 2 ]] ||
      { echo "merge_bench: snapshot did not add a delta" >&2; exit 1; }
  done
  snap_median[$size]=$(printf '%s\n' "${times[@]}" | median)
  echo "  $size: ${times[*]} s; median ${snap_median[$size]} s"
done
rm -rf "$dir/snap"

echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'merge: ploop %.2f s, qemu-img commit %.2f s, ratio %.2fx (target <= 1.0x)\n' \
  "$m_p" "$m_q" "$m_r"
printf 'snapshot create: 1 GiB disk %.3f s, 64 GiB disk %.3f s, ratio %.2fx (target: within noise)\n' \
  "${snap_median[1G]}" "${snap_median[64G]}" "$(ratio "${snap_median[64G]}" "${snap_median[1G]}")"
