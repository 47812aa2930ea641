#!/usr/bin/env bash
# Send/receive benchmark: `ploop send DISK | ploop receive DIR` through a
# pipe against `qemu-img convert` of the same disk to a new parallels
# image, measured in the same run, several rounds, median throughput ratio
# printed; then the size of an incremental stream against the clusters it
# must carry, and lz4's throughput per core on the disk's data. Not a test:
# it fails only on a wrong result (a received disk that differs from the
# source, a stream that does not apply), never on a slow one.
#
# The data (SCALE=full; SCALE=medium divides every size by 2, small by 8):
#   disk      4 GiB virtual, 1 MiB clusters, made with `ploop import` of a
#             raw file (then `ploop restore-descriptor`), holding 2 GiB of
#             data in runs of 1-16 MiB between holes: two thirds random
#             (AES-CTR keystream, incompressible), one third compressible
#             (each 4 KiB block: 1 KiB random, 3 KiB zeros -- like file
#             system blocks that are partly used; lz4 makes it ~1/3);
#   changes   for the incremental stream: a snapshot, then 200 MiB of new
#             random data written into the top -- 100 MiB as whole 1 MiB
#             clusters and 100 MiB as 64 KiB writes at scattered places
#             (each makes its whole cluster part of the new delta) -- then
#             a second snapshot.
# The layout and bytes are deterministic (SEED).
# DATA=rootfs replaces the disk's data with real files: an ext4 file system
# made with `ploop init --from-tar` of ROOTFS_DIRS under ROOTFS_ROOT (by
# default usr/bin, usr/share and usr/lib/x86_64-linux-gnu of /, about 2.4
# GiB on the machine of tools/bench/README.md). It depends on the host,
# but it is what a container's root looks like: lz4 packs it about 2:1 at
# under 1 GB/s per core, where the default data packs 4:1 at 2.8 GB/s.
#
# Timed, per round (order alternated):
#   ploop     `ploop send src | ploop receive dst`: the whole disk as one
#             stream (lz4, SHA-256 of every chunk's bytes, XXH3 content
#             digests), received into a new disk folder; durable when
#             receive returns (deltas synced, descriptor saved atomically).
#   qemu-img  `qemu-img convert -f parallels -O parallels -t writeback
#             src/root.hds dst.hds`: the same image copied to a new one,
#             flushed when qemu-img closes it (writeback), so both are
#             durable at the end. QEMU_CACHE=none makes it write with
#             O_DIRECT instead (`-t none`), as our receiver does by default.
# The ratio is qemu-img's time over ours, i.e. our throughput relative to
# qemu-img's (target >= 1.0x). Each command's CPU time (user + system, all
# its processes) is printed too: against its wall time on all CPUs it
# says whether the CPUs or the disk set the pace.
#
# Before every timed command: `sync`, the page cache dropped (when
# /proc/sys/vm/drop_caches is writable), the source read into it for
# CACHE=warm (CACHE=cold, the default when the cache can be dropped, leaves
# it out), both programs loaded once. Every
# command writes a new output (dst.N, dst.N.hds), and the outputs are
# removed after the last round: removing an output just before a timed
# command (on a file system mounted with discard) slowed that command, and
# which tool paid for it depended on the order of the round.
#
# Checked: every round, the received disk's top delta equals the source
# image (`qemu-img compare`); the incremental stream applies on a copy
# received from the first snapshot and the result equals the source's
# second snapshot (exported, `cmp`).
#
# Environment:
#   PLOOP      ploop binary (default: build/tools/ploop under the repo root)
#   BENCH_DIR  work directory on a real disk, not tmpfs (default: a new
#              directory in the ploop binary's build directory, removed at
#              the end); needs about 6 + 2 x ROUNDS GiB free at SCALE=full
#              (half at medium)
#   SCALE      full (default), medium or small
#   DATA       synthetic (default) or rootfs (see above; ROOTFS_ROOT,
#              ROOTFS_DIRS choose the files)
#   ROUNDS     rounds (default 5)
#   CACHE      cold or warm
#   SEED       data seed (default 1)
#   KEEP       1 keeps BENCH_DIR (and the source, reused next time)
#   WARM       memory touched once before the rounds (default 8G; see
#              free page reporting below)
#   QEMU_CACHE qemu-img's cache mode for its output: writeback (default,
#              the page cache and a flush at the end) or none (O_DIRECT)
#
# Exit status: 0; 1 on a wrong result; 2 on a bad setting; 77 when
# qemu-img, openssl or the ploop binary is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ploop="${PLOOP:-$repo/build/tools/ploop}"
rounds="${ROUNDS:-5}"
seed="${SEED:-1}"
data_kind="${DATA:-synthetic}"
case "$data_kind" in
  synthetic | rootfs) ;;
  *)
    echo "send_bench: DATA must be synthetic or rootfs" >&2
    exit 2
    ;;
