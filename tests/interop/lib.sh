# shellcheck shell=bash
# Shared helpers for the interop shell tests (tests/interop/*_test.sh).
#
# Each test sources this file first:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   need qemu-img qemu-io
#
# ctest runs the scripts with PLOOP (the ploop binary) and TESTS_DIR (the
# tests source dir) in the environment. A test whose peer tool is missing
# exits 77 (skipped), except under CI=true, where that is a failure. Every
# test works in its own temp dir ($TMP, also the working directory), removed
# on exit unless KEEP_TMP is set; background processes started with
# start_bg are killed on exit.
#
# Assertions print what failed (the command, its exit code, stdout and
# stderr) and exit 1.

set -euo pipefail

if [[ -z ${PLOOP:-} ]]; then
  echo "FAIL: PLOOP is not set (the path of the ploop binary; ctest sets it)" >&2
  exit 1
fi
if [[ ! -x $PLOOP ]]; then
  echo "FAIL: PLOOP=$PLOOP is not an executable" >&2
  exit 1
fi
# Absolute: the tests run in their temp dir.
PLOOP=$(cd "$(dirname "$PLOOP")" && pwd)/$(basename "$PLOOP")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ploop-interop.XXXXXX")
_bg_pids=()

_cleanup() {
  local rc=$? pid
  for pid in "${_bg_pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n ${KEEP_TMP:-} ]]; then
    echo "kept temp dir $TMP" >&2
  else
    rm -rf "$TMP"
    if ((rc != 0 && rc != 77)); then
      echo "(run with KEEP_TMP=1 to keep the test's files)" >&2
    fi
  fi
}
trap _cleanup EXIT
cd "$TMP"

