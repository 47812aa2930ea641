#!/usr/bin/env bash
# Privileged: `ploop snapshot-merge -u GUID` of a snapshot below the top of a
# mounted disk (online).
#   - chain base(s1) <- s2 <- s3 <- top, each layer with its own 48 MiB file
#     on the mounted ext4; s2 is merged into s1 while a fsync'ing writer
#     appends to the top and a reader keeps reading every file with direct
#     I/O (so the reads reach the disk): the reader sees the right bytes
#     during the merge, and afterwards everything is intact;
#   - the descriptor as the offline merge leaves it: s1 gone, s2 names the
#     base's file, no <Temporary/>; s2's old file removed, the rest kept;
#     the daemon serves three layers (ploop list);
#   - snapshot s2 still reads as it was (mounted read-only with -u);
#   - refusals: the top and -A (exit 10); a parent another mount reads
#     (Busy, exit 9, naming the device), the chain served unchanged;
#   - umount, check clean, e2fsck clean, remount intact.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
. "$TESTS_DIR/privileged/mount_lib.sh"

d="$TMP/ct"
m="$TMP/mnt"
s="$TMP/snap"
mkdir -p "$d" "$m" "$s"
pl init -s 512M "$d/root.hds"
dd="$d/DiskDescriptor.xml"
pl mount -m "$m" "$dd"
dev=$OUT
pid=$(daemon_of "$dd")

snaps=()
for i in 1 2 3; do
  fill "$m/f$i.bin" 48 "$i"
  echo "layer $i" >"$m/latest"
  pl snapshot "$dd"
  snaps+=("$OUT")
done
fill "$m/f4.bin" 8 4
for i in 1 2 3 4; do
  fill "$TMP/want$i.bin" $((i == 4 ? 8 : 48)) "$i"
  want[i]=$(sha "$TMP/want$i.bin")
done
files_before=$(ls "$d")

# reader: reads every file with O_DIRECT until STOP, failing on a mismatch.
cat >"$TMP/reader.sh" <<'SH'
#!/usr/bin/env bash
set -u
m=$1 stop=$2
shift 2
rounds=0
until [[ -e $stop ]]; do
  for i in 1 2 3; do
    got=$(dd if="$m/f$i.bin" iflag=direct bs=1M status=none | sha256sum | cut -d' ' -f1)
    want=$1
    [[ $i == 2 ]] && want=$2
    [[ $i == 3 ]] && want=$3
    [[ $got == "$want" ]] || { echo "f$i.bin read $got during the merge" >&2; exit 1; }
  done
  rounds=$((rounds + 1))
done
echo "$rounds"
SH
chmod +x "$TMP/reader.sh"

note "merge s2 into s1 online, with a writer and a reader running"
start_writer "$m/log"
"$TMP/reader.sh" "$m" "$TMP/stop" "${want[1]}" "${want[2]}" "${want[3]}" >"$TMP/rounds" &
reader=$!
sleep 0.5
pl snapshot-merge -u "${snaps[1]}" "$dd"
sleep 0.5
stop_writer
wait "$reader" || fail "the reader saw wrong data during the merge"
note "reader rounds during the merge: $(cat "$TMP/rounds")"
sync

note "data intact; the descriptor and files as the offline merge leaves them"
for i in 1 2 3 4; do
  assert_eq "$(sha "$m/f$i.bin")" "${want[i]}" "f$i.bin after the merge"
done
assert_eq "$(cat "$m/latest")" "layer 3" "latest"
n=$(check_records "$m/log") || fail "the writer's log is damaged: $n"
((n >= final)) || fail "the log has $n records, $final were acknowledged"
pl snapshot-list --json "$dd"
assert_eq "$(grep -c '"guid"' <<<"$OUT")" 3 "deltas after the merge"
grep -qi "${snaps[0]}" "$dd" && fail "s1 is still in the descriptor"
grep -qi "temporary" "$dd" && fail "the descriptor still marks a merge"
python3 - "$dd" "${snaps[1]}" <<'PY' || fail "s2 does not name the base file"
import re, sys
text = open(sys.argv[1]).read()
for block in re.findall(r"<Image>.*?</Image>", text, re.S):
    if sys.argv[2].lower() in block.lower():
        assert "<File>root.hds</File>" in block, block
        break
else:
    sys.exit("no image " + sys.argv[2])
PY
merged_away=$(comm -23 <(echo "$files_before") <(ls "$d"))
[[ $(wc -l <<<"$merged_away") == 1 && $merged_away == root.hds.* ]] ||
  fail "files removed by the merge: '$merged_away' (want s2's old file)"
[[ -z $(comm -13 <(echo "$files_before") <(ls "$d")) ]] || fail "new files: $(ls "$d")"
assert_eq "$(ploop_images "$dev")" 3 "layers the daemon serves"
assert_eq "$(field_of "$dev" pid)" "$pid" "the same daemon serves the disk"

note "snapshot s2 reads as it was"
pl mount -r -u "${snaps[1]}" -m "$s" "$dd"
snap_dev=$OUT
assert_eq "$(cat "$s/latest")" "layer 2" "latest in s2"
assert_eq "$(sha "$s/f2.bin")" "${want[2]}" "f2.bin in s2"
[[ ! -e $s/f3.bin ]] || fail "s2 shows f3.bin"

note "refusals"
expect_error 10 "$PLOOP" snapshot-merge "$dd"
err_has "top of a mounted disk"
expect_error 10 "$PLOOP" snapshot-merge -A "$dd"
# s3's parent (s2, the base now) is read by the snapshot mount.
expect_error 9 "$PLOOP" snapshot-merge -u "${snaps[2]}" "$dd"
err_has "in use by /dev/loop"
assert_eq "$(ploop_images "$dev")" 3 "layers after the refusals"
assert_eq "$(sha "$m/f3.bin")" "${want[3]}" "f3.bin after the refusals"
pl umount -m "$s"

note "with the snapshot mount gone, s3 merges into s2 online"
pl snapshot-merge -u "${snaps[2]}" "$dd"
assert_eq "$(ploop_images "$dev")" 2 "layers after the second merge"
echo 3 >/proc/sys/vm/drop_caches
for i in 1 2 3 4; do
  assert_eq "$(sha "$m/f$i.bin")" "${want[i]}" "f$i.bin after the second merge"
done

note "umount, check, e2fsck, remount"
pl umount -m "$m"
wait_gone "$dd" "$pid"
pl check "$dd"
pl mount "$dd"
dev=$OUT
expect_rc 0 e2fsck -fn "$dev"
pl umount "$dev"
pl mount -r -m "$m" "$dd"
for i in 1 2 3 4; do
  assert_eq "$(sha "$m/f$i.bin")" "${want[i]}" "f$i.bin after remount"
done
pl umount -m "$m"
