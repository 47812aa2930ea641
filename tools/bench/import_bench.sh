#!/usr/bin/env bash
# Import benchmark: `ploop import` against `qemu-img convert -O parallels`
# of the same raw file, measured in the same run, several rounds, median
# ratio printed. Not a test: it never fails on a slow result, only on a wrong
# one (an output that `qemu-img compare` finds different from the source).
#
# The source is a 2 GiB raw file of 1 MiB clusters laid out in runs of 1-16
# clusters: about half random data, a quarter explicit zeros (allocated on
# disk, so both tools must scan them) and a quarter holes. The layout and the
# data are deterministic (seeded LCG, AES-CTR keystream from openssl), so
# every run and every machine imports the same bytes.
#
# Durability: qemu-img convert writes with cache mode "unsafe" by default
# and never flushes, while ploop import makes the image durable before it
# returns. To compare like with like, qemu-img is timed twice per round:
#   qemu-wb    `qemu-img convert -t writeback`: qemu's own durable mode, one
#              flush of the output at the end. This is the reference.
#   qemu+sync  default cache mode followed by `sync FILE` (fsync of the
#              output), reported for information.
#
# Environment:
#   PLOOP      ploop binary (default: build/tools/ploop under the repo root)
#   BENCH_DIR  work directory; must be on a real disk, not tmpfs (default: a
#              new directory in the ploop binary's build directory, removed
#              at the end); needs 5 GiB free
#   ROUNDS     rounds (default 5)
#   SEED       layout and data seed (default 20240611)
#   CACHE      cold: drop the page cache before each timed command, so each
#              reads the source from disk (default when we may write
#              /proc/sys/vm/drop_caches); warm: read the source into the
#              page cache before each timed command
#   KEEP       1 keeps the source file for another run (then BENCH_DIR is
#              not removed)
#
# Exit status: 0, 1 when an output differs from the source, 77 when
# qemu-img or the ploop binary is missing (skipped).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ploop="${PLOOP:-$repo_root/build/tools/ploop}"
[[ "$ploop" == /* ]] || ploop="$PWD/$ploop"
rounds="${ROUNDS:-5}"
size_mib=2048
seed="${SEED:-20240611}"

if [[ ! -x "$ploop" ]]; then
  echo "import_bench: no ploop binary at $ploop (set PLOOP)" >&2
  exit 77
fi
if ! command -v qemu-img >/dev/null; then
  echo "import_bench: qemu-img not found" >&2
  exit 77
fi

# --- work directory -------------------------------------------------------

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  # Next to the binary: the build directory is on the repo's (real) file
  # system and ignored by git.
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/import-bench.XXXXXX")"
  own_dir=1
fi
fs_type="$(stat -f -c %T "$dir")"
if [[ "$fs_type" == tmpfs || "$fs_type" == ramfs ]]; then
  echo "import_bench: $dir is on $fs_type; set BENCH_DIR to a disk file system" >&2
  exit 2
fi
mount_fs="$(df --output=fstype "$dir" 2>/dev/null | tail -1 || true)"
# The source (2 GiB, 1.5 GiB of it allocated) and two outputs of ~1 GiB.
avail_mib="$(df --output=avail -B1M "$dir" | tail -1 | tr -d ' ')"
if [[ ! -f "$dir/src.raw" ]] && ((avail_mib < 5120)); then
  echo "import_bench: $dir has $avail_mib MiB free; 5 GiB are needed" >&2
  exit 2
fi

src="$dir/src.raw"
ours="$dir/dst.hds"
theirs="$dir/dst.qemu-parallels"

cleanup() {
  rm -f "$ours" "$theirs"
  if [[ "${KEEP:-0}" != 1 ]]; then
    rm -f "$src" "$src.layout"
    if ((own_dir)); then rmdir "$dir" 2>/dev/null || true; fi
  fi
}
trap cleanup EXIT

# --- source file ----------------------------------------------------------

# Prints the layout, one run per line: "data|zero|hole START_MIB COUNT".
make_layout() {
  awk -v seed="$seed" -v total="$size_mib" 'BEGIN {
    x = seed % 2147483648
    c = 0
    while (c < total) {
      # Park-Miller LCG: portable and the same in every awk.
      x = (x * 48271) % 2147483647; k = x % 4
      x = (x * 48271) % 2147483647; n = 1 + x % 16
      if (c + n > total) n = total - c
      kind = (k < 2) ? "data" : (k == 2 ? "zero" : "hole")
      print kind, c, n
      c += n
    }
  }'
}

make_source() {
  echo "creating $src ($size_mib MiB, seed $seed) ..."
  rm -f "$src"
  truncate -s "${size_mib}M" "$src"
  make_layout >"$src.layout.tmp"
  # Deterministic pseudo-random bytes: an AES-CTR keystream (random bytes
  # without openssl: the layout stays the same). dd reads exactly COUNT full
  # blocks from the shared stream for each data run.
  local stream=(cat /dev/urandom)
  if command -v openssl >/dev/null; then
    stream=(openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:ploop-bench-$seed" -in /dev/zero)
  fi
  while read -r -u 3 kind start count; do
    case "$kind" in
      data)
        dd of="$src" bs=1M seek="$start" count="$count" iflag=fullblock conv=notrunc \
          status=none
        ;;
      zero)
        dd if=/dev/zero of="$src" bs=1M seek="$start" count="$count" conv=notrunc \
          status=none </dev/null
        ;;
    esac
  done 3<"$src.layout.tmp" < <("${stream[@]}" 2>/dev/null)
  sync "$src"
  mv "$src.layout.tmp" "$src.layout"
}

if [[ ! -f "$src" || ! -f "$src.layout" ]] ||
  [[ "$(stat -c %s "$src")" != $((size_mib << 20)) ]]; then
  make_source
fi
read -r n_data n_zero n_hole < <(awk '{ n[$1] += $3 } END {
  print n["data"] + 0, n["zero"] + 0, n["hole"] + 0 }' "$src.layout")
echo "source: $src, $size_mib MiB: $n_data MiB random data, $n_zero MiB explicit zeros," \
  "$n_hole MiB holes; allocated $(du -B1M "$src" | cut -f1) MiB"

# --- cache control --------------------------------------------------------

cache="${CACHE:-}"
if [[ -z "$cache" ]]; then
  if [[ -w /proc/sys/vm/drop_caches ]]; then cache=cold; else cache=warm; fi
fi
case "$cache" in
  cold)
    [[ -w /proc/sys/vm/drop_caches ]] || {
      echo "import_bench: CACHE=cold needs a writable /proc/sys/vm/drop_caches" >&2
      exit 2
    }
    ;;
  warm) ;;
  *)
    echo "import_bench: CACHE must be cold or warm" >&2
    exit 2
    ;;
esac

# Puts the machine in the same state before every timed command: no output
# file, nothing dirty waiting for writeback, the source either out of the
# page cache (cold) or fully in it (warm), and both programs loaded, so
# neither pays for reading its own executable and libraries.
prepare() {
  rm -f "$ours" "$theirs"
  sync
  if [[ "$cache" == cold ]]; then
    echo 3 >/proc/sys/vm/drop_caches
  else
    cat "$src" >/dev/null
  fi
  "$ploop" --version >/dev/null
  qemu-img --version >/dev/null
}

# --- timed commands -------------------------------------------------------

run_ploop() { "$ploop" import -f expanded -b 1M "$src" "$ours"; }
run_qemu_wb() { qemu-img convert -f raw -O parallels -t writeback "$src" "$theirs"; }
run_qemu_sync() {
  qemu-img convert -f raw -O parallels "$src" "$theirs"
  sync "$theirs"
}

# Runs "$@" once after prepare() and prints the elapsed seconds.
timed() {
  prepare
  local t0 t1
  t0=$EPOCHREALTIME
  "$@"
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

verify() {
  local fmt="$1" file="$2"
  if ! qemu-img compare -q -f raw -F "$fmt" "$src" "$file"; then
    echo "import_bench: $file differs from the source" >&2
    exit 1
  fi
}

# Other work on the machine only ever adds time, so the best round is also
# printed: less noisy than the median when the machine is shared.
best() { sort -g | head -1; }
median() { sort -g | awk '{ v[NR] = $1 } END {
  if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "ploop: $ploop"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "file system: $fs_type ($mount_fs) at $dir; cache: $cache source;" \
  "$(nproc) CPUs; rounds: $rounds"
# Other work on the machine shows up as noise; the load says how much.
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

t_ours=() t_wb=() t_sync=() ratios=() ratios_sync=()
alloc_ours=0 alloc_theirs=0
printf '%-6s %9s %9s %10s %7s %7s  %s\n' round ploop qemu-wb qemu+sync ratio r/sync order
for ((r = 1; r <= rounds; r++)); do
  # Rotate the order so neither tool always runs first (or right after the
  # other's writeback).
  case $((r % 3)) in
    1) order=(ours wb sync) ;;
    2) order=(wb sync ours) ;;
    0) order=(sync ours wb) ;;
  esac
  for what in "${order[@]}"; do
    case "$what" in
      ours)
        a=$(timed run_ploop)
        verify parallels "$ours"
        alloc_ours=$(stat -c %b*%B "$ours")
        ;;
      wb)
        b=$(timed run_qemu_wb)
        # qemu-img's own output is checked once; it is the reference.
        if ((r == 1)); then verify parallels "$theirs"; fi
        alloc_theirs=$(stat -c %b*%B "$theirs")
        ;;
      sync) c=$(timed run_qemu_sync) ;;
    esac
  done
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", a / b }')
  ratio_sync=$(awk -v a="$a" -v c="$c" 'BEGIN { printf "%.3f", a / c }')
  t_ours+=("$a") t_wb+=("$b") t_sync+=("$c") ratios+=("$ratio") ratios_sync+=("$ratio_sync")
  printf '%-6s %8ss %8ss %9ss %6sx %6sx  %s\n' "$r" "$a" "$b" "$c" "$ratio" "$ratio_sync" \
    "${order[*]}"
done
rm -f "$ours" "$theirs"

m_ours=$(printf '%s\n' "${t_ours[@]}" | median)
m_wb=$(printf '%s\n' "${t_wb[@]}" | median)
m_sync=$(printf '%s\n' "${t_sync[@]}" | median)
m_ratio=$(printf '%s\n' "${ratios[@]}" | median)
m_ratio_sync=$(printf '%s\n' "${ratios_sync[@]}" | median)
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "allocated: ploop $((alloc_ours)) bytes, qemu-img $((alloc_theirs)) bytes"
b_ours=$(printf '%s\n' "${t_ours[@]}" | best)
b_wb=$(printf '%s\n' "${t_wb[@]}" | best)
b_sync=$(printf '%s\n' "${t_sync[@]}" | best)
echo "best: ploop ${b_ours} s, qemu-img -t writeback ${b_wb} s" \
  "(ratio $(awk -v a="$b_ours" -v b="$b_wb" 'BEGIN { printf "%.3f", a / b }')x)," \
  "qemu-img + sync ${b_sync} s" \
  "(ratio $(awk -v a="$b_ours" -v b="$b_sync" 'BEGIN { printf "%.3f", a / b }')x)"
echo "median: ploop ${m_ours} s, qemu-img -t writeback ${m_wb} s," \
  "qemu-img + sync ${m_sync} s (median ratio ${m_ratio_sync}x)"
printf 'import: ploop %.2f s, qemu-img %.2f s, ratio %.2fx (target <= 1.0x)\n' \
  "$m_ours" "$m_wb" "$m_ratio"
