#!/usr/bin/env bash
# Block device benchmark: fio on ext4 mounted from `ploop mount` (an
# expanded image served by the FUSE daemon, loop device in direct-I/O mode)
# against, in the same run, with disks of the same size and the same mkfs:
#
#   limit     a loop device in direct-I/O mode on a raw sparse file -- the
#             in-kernel data path, the best a loop-based disk can do here;
#   qsd-prl   qemu-storage-daemon's FUSE export of a parallels image, with a
#             buffered loop device on the export (a direct-I/O loop on it
#             corrupts the file system: its export shares one buffer between
#             requests in flight);
#   qsd-qcow2 the same with a qcow2 image (cluster_size=1M);
#   classic   the same disk as ploop mounted with --no-fuse-uring: the
#             daemon's classic /dev/fuse workers, a thread per request
#             (where the kernel has FUSE over io_uring, ploop uses it: event
#             loops with asynchronous image I/O; elsewhere the two are the
#             same and classic is left out).
#
# Jobs (fio, libaio, O_DIRECT, one file of FILE_SIZE in the mounted ext4,
# laid out before the first timed job):
#   seqread   1 MiB reads, queue depth 8
#   seqwrite  1 MiB writes, queue depth 8
#   randread  4 KiB reads, queue depth 32
#   randwrite 4 KiB writes, queue depth 32
#   fsync     4 KiB writes, an fsync after each, queue depth 1
# Before every job: sync and the page cache dropped (every setup starts cold).
# Rounds rotate the order of the setups; the medians are reported, with the
# ratio ploop / limit and ploop / the better qemu export, the daemon's CPU
# time per job and its peak RSS.
#
# Targets (issue 5): seq >= 0.9x the limit; rand 4k >= 0.7x the limit and
# >= 2x the better qemu export; fsync QD1 >= 0.8x; daemon RSS <= 64 MiB for a
# 1 TiB disk.
#
# Not a test: it prints, it never fails on a slow result. It fails (exit 1)
# when fio reports an error, exits 77 without root, fio, mkfs.ext4 or the
# ploop binary (qemu setups are skipped without qemu-storage-daemon).
#
# Environment:
#   PLOOP      ploop binary (default build/tools/ploop)
#   BENCH_DIR  work directory on a disk file system (default: a new directory
#              next to the binary's build directory, removed at the end)
#   SIZE       virtual disk size of every setup (default 1T; sparse files)
#   FILE_SIZE  the fio file (default 2G)
#   RUNTIME    seconds per job (default 10)
#   ROUNDS     rounds (default 3)
#   JOBS       which jobs (default "seqread seqwrite randread randwrite fsync")
#   QEMU       0 skips the qemu-storage-daemon setups
#   CLASSIC    0 skips the classic setup (it runs where the kernel has
#              FUSE over io_uring; mounting ploop turns on the fuse
#              module's enable_uring, which the script puts back afterwards)
#   MOUNT_OPTS more options for `ploop mount` (e.g. --threads 16)
#   KEEP       1 keeps BENCH_DIR
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ploop="${PLOOP:-$repo_root/build/tools/ploop}"
size="${SIZE:-1T}"
file_size="${FILE_SIZE:-2G}"
runtime="${RUNTIME:-10}"
rounds="${ROUNDS:-3}"
jobs="${JOBS:-seqread seqwrite randread randwrite fsync}"

skip() {
  echo "fio_bench: $*" >&2
  exit 77
}
die() {
  echo "fio_bench: $*" >&2
  exit 1
}

[[ $(id -u) == 0 ]] || skip "needs root (loop devices, FUSE, mount)"
[[ -x "$ploop" ]] || skip "no ploop binary at $ploop (set PLOOP)"
ploop="$(cd "$(dirname "$ploop")" && pwd)/$(basename "$ploop")"
for tool in fio mkfs.ext4 losetup python3; do
  command -v "$tool" >/dev/null || skip "$tool not found"
done
setups="ploop limit"
uring_param=/sys/module/fuse/parameters/enable_uring
uring_before=""
if [[ -e $uring_param ]]; then
  uring_before=$(<"$uring_param")
  [[ "${CLASSIC:-1}" != 0 ]] && setups="ploop classic limit"
fi
if [[ "${QEMU:-1}" != 0 ]]; then
  if command -v qemu-storage-daemon >/dev/null && command -v qemu-img >/dev/null; then
    setups="$setups qsd-prl qsd-qcow2"
  else
    echo "fio_bench: qemu-storage-daemon not found: qemu setups skipped" >&2
  fi
fi

own_dir=0
if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "$(dirname "$(dirname "$ploop")")/fio-bench.XXXXXX")"
  own_dir=1