# The first frame outside this file, for "where did it fail".
_where() {
  local i
  for ((i = 1; i < ${#BASH_SOURCE[@]}; i++)); do
    if [[ ${BASH_SOURCE[i]} != "${BASH_SOURCE[0]}" ]]; then
      echo "${BASH_SOURCE[i]##*/}:${BASH_LINENO[i - 1]}"
      return
    fi
  done
  echo "?"
}

# fail MESSAGE...: report a failed assertion and stop the test.
fail() {
  echo "FAIL ($(_where)): $*" >&2
  exit 1
}

note() { echo "--- $*"; }

# skip WHY: skip the test (exit 77) for a missing prerequisite (a tool, a
# privilege, a kernel feature); under CI=true, where CI provides them all,
# it is a failure instead.
skip() {
  if [[ ${CI:-} == true ]]; then
    echo "FAIL: $* (required when CI=true)" >&2
    exit 1
  fi
  echo "SKIP: $*" >&2
  exit 77
}

# need TOOL...: skip the test when a tool is missing.
need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed"
  done
}

# run CMD...: runs CMD; its exit code goes to $RC, its stdout to $OUT and
# stderr to $ERR (also kept in the files $TMP/.out and $TMP/.err).
run() {
  set +e
  "$@" >"$TMP/.out" 2>"$TMP/.err"
  RC=$?
  set -e
  OUT=$(<"$TMP/.out")
  ERR=$(<"$TMP/.err")
}

# The last run's command and output, for failure messages.
_show() {
  printf '  command: %s\n' "$*"
  printf '  exit:    %s%s\n' "$RC" "$( ((RC >= 128)) && echo " (killed by signal $((RC - 128)))")"
  printf '  stdout:  %s\n' "$(head -c 3000 "$TMP/.out" | sed '2,$s/^/           /')"
  printf '  stderr:  %s\n' "$(head -c 3000 "$TMP/.err" | sed '2,$s/^/           /')"
}

# expect_rc CODE CMD...: CMD must exit with CODE.
expect_rc() {
  local want=$1
  shift
  run "$@"
  if [[ $RC != "$want" ]]; then
    echo "FAIL ($(_where)): exit code $RC, expected $want" >&2
    _show "$@" >&2
    exit 1
  fi
}

# expect_ok CMD...: CMD must succeed.
expect_ok() { expect_rc 0 "$@"; }

# expect_error CODE CMD...: CMD must exit with CODE and print exactly one
# non-empty line on stderr (the one-line error every ploop error must be).
expect_error() {
  local want=$1
  shift
  expect_rc "$want" "$@"
  local lines
  lines=$(wc -l <"$TMP/.err")
  if [[ $lines != 1 || -n $(tail -c1 "$TMP/.err") || -z ${ERR//[[:space:]]/} ]]; then
    echo "FAIL ($(_where)): expected exactly one line on stderr, got $lines" >&2
    _show "$@" >&2
    exit 1
  fi
}

# pl ARGS...: `ploop ARGS` must succeed and print nothing on stderr.
pl() {
  expect_rc 0 "$PLOOP" "$@"
  if [[ -s $TMP/.err ]]; then
    echo "FAIL ($(_where)): unexpected stderr from a successful ploop command" >&2
    _show "$PLOOP" "$@" >&2
    exit 1
  fi
}

# out_has REGEX / err_has REGEX: the last run's stdout / stderr matches.
out_has() {
  grep -Eq -- "$1" "$TMP/.out" || fail "stdout does not match /$1/: $OUT"
}
err_has() {
  grep -Eq -- "$1" "$TMP/.err" || fail "stderr does not match /$1/: $ERR"
}

# assert_eq ACTUAL EXPECTED [WHAT]
assert_eq() {
  [[ $1 == "$2" ]] || fail "${3:-value}: got '$1', expected '$2'"
}

assert_absent() { [[ ! -e $1 ]] || fail "$1 exists but should not"; }

md5() { md5sum "$1" | cut -d' ' -f1; }
file_size() { stat -c %s "$1"; }

# put_u32 FILE OFFSET VALUE: overwrite 4 bytes little-endian in place.
put_u32() {
  local v=$3
  printf '%b' "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) \
    $((v >> 16 & 255)) $((v >> 24 & 255)))" |
    dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# put_bytes FILE OFFSET STRING: overwrite raw bytes (printf %b escapes).
put_bytes() {
  printf '%b' "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# get_u32 FILE OFFSET: the little-endian u32 at OFFSET, in decimal.
get_u32() {
  od -An -v -tu4 --endian=little -j "$2" -N4 "$1" | tr -d ' \n'
}

# random_file FILE BYTES SEED: deterministic pseudo-random bytes.
random_file() {
  perl -e 'srand($ARGV[1]); my $n = $ARGV[0];
    while ($n > 0) { my $k = $n < 65536 ? $n : 65536;
      print pack("L*", map { int(rand(4294967296)) } 1 .. ($k + 3) / 4) & ("\xff" x $k);
      $n -= $k }' "$2" "$3" >"$1"
  [[ $(file_size "$1") == "$2" ]] || fail "random_file: $1 has the wrong size"
}

# --- qemu peers ---

# qemu_clean IMG: `qemu-img check -f parallels` finds no errors.
qemu_clean() {
  expect_rc 0 qemu-img check -f parallels "$1"
  out_has "No errors were found on the image"
}

# qemu_same IMG REF [IMGFMT]: qemu-img compare says IMG (parallels, or
# IMGFMT) holds the same disk as the raw file REF.
qemu_same() {
  expect_rc 0 qemu-img compare -f "${3:-parallels}" "$1" -F raw "$2"
  out_has "Images are identical"
}

# qemu_vsize IMG [FMT]: the virtual size qemu-img info reports, in bytes.
qemu_vsize() {
  qemu-img info -f "${2:-parallels}" --output=json "$1" |
    sed -n 's/^ *"virtual-size": \([0-9]*\),*$/\1/p'
}

# both IMG REF IOCMD...: apply qemu-io style commands with one `ploop io`
# session to IMG and with one qemu-io session to the raw reference REF
# (`discard` becomes `write -z` on the reference: qemu-io ignores discards
# on a raw file).
both() {
  local img=$1 ref=$2 cmd
  shift 2
  local qargs=()
  for cmd in "$@"; do
    [[ $cmd == discard* ]] && cmd="write -z ${cmd#discard }"
    qargs+=(-c "$cmd")
  done
  pl io "$img" "$@"
  expect_ok qemu-io -f raw "${qargs[@]}" "$ref"
}

# --- background holders ---

# start_bg OUTFILE CMD...: run CMD in the background, stdout and stderr to
# OUTFILE; its pid goes to $BG_PID and it is killed when the test exits.
start_bg() {
  local out=$1
  shift
  "$@" >"$out" 2>&1 &
  BG_PID=$!
  _bg_pids+=("$BG_PID")
}

# kill_bg PID: kill a background process started with start_bg and reap
# it, without the shell's "Killed" notice.
kill_bg() {
  { kill -KILL "$1" && wait "$1"; } 2>/dev/null || true
}

# wait_for_output FILE REGEX PID: wait until FILE has a line matching REGEX
# (the holder is ready). Fails if PID exits first. The 60 s bound only keeps
# a hung test from hanging ctest; nothing asserts on time.
wait_for_output() {
  local i
  for ((i = 0; i < 6000; i++)); do
    if grep -Eq -- "$2" "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      grep -Eq -- "$2" "$1" 2>/dev/null && return 0
      fail "background process $3 exited before printing /$2/: $(cat "$1")"
    fi
    sleep 0.01
  done
  fail "background process $3 did not print /$2/ within 60 s: $(cat "$1")"
}

# still_running PID WHAT: the holder must still be alive, or the check just
# made did not happen while it held the image.
still_running() {
  kill -0 "$1" 2>/dev/null || fail "$2 (pid $1) exited too early; the check above is void"
}