esac
qemu_cache="${QEMU_CACHE:-writeback}"
case "$qemu_cache" in
  writeback | none) ;;
  *)
    echo "send_bench: QEMU_CACHE must be writeback or none" >&2
    exit 2
    ;;
esac
scale="${SCALE:-full}"
case "$scale" in
  full) div=1 ;;
  medium) div=2 ;;
  small) div=8 ;;
  *)
    echo "send_bench: SCALE must be full, medium or small" >&2
    exit 2
    ;;
esac
disk_mib=$((4096 / div))
data_mib=$((2048 / div))
change_mib=$((200 / div))

for tool in qemu-img openssl; do
  if ! command -v "$tool" >/dev/null; then
    echo "send_bench: $tool not found" >&2
    exit 77
  fi
done
if [[ ! -x "$ploop" ]]; then
  echo "send_bench: no ploop binary at $ploop (set PLOOP)" >&2
  exit 77
fi
ploop="$(cd "$(dirname "$ploop")" && pwd)/$(basename "$ploop")"

# --- work directory -------------------------------------------------------------

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/send-bench.XXXXXX")"
  own_dir=1
fi
dir="$(cd "$dir" && pwd)"
fs_type="$(stat -f -c %T "$dir")"
if [[ "$fs_type" == tmpfs || "$fs_type" == ramfs ]]; then
  echo "send_bench: $dir is on $fs_type; set BENCH_DIR to a disk file system" >&2
  exit 2
fi
src="$dir/src"
raw="$dir/src.raw"
if [[ $data_kind == rootfs ]]; then src="$dir/src-rootfs"; fi
# Free page reporting (virtio-balloon) hands free guest memory back to the
# host, which then faults every page in again when the guest reuses it: a
# command run right after another command's page cache was dropped copies
# its data several times slower. Measured here: qemu-img took 4.0-8.3 s
# after `ploop send` or a plain `cat` of the source, 2.4-2.8 s after another
# qemu-img, its CPU time in the kernel's copies 3-8x higher; with reporting
# off, 2.35-2.65 s after anything. So it is switched off for the run (and
# put back at the end), and the memory the run will use is touched once.
reporting=/sys/module/page_reporting/parameters/page_reporting_order
reporting_before=""
if [[ -w $reporting ]]; then
  reporting_before=$(<"$reporting")
  echo 11 >"$reporting"  # above the largest block order: nothing is reported
  dd if=/dev/zero of=/dev/null bs="${WARM:-8G}" count=1 iflag=fullblock status=none 2>/dev/null ||
    true
