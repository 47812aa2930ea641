#!/usr/bin/env bash
# File system image benchmark: `ploop init --from-dir TREE` (a new expanded
# image with an ext4 holding a copy of TREE, built through libext2fs without
# root) against `mke2fs -t ext4 -d TREE` on a raw file of the same size,
# measured in the same run, several rounds, median ratios of time and of the
# bytes allocated on the host printed. Not a test: it never fails on a slow
# or big result, only on a wrong one (a file system `e2fsck -fn` rejects).
#
# The tree is a copy of the machine's /usr/share (then /usr/lib, if needed):
# whole top-level directories in name order, until it holds at least
# MIN_FILES regular files and MIN_MIB MiB of file data. It is made once in
# the work directory; its counts are printed, since they depend on the
# machine. The virtual disk is twice the tree's allocated size, rounded up to
# a whole GiB.
#
# Durability: `ploop init` makes the image durable before it returns (data,
# then BAT, then the clean flag, then the descriptor). mke2fs 1.47 fsyncs
# its output when it closes it (unix_io flush; the script checks with strace
# when it can and prints what it found); the timed reference still ends with
# `sync FILE`, so it is durable whatever the mke2fs version does. The
# truncate that makes the raw file is timed too: it is part of the job.
#
# Environment:
#   PLOOP      ploop binary (default: build/tools/ploop under the repo root)
#   BENCH_DIR  work directory; must be on a real disk, not tmpfs (default: a
#              new directory in the ploop binary's build directory, removed
#              at the end); needs the tree (~0.5-1 GiB) plus about 4 times it
#              free
#   ROUNDS     rounds (default 3)
#   MIN_FILES  regular files in the tree, at least (default 20000)
#   MIN_MIB    MiB of file data in the tree, at least (default 500)
#   CACHE      cold: drop the page cache before each timed command, so each
#              reads the tree from disk (default when we may write
#              /proc/sys/vm/drop_caches); warm: read the tree into the page
#              cache before each timed command
#   KEEP       1 keeps the tree for another run (then BENCH_DIR is not
#              removed)
#
# Exit status: 0, 1 when e2fsck rejects an output or a command fails, 77
# when mke2fs, e2fsck or the ploop binary is missing (skipped).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ploop="${PLOOP:-$repo_root/build/tools/ploop}"
[[ "$ploop" == /* ]] || ploop="$PWD/$ploop"
rounds="${ROUNDS:-3}"
min_files="${MIN_FILES:-20000}"
min_mib="${MIN_MIB:-500}"
PATH="$PATH:/sbin:/usr/sbin"

if [[ ! -x "$ploop" ]]; then
  echo "fsimage_bench: no ploop binary at $ploop (set PLOOP)" >&2
  exit 77
fi
for tool in mke2fs e2fsck; do
  if ! command -v "$tool" >/dev/null; then
    echo "fsimage_bench: $tool not found" >&2
    exit 77
  fi
done

# --- work directory -------------------------------------------------------

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  # Next to the binary: the build directory is on the repo's (real) file
  # system and ignored by git.
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/fsimage-bench.XXXXXX")"
  own_dir=1
fi
dir="$(cd "$dir" && pwd)"
fs_type="$(stat -f -c %T "$dir")"
if [[ "$fs_type" == tmpfs || "$fs_type" == ramfs ]]; then
  echo "fsimage_bench: $dir is on $fs_type; set BENCH_DIR to a disk file system" >&2
  exit 2
fi
mount_fs="$(df --output=fstype "$dir" 2>/dev/null | tail -1 || true)"

tree="$dir/tree"
ours="$dir/ploop"          # the ploop folder: root.hds and DiskDescriptor.xml
theirs="$dir/mke2fs.raw"
exported="$dir/export.raw"

cleanup() {
  rm -rf "$ours"
  rm -f "$theirs" "$exported"
  if [[ "${KEEP:-0}" != 1 ]]; then
    rm -rf "$tree" "$dir/tree.done"
    if ((own_dir)); then rmdir "$dir" 2>/dev/null || true; fi
  fi
}
trap cleanup EXIT

# --- source tree ----------------------------------------------------------

# Prints "REGULAR_FILES DATA_BYTES DIRS SYMLINKS" of the tree.
tree_counts() {
  find "$tree" -mindepth 1 -printf '%y %s\n' | awk '
    $1 == "f" { f++; b += $2 } $1 == "d" { d++ } $1 == "l" { l++ }
    END { printf "%d %d %d %d\n", f, b, d, l }'
}

make_tree() {
  echo "creating $tree (>= $min_files files, >= $min_mib MiB) from /usr/share, /usr/lib ..."
  rm -rf "$tree" "$dir/tree.done"
  mkdir -p "$tree"
  local top src files bytes rest
  for top in /usr/share /usr/lib; do
    mkdir -p "$tree/${top#/usr/}"
    for src in "$top"/*; do
      [[ -d "$src" && ! -L "$src" ]] || continue
      cp -a "$src" "$tree/${top#/usr/}/"
      read -r files bytes rest < <(tree_counts)
      if ((files >= min_files && bytes >= min_mib * 1048576)); then
        sync -f "$tree"
        touch "$dir/tree.done"
        return
      fi
    done
  done
  echo "fsimage_bench: /usr/share and /usr/lib hold fewer than $min_files files" \
    "or $min_mib MiB" >&2
  exit 2
}

if [[ ! -f "$dir/tree.done" ]]; then
  # The tree, two outputs of about its size and an export of one.
  need_mib=$((min_mib * 6))
  avail_mib="$(df --output=avail -B1M "$dir" | tail -1 | tr -d ' ')"
  if ((avail_mib < need_mib)); then
    echo "fsimage_bench: $dir has $avail_mib MiB free; $need_mib MiB are needed" >&2
    exit 2
  fi
  make_tree
fi
read -r n_files n_bytes n_dirs n_links < <(tree_counts)
tree_alloc=$(du -s -B1 "$tree" | cut -f1)
size_gib=$(((2 * tree_alloc + (1 << 30) - 1) >> 30))
echo "tree: $tree: $n_files files ($((n_bytes >> 20)) MiB of data), $n_dirs directories," \
  "$n_links symlinks; allocated $((tree_alloc >> 20)) MiB"
echo "disk: ${size_gib} GiB (2x the tree, rounded up to GiB)"

# --- cache control --------------------------------------------------------

cache="${CACHE:-}"
if [[ -z "$cache" ]]; then
  if [[ -w /proc/sys/vm/drop_caches ]]; then cache=cold; else cache=warm; fi
fi
case "$cache" in
  cold)
    [[ -w /proc/sys/vm/drop_caches ]] || {
      echo "fsimage_bench: CACHE=cold needs a writable /proc/sys/vm/drop_caches" >&2
      exit 2
    }
    ;;
  warm) ;;
  *)
    echo "fsimage_bench: CACHE must be cold or warm" >&2
    exit 2
    ;;
esac

# Puts the machine in the same state before every timed command: no output
# file, nothing dirty waiting for writeback, the tree either out of the page
# cache (cold) or fully in it (warm), and both programs loaded, so neither
# pays for reading its own executable and libraries.
prepare() {
  rm -rf "$ours"
  rm -f "$theirs" "$exported"
  mkdir "$ours"
  sync
  if [[ "$cache" == cold ]]; then
    echo 3 >/proc/sys/vm/drop_caches
  else
    find "$tree" -type f -exec cat {} + >/dev/null
  fi
  "$ploop" --version >/dev/null
  mke2fs -V >/dev/null 2>&1
}

# --- timed commands -------------------------------------------------------

run_ploop() { "$ploop" init -s "${size_gib}G" --from-dir "$tree" "$ours/root.hds" >/dev/null; }
run_mke2fs() {
  truncate -s "${size_gib}G" "$theirs"
  mke2fs -q -F -t ext4 -d "$tree" "$theirs"
  sync -f "$theirs"
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

# e2fsck -n: read-only, exit status 0 only for a clean file system.
fsck_ok() {
  local what="$1" file="$2" log
  if ! log=$(e2fsck -fn "$file" 2>&1); then
    echo "fsimage_bench: e2fsck -fn rejects $what:" >&2
    echo "$log" >&2
    exit 1
  fi
}

verify_ours() {
  "$ploop" export "$ours/root.hds" "$exported"
  fsck_ok "ploop's file system" "$exported"
  rm -f "$exported"
}

# Allocated on the host: blocks, not the apparent size (the images are
# sparse). Ours is the whole folder (image and descriptor).
alloc_of() { du -s -B1 "$1" | cut -f1; }

best() { sort -g | head -1; }
median() { sort -g | awk '{ v[NR] = $1 } END {
  if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
median_int() { median | awk '{ printf "%.0f\n", $1 }'; }

# Does this mke2fs fsync its output? (Informational: the timed reference
# ends with `sync FILE` either way.)
mke2fs_fsync="not checked (no strace)"
if command -v strace >/dev/null; then
  rm -f "$theirs"
  truncate -s 64M "$theirs"
  n=$(strace -f -e trace=fsync,fdatasync,syncfs -o /dev/stdout mke2fs -q -F -t ext4 "$theirs" |
    grep -cE '^([0-9]+ +)?(fsync|fdatasync|syncfs)\(' || true)
  rm -f "$theirs"
  if ((n > 0)); then mke2fs_fsync="yes ($n fsync calls)"; else mke2fs_fsync="no"; fi
fi

echo "ploop: $ploop"
echo "mke2fs: $(mke2fs -V 2>&1 | head -1); fsyncs its output: $mke2fs_fsync"
echo "file system: $fs_type ($mount_fs) at $dir; cache: $cache tree;" \
  "$(nproc) CPUs; rounds: $rounds"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

t_ours=() t_theirs=() ratios=() a_ours=() a_theirs=() a_ratios=()
printf '%-6s %9s %9s %7s %11s %11s %7s  %s\n' round ploop mke2fs ratio "ploop MiB" \
  "mke2fs MiB" a-ratio order
for ((r = 1; r <= rounds; r++)); do
  # Alternate the order so neither tool always runs first (or right after
  # the other's writeback).
  if ((r % 2)); then order=(ours mke2fs); else order=(mke2fs ours); fi
  for what in "${order[@]}"; do
    case "$what" in
      ours)
        a=$(timed run_ploop)
        aa=$(alloc_of "$ours")
        verify_ours
        ;;
      mke2fs)
        b=$(timed run_mke2fs)
        ab=$(alloc_of "$theirs")
        fsck_ok "mke2fs's file system" "$theirs"
        ;;
    esac
  done
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", a / b }')
  a_ratio=$(awk -v a="$aa" -v b="$ab" 'BEGIN { printf "%.3f", a / b }')
  t_ours+=("$a") t_theirs+=("$b") ratios+=("$ratio")
  a_ours+=("$aa") a_theirs+=("$ab") a_ratios+=("$a_ratio")
  printf '%-6s %8ss %8ss %6sx %11.1f %11.1f %6sx  %s\n' "$r" "$a" "$b" "$ratio" \
    "$(awk -v x="$aa" 'BEGIN { print x / 1048576 }')" \
    "$(awk -v x="$ab" 'BEGIN { print x / 1048576 }')" "$a_ratio" "${order[*]}"
done
rm -rf "$ours"
rm -f "$theirs" "$exported"

m_ours=$(printf '%s\n' "${t_ours[@]}" | median)
m_theirs=$(printf '%s\n' "${t_theirs[@]}" | median)
m_ratio=$(printf '%s\n' "${ratios[@]}" | median)
m_a_ours=$(printf '%s\n' "${a_ours[@]}" | median_int)
m_a_theirs=$(printf '%s\n' "${a_theirs[@]}" | median_int)
m_a_ratio=$(printf '%s\n' "${a_ratios[@]}" | median)
b_ours=$(printf '%s\n' "${t_ours[@]}" | best)
b_theirs=$(printf '%s\n' "${t_theirs[@]}" | best)
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "allocated (median): ploop $m_a_ours bytes, mke2fs $m_a_theirs bytes"
echo "best: ploop ${b_ours} s, mke2fs -d ${b_theirs} s" \
  "(ratio $(awk -v a="$b_ours" -v b="$b_theirs" 'BEGIN { printf "%.3f", a / b }')x)"
echo "median: ploop ${m_ours} s, mke2fs -d ${m_theirs} s (median ratio ${m_ratio}x)"
printf 'fsimage: ploop %.2f s, mke2fs -d %.2f s, time ratio %.2fx (target <= 1.0x);' \
  "$m_ours" "$m_theirs" "$m_ratio"
printf ' allocated ploop %.0f MiB, mke2fs %.0f MiB, ratio %.2fx (target <= 1.1x)\n' \
  "$(awk -v x="$m_a_ours" 'BEGIN { print x / 1048576 }')" \
  "$(awk -v x="$m_a_theirs" 'BEGIN { print x / 1048576 }')" "$m_a_ratio"