fi
dir="$(cd "$dir" && pwd)"
fs_type="$(stat -f -c %T "$dir")"
[[ "$fs_type" != tmpfs && "$fs_type" != ramfs ]] || die "$dir is on $fs_type; use a disk"

qsd_pids=()
loops=()
cleanup() {
  set +e
  for s in $setups; do
    mountpoint -q "$dir/$s/mnt" 2>/dev/null && umount "$dir/$s/mnt"
  done
  for s in ploop classic; do
    [[ -f "$dir/$s/disk/DiskDescriptor.xml" ]] &&
      "$ploop" umount "$dir/$s/disk/DiskDescriptor.xml" >/dev/null 2>&1
  done
  [[ -n "$uring_before" ]] && echo "$uring_before" >"$uring_param" 2>/dev/null
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
  for p in "${qsd_pids[@]}"; do
    kill "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "kept $dir"
  else
    rm -rf "${dir:?}/ploop" "$dir/classic" "$dir/limit" "$dir/qsd-prl" "$dir/qsd-qcow2"
    ((own_dir)) && rmdir "$dir" 2>/dev/null
  fi
}
trap cleanup EXIT

mkfs_opts=(-q -F -t ext4 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard)

# wait_for_mount FILE: a FUSE export is up once FILE is a mountpoint.
wait_for_mount() {
  local i
  for ((i = 0; i < 1000; i++)); do
    grep -q " $1 " /proc/self/mounts && return 0
    sleep 0.01
  done
  die "$1 did not become a mountpoint"
}

setup() { # setup NAME: a mounted ext4 on a SIZE disk at $dir/NAME/mnt
  local s=$1 d="$dir/$1" dev
  mkdir -p "$d/mnt"
  case $s in
    ploop | classic)
      local ring_opt=()
      [[ $s == classic ]] && ring_opt=(--no-fuse-uring)
      mkdir -p "$d/disk"
      "$ploop" init -s "$size" -t none "$d/disk/root.hds" >/dev/null
      # shellcheck disable=SC2086 # MOUNT_OPTS: words
      dev=$("$ploop" mount ${MOUNT_OPTS:-} "${ring_opt[@]}" "$d/disk/DiskDescriptor.xml")
      ;;
    limit)
      truncate -s "$size" "$d/raw.img"
      dev=$(losetup --direct-io=on -f --show "$d/raw.img")
      loops+=("$dev")
      ;;
    qsd-prl | qsd-qcow2)
      local fmt=parallels opts=()
      [[ $s == qsd-qcow2 ]] && fmt=qcow2 opts=(-o cluster_size=1M)
      qemu-img create -q -f $fmt "${opts[@]}" "$d/img" "$size"
      touch "$d/export"
      qemu-storage-daemon \
        --blockdev driver=file,node-name=file0,filename="$d/img" \
        --blockdev driver=$fmt,node-name=fmt0,file=file0 \
        --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$d/export",writable=on \
        >"$d/qsd.log" 2>&1 &
      qsd_pids+=($!)
      echo $! >"$d/qsd.pid"
      wait_for_mount "$d/export"
      # Buffered: a direct-I/O loop on this export corrupts data.
      dev=$(losetup -f --show "$d/export")
      loops+=("$dev")
      ;;
  esac
  echo "$dev" >"$d/dev"
  mkfs.ext4 "${mkfs_opts[@]}" "$dev"
  mount "$dev" "$d/mnt"
  # Lay the fio file out (untimed): every later job overwrites or reads it.
  fio --name=layout --filename="$d/mnt/fio.dat" --size="$file_size" --rw=write --bs=1M \
    --ioengine=libaio --iodepth=8 --direct=1 --output=/dev/null
  sync
}

daemon_pid() { # daemon_pid SETUP
  "$ploop" list --json | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m["descriptor"].endswith(sys.argv[1]): print(m["pid"])' "$dir/$1/disk/DiskDescriptor.xml"
}

proc_cpu() { # user+system seconds of PID
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' \
    "/proc/$1/stat"
}

run_job() { # run_job SETUP JOB -> "value unit" (IOPS or MiB/s)
  local d="$dir/$1" args=()
  case $2 in
    seqread) args=(--rw=read --bs=1M --iodepth=8) ;;
    seqwrite) args=(--rw=write --bs=1M --iodepth=8) ;;
    randread) args=(--rw=randread --bs=4k --iodepth=32) ;;
    randwrite) args=(--rw=randwrite --bs=4k --iodepth=32) ;;
    fsync) args=(--rw=randwrite --bs=4k --iodepth=1 --fsync=1) ;;
  esac
  sync
  echo 3 >/proc/sys/vm/drop_caches
  fio --name="$2" --filename="$d/mnt/fio.dat" --size="$file_size" --ioengine=libaio --direct=1 \
    --time_based --runtime="$runtime" --output-format=json "${args[@]}" >"$d/$2.json" ||
    die "fio $2 on $1 failed"
  python3 - "$d/$2.json" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if j.get("error"):
    print("ERROR")
    sys.exit(1)