fi
cleanup() {
  [[ -n "$reporting_before" ]] && echo "$reporting_before" >"$reporting"
  rm -rf "$dir"/dst.* "$dir/inc" "$dir/inc.stream" "$dir"/*.export "$dir/rootfs.tar"
  if [[ "${KEEP:-0}" != 1 ]]; then
    rm -rf "$src" "$raw" "$raw.layout" "$dir/changes"
    if ((own_dir)); then rmdir "$dir" 2>/dev/null || true; fi
  fi
}
trap cleanup EXIT

# --- the source disk --------------------------------------------------------------

keystream() { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:ploop-send-bench-$1" -in /dev/zero 2>/dev/null; }

# "data|text START_MIB COUNT" per run, holes of 0-15 MiB between runs of
# 1-16 MiB (so the data fit: on average 7.5 MiB of hole per 8.5 MiB of
# data), until data_mib MiB of data.
make_layout() {
  awk -v seed="$seed" -v total="$disk_mib" -v want="$data_mib" 'BEGIN {
    x = seed % 2147483646 + 1
    c = 0; d = 0
    while (d < want) {
      # Park-Miller LCG: portable and the same in every awk.
      x = (x * 48271) % 2147483647; n = 1 + x % 16
      x = (x * 48271) % 2147483647; k = x % 3
      x = (x * 48271) % 2147483647; gap = x % 16
      if (n > want - d) n = want - d
      if (c + n > total) break
      print (k == 2 ? "text" : "data"), c, n
      d += n
      c += n + gap
    }
  }'
}

make_source() {
  echo "creating the source ($disk_mib MiB disk, $data_mib MiB of data, seed $seed) ..."
  rm -rf "$src" "$raw"
  truncate -s "${disk_mib}M" "$raw"
  make_layout >"$raw.layout"
  # Compressible runs: each 4 KiB block keeps 1 KiB of keystream.
  while read -r -u 3 kind start count; do
    if [[ $kind == data ]]; then
      dd of="$raw" bs=1M seek="$start" count="$count" iflag=fullblock conv=notrunc status=none
    else
      dd bs=256K count="$count" iflag=fullblock status=none | perl -e 'binmode STDIN; binmode STDOUT;
        while (read(STDIN, my $b, 1024) == 1024) { print $b, "\0" x 3072 }' |
        dd of="$raw" bs=1M seek="$start" conv=notrunc status=none
    fi
  done 3<"$raw.layout" < <(keystream "$seed")
  mkdir "$src"
  "$ploop" import -b 1M "$raw" "$src/root.hds" >/dev/null
  "$ploop" restore-descriptor "$src" "$src/root.hds" >/dev/null
  sync
}

make_rootfs_source() {
  local dirs="${ROOTFS_DIRS:-usr/bin usr/share usr/lib/x86_64-linux-gnu}"
  echo "creating the source ($disk_mib MiB disk, ext4 of $dirs under ${ROOTFS_ROOT:-/}) ..."
  rm -rf "$src"
  mkdir "$src"
  # tar exits 1 when a file changed while it read it (fine here), 2 when
  # it could not read something asked for.
  local rc=0
  # shellcheck disable=SC2086 # a list of folders
  tar -cf "$dir/rootfs.tar" -C "${ROOTFS_ROOT:-/}" $dirs 2>/dev/null || rc=$?
  if ((rc > 1)); then
    rm -rf "$src" "$dir/rootfs.tar"
    echo "send_bench: could not read '$dirs' under ${ROOTFS_ROOT:-/} (set ROOTFS_ROOT, ROOTFS_DIRS)" >&2
    exit 2
  fi
  if ! "$ploop" init -s "${disk_mib}M" --from-tar "$dir/rootfs.tar" "$src/root.hds" >/dev/null; then
    rm -rf "$src" "$dir/rootfs.tar"
    echo "send_bench: ploop init could not put those files on a $disk_mib MiB disk (set ROOTFS_DIRS)" >&2
    exit 2
  fi
  rm -f "$dir/rootfs.tar"
  sync
}

if [[ $data_kind == rootfs ]]; then
  [[ -f "$src/DiskDescriptor.xml" ]] || make_rootfs_source
  data_mib=$(($(stat -c %b*%B "$src/root.hds") / 1048576))
  echo "source: $src: $disk_mib MiB disk, an ext4 file system of real files, image $data_mib MiB allocated"
else
  if [[ ! -f "$src/DiskDescriptor.xml" || ! -f "$raw" || ! -f "$raw.layout" ]]; then make_source; fi
  read -r n_data n_text < <(awk '{ n[$1] += $3 } END { print n["data"] + 0, n["text"] + 0 }' "$raw.layout")
  alloc_mib=$(($(stat -c %b*%B "$src/root.hds") / 1048576))
  echo "source: $src: $disk_mib MiB disk, $n_data MiB random + $n_text MiB compressible data," \
    "image $alloc_mib MiB allocated"
fi

# --- cache control --------------------------------------------------------------

cache="${CACHE:-}"
if [[ -z "$cache" ]]; then
  if [[ -w /proc/sys/vm/drop_caches ]]; then cache=cold; else cache=warm; fi
fi
prepare() {
  sync
  # Both modes start from the same memory state every round: the page cache
  # emptied (the earlier rounds' outputs would fill it otherwise, and every
  # later command would reclaim pages as it writes), then, warm, the source
  # read into it.
  if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
  if [[ "$cache" == warm ]]; then cat "$src/root.hds" >/dev/null; fi
  "$ploop" --version >/dev/null
  qemu-img --version >/dev/null
}

run_ploop() { "$ploop" send "$src" | "$ploop" receive "$dir/dst.$1" >/dev/null; }
run_qemu() {
  qemu-img convert -f parallels -O parallels -t "$qemu_cache" "$src/root.hds" "$dir/dst.$1.hds"
}

# Sets `ticks` to the CPU time (user + system, in clock ticks) of the
# commands this shell has waited for: fields 16 and 17 of its stat (read
# without starting a process, which would count itself).
child_ticks() {
  local f
  read -r -a f <"/proc/$BASHPID/stat"
  ticks=$((f[15] + f[16]))
}

# Prints the wall time and the CPU time (user + system, every process of
# the command) of one timed command, in seconds.
timed() {
  prepare
  local t0 t1 c0
  child_ticks
  c0=$ticks
  t0=$EPOCHREALTIME
  "$@"
  t1=$EPOCHREALTIME
  child_ticks
  awk -v a="$t0" -v b="$t1" -v c=$((ticks - c0)) -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%.3f %.2f\n", b - a, c / hz }'
}

verify() {
  if ! qemu-img compare -q -f parallels "$src/root.hds" -F parallels "$1"; then
    echo "send_bench: $1 differs from the source" >&2
    exit 1
  fi
}

median() { sort -g | awk '{ v[NR] = $1 } END {
  if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
best() { sort -g | head -1; }

echo "ploop: $ploop"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "file system: $fs_type at $dir; cache: $cache; $(nproc) CPUs; rounds: $rounds; qemu-img -t $qemu_cache"
if [[ -n "$reporting_before" ]]; then
  echo "free page reporting: off for the run (page_reporting_order $reporting_before -> 11)"
else
  echo "free page reporting: left as it is (cannot set $reporting); rounds may depend on their order"
fi
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

t_ours=() t_qemu=() ratios=() c_ours=() c_qemu=()
# Each tool's times when it ran first in its round, i.e. right after itself
# (the previous round's second command), from round 2 on.
self_ours=() self_qemu=()
printf '%-6s %9s %9s %9s  %-10s %9s %9s\n' round ploop qemu-img ratio order "cpu ploop" qemu-img
for ((r = 1; r <= rounds; r++)); do
  if ((r % 2)); then order=(ours qemu); else order=(qemu ours); fi
  for what in "${order[@]}"; do
    case "$what" in
      ours)
        out=$(timed run_ploop "$r")
        read -r a ca <<<"$out"
        verify "$dir/dst.$r/root.hds"
        ;;
      qemu)
        out=$(timed run_qemu "$r")
        read -r b cb <<<"$out"
        if ((r == 1)); then verify "$dir/dst.$r.hds"; fi
        ;;
    esac
  done
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b / a }')
  t_ours+=("$a") t_qemu+=("$b") ratios+=("$ratio") c_ours+=("$ca") c_qemu+=("$cb")
  if ((r > 1)); then
    if ((r % 2)); then self_ours+=("$a"); else self_qemu+=("$b"); fi
  fi
  printf '%-6s %8ss %8ss %8sx  %-10s %8ss %8ss\n' "$r" "$a" "$b" "$ratio" "${order[*]}" "$ca" "$cb"
done
rm -rf "$dir"/dst.*
stream_bytes=$("$ploop" send "$src" | wc -c)
echo "stream: $((stream_bytes / 1048576)) MiB for $data_mib MiB of data"
m_ours=$(printf '%s\n' "${t_ours[@]}" | median)
m_qemu=$(printf '%s\n' "${t_qemu[@]}" | median)
m_ratio=$(printf '%s\n' "${ratios[@]}" | median)
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
b_ours=$(printf '%s\n' "${t_ours[@]}" | best)
b_qemu=$(printf '%s\n' "${t_qemu[@]}" | best)
echo "best: ploop $b_ours s, qemu-img $b_qemu s (ratio $(awk -v a="$b_ours" -v b="$b_qemu" 'BEGIN { printf "%.2f", b / a }')x)"
# The command after the other tool can run slower than after itself (on
# the machine of tools/bench/README.md the writes after removing ploop's
# output were); the median ratio mixes both orders, this line does not.
if ((${#self_ours[@]} > 0 && ${#self_qemu[@]} > 0)); then
  s_ours=$(printf '%s\n' "${self_ours[@]}" | median)
  s_qemu=$(printf '%s\n' "${self_qemu[@]}" | median)
  echo "each after itself (first in rounds 2-$rounds): ploop $s_ours s, qemu-img $s_qemu s (ratio $(awk -v a="$s_ours" -v b="$s_qemu" 'BEGIN { printf "%.2f", b / a }')x)"
fi
# CPU time against wall time on all CPUs: near 100% means the command was
# bound by the CPUs, not by the disk.
mc_ours=$(printf '%s\n' "${c_ours[@]}" | median)
mc_qemu=$(printf '%s\n' "${c_qemu[@]}" | median)
printf 'cpu (medians): ploop %.2f CPU-s, %.0f%% of the %d CPUs over its time; qemu-img %.2f CPU-s, %.0f%%\n' \
  "$mc_ours" "$(awk -v c="$mc_ours" -v t="$m_ours" -v n="$(nproc)" 'BEGIN { print 100 * c / (t * n) }')" \
  "$(nproc)" \
  "$mc_qemu" "$(awk -v c="$mc_qemu" -v t="$m_qemu" -v n="$(nproc)" 'BEGIN { print 100 * c / (t * n) }')"
printf 'send|receive: ploop %.2f s (%.0f MiB/s of data), qemu-img convert %.2f s (%.0f MiB/s), throughput ratio %.2fx (target >= 1.0x)\n' \
  "$m_ours" "$(awk -v t="$m_ours" -v d="$data_mib" 'BEGIN { print d / t }')" \
  "$m_qemu" "$(awk -v t="$m_qemu" -v d="$data_mib" 'BEGIN { print d / t }')" "$m_ratio"

# --- incremental stream size ----------------------------------------------------------

echo
echo "incremental: a snapshot, $change_mib MiB of changes, a second snapshot ..."
work="$dir/inc"
rm -rf "$work"
mkdir -p "$work"
cp -r "$src" "$work/a"
s1=$("$ploop" snapshot "$work/a")
# Half as whole clusters, half as 64 KiB writes at scattered places.
{ keystream "$seed-changes" || true; } | head -c $((change_mib * 1048576)) >"$work/changes"
cmds=()
half=$((change_mib / 2))
for ((i = 0; i < half; i++)); do
  off=$(((i * 7919 % (disk_mib - 1)) * 1048576))
  cmds+=("write -f $work/changes.$i $off")
  dd if="$work/changes" of="$work/changes.$i" bs=1M skip="$i" count=1 status=none
done
for ((i = 0; i < half * 16; i++)); do
  off=$(((i * 104729 % (disk_mib * 16 - 1)) * 65536 + 4096))
  dd if="$work/changes" of="$work/small.$i" bs=64K skip=$((half * 16 + i)) count=1 status=none
  cmds+=("write -f $work/small.$i $off")
done
"$ploop" io "$work/a" "${cmds[@]}" >/dev/null
rm -f "$work"/changes.* "$work"/small.*
s2=$("$ploop" snapshot "$work/a")
# The second snapshot's own delta holds exactly the changed clusters.
# (info --json sorts keys: allocated_clusters comes before guid.)
changed=$("$ploop" info --json "$work/a" | awk -v s2="$s2" '
  /"allocated_clusters"/ { v = $0; gsub(/[^0-9]/, "", v) }
  /"guid"/ && index($0, s2) { print v; exit }')
changed_bytes=$((changed * 1048576))
"$ploop" send -u "$s1" "$work/a" | "$ploop" receive "$work/b" >/dev/null
"$ploop" send -u "$s2" --from "$s1" "$work/a" >"$work/inc.stream"
stream_bytes=$(stat -c %s "$work/inc.stream")
# Without compression the stream shows its own overhead.
plain_bytes=$("$ploop" send -u "$s2" --from "$s1" --no-compress "$work/a" | wc -c)
"$ploop" receive "$work/b" <"$work/inc.stream" >/dev/null
"$ploop" export -u "$s2" "$work/a" "$dir/a.export"
"$ploop" export -u "$s2" "$work/b" "$dir/b.export"
if ! cmp -s "$dir/a.export" "$dir/b.export"; then
  echo "send_bench: the incremental stream did not reproduce the snapshot" >&2
  exit 1
fi
rm -f "$dir"/*.export
rm -rf "$work"
printf 'incremental: %d MiB written, %d changed clusters (%d MiB); stream %.1f MiB, ratio %.3fx of the changed clusters (target <= 1.05x); without lz4 %.1f MiB, %.4fx\n' \
  "$change_mib" "$changed" "$((changed_bytes / 1048576))" \
  "$(awk -v s="$stream_bytes" 'BEGIN { print s / 1048576 }')" \
  "$(awk -v s="$stream_bytes" -v c="$changed_bytes" 'BEGIN { print s / c }')" \
  "$(awk -v s="$plain_bytes" 'BEGIN { print s / 1048576 }')" \
  "$(awk -v s="$plain_bytes" -v c="$changed_bytes" 'BEGIN { print s / c }')"

# --- lz4 per core ------------------------------------------------------------------------

echo
if command -v lz4 >/dev/null; then
  sample="$dir/sample"
  if [[ $data_kind == rootfs ]]; then
    # 256 MiB of the image after its header and table.
    dd if="$src/root.hds" bs=1M skip=1 count=$((256 / div)) status=none >"$sample"
  else
    # The first runs of the disk's data (holes left out), up to 256 MiB.
    left=$((256 / div))
    while read -r _ start count; do
      ((left > 0)) || break
      ((count > left)) && count=$left
      dd if="$raw" bs=1M skip="$start" count="$count" status=none
      left=$((left - count))
    done <"$raw.layout" >"$sample"
  fi
  result=$(lz4 -b1 -i3 "$sample" 2>&1 | tr '\r' '\n' | grep -E 'MB/s' | tail -1 || true)
  echo "lz4 (one core, level 1, $(($(stat -c %s "$sample") / 1048576)) MiB of the disk's data): ${result#*:}"
  rm -f "$sample"
else
  echo "lz4: the lz4 tool is not installed (apt install lz4) -- no per-core figure"
fi
