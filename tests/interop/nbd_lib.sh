# shellcheck shell=bash
# Helpers for the tests of `ploop serve` (the NBD export) and `ploop
# convert`: nbd_*_test.sh, convert_test.sh. Source lib.sh first.
# shellcheck disable=SC2154  # OUT, RC, TMP, BG_PID come from lib.sh

# nbd_uri SOCKET: the URI qemu-img, qemu-io, nbdinfo and nbdcopy take.
nbd_uri() { echo "nbd+unix:///?socket=$1"; }

# serve_start ARGS...: `ploop serve ARGS` in the background; returns once
# it prints "Serving ...", i.e. clients can connect. Its pid goes to
# $SERVE_PID, its output (stdout and stderr) to the file $SERVE_OUT.
_serve_n=0
serve_start() {
  _serve_n=$((_serve_n + 1))
  SERVE_OUT=$TMP/serve.$_serve_n.out
  start_bg "$SERVE_OUT" "$PLOOP" serve "$@"
  SERVE_PID=$BG_PID
  wait_for_output "$SERVE_OUT" '^Serving ' "$SERVE_PID"
}

# nbdkit_of PID: the pid of the nbdkit child of `ploop serve` PID (from
# /proc: procps may not be installed).
nbdkit_of() {
  local f line
  for f in /proc/[0-9]*/stat; do
    read -r line <"$f" 2>/dev/null || continue
    # "PID (COMM) STATE PPID ..."
    if [[ $line =~ ^([0-9]+)\ \(nbdkit\)\ [A-Za-z]\ ([0-9]+)\  && ${BASH_REMATCH[2]} == "$1" ]]; then
      echo "${BASH_REMATCH[1]}"
      return
    fi
  done
  fail "ploop serve (pid $1) has no nbdkit child"
}

# serve_stop PID OUTFILE [SIGNAL]: stop the server with SIGNAL (TERM by
# default); it must exit 0 having printed nothing but its "Serving" line.
serve_stop() {
  local pid=$1 out=$2 sig=${3:-TERM} rc=0
  kill -"$sig" "$pid"
  wait "$pid" || rc=$?
  [[ $rc == 0 ]] || fail "ploop serve exited $rc after SIG$sig: $(cat "$out")"
  [[ $(grep -cv '^Serving ' "$out") == 0 ]] || fail "ploop serve printed more: $(cat "$out")"
}

# serve_wait_exit PID: wait for a server that is stopping by itself; its
# exit code goes to $RC.
serve_wait_exit() {
  RC=0
  wait "$1" || RC=$?
}

# wait_gone PID WHAT: wait until a process that is not our child exits
# (the 60 s bound only keeps a hung test from hanging ctest).
wait_gone() {
  local i
  for ((i = 0; i < 6000; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.01
  done
  fail "$2 (pid $1) did not exit within 60 s"
}

# allocated_bytes FILE: the bytes the file occupies on disk.
allocated_bytes() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }

# top_dirty DD: "yes" or "no" -- the in-use mark of the disk's top delta,
# read by `ploop info` (which takes no lock).
top_dirty() {
  local d=${1%/DiskDescriptor.xml}
  "$PLOOP" info --json "$d/$(file_of "$d" "$TOP_GUID")" |
    sed -n 's/^ *"dirty": \(true\|false\),*$/\1/p' | sed 's/true/yes/;s/false/no/'
}
