#!/usr/bin/env bash
# Privileged: the daemon killed with SIGKILL at random moments, 20 rounds.
# A writer creates, overwrites and deletes files in the mounted ext4. It
# logs (outside the disk) "begin NAME" before it touches a file and the
# change only after fsync() of the file and its folder returned; a file
# whose change had begun but was not logged when the daemon died may hold
# anything (an overwrite truncates first), every other one must be exact.
# After each kill:
#   - `ploop list` shows the daemon as dead;
#   - `ploop umount -m DIR` still cleans up (lazy unmount, loop device
#     detached, record removed);
#   - the next `ploop mount` finds the image dirty, checks and repairs it,
#     and ext4 replays its journal;
#   - every change the writer logged is there: file contents exact, deleted
#     files gone.
# The daemons must have flushed writes ahead of the writer's fsyncs (the
# status counts them) before the kills.
# The seed of the kill times is printed; PLOOP_TEST_SEED replays a run.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

seed=${PLOOP_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "random seed: PLOOP_TEST_SEED=$seed"
RANDOM=$seed

d="$TMP/ct"
m="$TMP/mnt"
log="$TMP/fsynced.log"
mkdir -p "$d" "$m"
: >"$log"
pl init -s 256M "$d/root.hds"
dd="$d/DiskDescriptor.xml"

cat >"$TMP/writer.py" <<'PY'
# writer.py DIR LOG ROUND SEED: changes files under DIR forever; appends
# "begin NAME" to LOG before touching NAME, and "put NAME SHA" / "del NAME"
# once the change is durable.
import hashlib, os, random, sys
top, log_path, rnd, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed * 1000 + rnd)
log = open(log_path, "a")
def durable(line):
    log.write(line + "\n"); log.flush(); os.fsync(log.fileno())
def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try: os.fsync(fd)
    finally: os.close(fd)
folder = os.path.join(top, "r%02d" % rnd)
os.makedirs(folder, exist_ok=True)
fsync_dir(top)
names = []
i = 0
while True:
    i += 1
    action = rng.random()
    if names and action < 0.2:
        name = names.pop(rng.randrange(len(names)))
        durable("begin " + name)
        os.unlink(os.path.join(top, name))
        fsync_dir(os.path.dirname(os.path.join(top, name)))
        durable("del " + name)
        continue
    if names and action < 0.5:
        name = rng.choice(names)          # overwrite in place
    else:
        name = "r%02d/f%05d" % (rnd, i)   # a new file
        names.append(name)
    data = rng.randbytes(rng.choice([4096, 12288, 65536, 200000]))
    path = os.path.join(top, name)
    durable("begin " + name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    durable("put %s %s" % (name, hashlib.sha256(data).hexdigest()))
PY

verify() {
  python3 - "$m" "$log" <<'PY'
import hashlib, os, sys
top, log = sys.argv[1], sys.argv[2]
want = {}
unsure = set()  # changes begun, not known to have finished
for line in open(log):
    parts = line.split()
    if not parts: continue
    if parts[0] == "begin": unsure.add(parts[1]); continue
    unsure.discard(parts[1])
    if parts[0] == "put": want[parts[1]] = parts[2]
    elif parts[0] == "del": want[parts[1]] = None
bad = 0
for name, sha in sorted(want.items()):
    if name in unsure: continue
    path = os.path.join(top, name)
    if sha is None:
        if os.path.exists(path):
            print("deleted file is back:", name); bad += 1
        continue
    try:
        got = hashlib.sha256(open(path, "rb").read()).hexdigest()
    except OSError as e:
        print("fsync'ed file missing:", name, e); bad += 1; continue
    if got != sha:
        print("fsync'ed file differs:", name); bad += 1
print("verified %d fsync'ed changes (%d in progress at a kill)" % (len(want), len(unsure)))
sys.exit(1 if bad else 0)
PY
}

# Flushes ahead (the daemon's flush after a write that an fsync is
# expected to follow) the killed daemons had made: the writer's fsyncs
# follow its writes, so the kills must have hit those flushes too.
ahead=0
for round in $(seq 1 20); do
  pl mount -m "$m" "$dd"
  dev=$OUT
  pid=$(daemon_of "$dd")
  verify >"$TMP/verify.out" || fail "round $round: $(cat "$TMP/verify.out")"
  start_bg "$TMP/writer.out" python3 "$TMP/writer.py" "$m" "$log" "$round" "$seed"
  writer=$BG_PID
  # Let it write for 50-450 ms, then kill the daemon.
  sleep "0.$((RANDOM % 40 + 5))"
  alive "$writer" || fail "round $round: the writer stopped early: $(cat "$TMP/writer.out")"
  ahead=$((ahead + $(status "$dev" fuse_flushes_ahead)))
  kill -KILL "$pid"
  for ((i = 0; i < 500 && $(alive "$pid" && echo 1 || echo 0) == 1; i++)); do sleep 0.01; done
  kill_bg "$writer"
  assert_eq "$(field_of "$dev" state)" dead "state of $dev after SIGKILL"
  pl umount -m "$m"
  wait_gone "$dd"
  mountpoint -q "$m" && fail "round $round: $m still mounted"
  [[ $("$PLOOP" info "$dd") == *DIRTY* ]] || fail "round $round: the image is not marked dirty"
done
echo "$(wc -l <"$log") changes logged over 20 rounds; $ahead flushes ahead before the kills"
((ahead > 0)) || fail "no daemon flushed ahead of an fsync in 20 rounds"

note "the last mount repairs; everything fsync'ed is there; the file system is sound"
pl mount -m "$m" "$dd"
verify >"$TMP/verify.out" || fail "final: $(cat "$TMP/verify.out")"
cat "$TMP/verify.out"
pl umount -m "$m"
wait_gone "$dd"
pl check "$dd"
out_has "no problems found"
pl export "$dd" "$TMP/fs.raw"
e2fsck -fn "$TMP/fs.raw" >"$TMP/fsck.log" 2>&1 || fail "e2fsck: $(cat "$TMP/fsck.log")"
echo PASS