io = j["read"] if j["read"]["io_bytes"] else j["write"]
if sys.argv[2].startswith("seq"):
    print("%.1f" % (io["bw"] / 1024.0))   # MiB/s
else:
    print("%.0f" % io["iops"])
PY
}

echo "fio_bench: $(uname -r), $(nproc) CPUs, disk $size, fio file $file_size, ${runtime}s per job, $rounds rounds${MOUNT_OPTS:+, ploop mount $MOUNT_OPTS}"
echo "work dir: $dir ($(df --output=fstype "$dir" | tail -1)); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for s in $setups; do
  echo "setting up $s ..."
  setup "$s"
done
declare -A pids
for s in ploop classic; do
  [[ " $setups " == *" $s "* ]] || continue
  pids[$s]=$(daemon_pid $s)
  [[ -n "${pids[$s]}" ]] || die "no ploop daemon found for $s"
  dev=$(cat "$dir/$s/dev")
  echo "$s: $dev, daemon pid ${pids[$s]}, loop direct I/O: $(cat "/sys/block/${dev#/dev/}/loop/dio")"
done

declare -A results cpu
order=($setups)
for ((r = 1; r <= rounds; r++)); do
  for job in $jobs; do
    for s in "${order[@]}"; do
      p="${pids[$s]:-}"
      [[ -n "$p" ]] && c0=$(proc_cpu "$p")
      v=$(run_job "$s" "$job")
      results[$s.$job]+="$v "
      [[ -n "$p" ]] &&
        cpu[$s.$job]+="$(awk -v a="$c0" -v b="$(proc_cpu "$p")" 'BEGIN { printf "%.2f", b - a }') "
      printf 'round %d %-9s %-9s %s\n' "$r" "$job" "$s" "$v"
    done
    order=("${order[@]:1}" "${order[0]}")  # rotate
  done
done

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END {
  if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

best_qemu() { # best_qemu JOB: the better qemu export's median (0 without them)
  printf '%s\n%s\n' "$(median <<<"${results[qsd-prl.$1]:-}")" \
    "$(median <<<"${results[qsd-qcow2.$1]:-}")" | awk 'NF' | sort -g | tail -1 | grep . || echo 0
}

echo
echo "medians (MiB/s for seq, IOPS otherwise); ratios against the limit and the best qemu export"
printf '%-10s %10s %10s %10s %10s %8s %8s %9s\n' job ploop limit qsd-prl qsd-qcow2 "/limit" "/qemu" "cpu(s)"
for job in $jobs; do
  p=$(median <<<"${results[ploop.$job]}")
  l=$(median <<<"${results[limit.$job]}")
  q1=$(median <<<"${results[qsd-prl.$job]:-}")
  q2=$(median <<<"${results[qsd-qcow2.$job]:-}")
  printf '%-10s %10s %10s %10s %10s %8s %8s %9s\n' "$job" "$p" "$l" "${q1:--}" "${q2:--}" \
    "$(ratio "$p" "$l")" "$(ratio "$p" "$(best_qemu "$job")")" "$(median <<<"${cpu[ploop.$job]}")"
done
if [[ -n "${pids[classic]:-}" ]]; then
  echo
  echo "classic: ploop mount --no-fuse-uring (the /dev/fuse workers)"
  printf '%-10s %10s %8s %8s %9s\n' job classic "/limit" "/qemu" "cpu(s)"
  for job in $jobs; do
    p=$(median <<<"${results[classic.$job]}")
    l=$(median <<<"${results[limit.$job]}")
    printf '%-10s %10s %8s %8s %9s\n' "$job" "$p" "$(ratio "$p" "$l")" \
      "$(ratio "$p" "$(best_qemu "$job")")" "$(median <<<"${cpu[classic.$job]}")"
  done
fi
echo
for s in ploop classic; do
  pid="${pids[$s]:-}"
  [[ -n "$pid" ]] || continue
  rss=$(awk '/VmRSS/ { print $2 }' "/proc/$pid/status")
  hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  echo "$s daemon: RSS $((rss / 1024)) MiB, peak RSS $((hwm / 1024)) MiB, CPU $(proc_cpu "$pid") s in all, $(ls "/proc/$pid/task" | wc -l) threads (disk $size)"
done
for s in qsd-prl qsd-qcow2; do
  [[ -f "$dir/$s/qsd.pid" ]] || continue
  qp=$(cat "$dir/$s/qsd.pid")
  echo "$s: RSS $(($(awk '/VmRSS/ { print $2 }' "/proc/$qp/status") / 1024)) MiB, CPU $(proc_cpu "$qp") s"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
