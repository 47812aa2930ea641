#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Snapshots of whole disks (DiskDescriptor.xml), checked against a model
# of the expected content kept in raw files that qemu-io writes with the
# same commands (disk_lib.sh). After every step, every remaining snapshot
# exports (`ploop export -u GUID`) to its expected content and the current
# disk to the current content (qemu-img compare), each delta file passes
# `qemu-img check -f parallels`, QEMU reading the base delta alone sees the
# base snapshot, `ploop check` is clean, and the folder holds exactly the
# files the descriptor names.
#
# Covers: snapshot create (random and given GUIDs, normalised; taken GUIDs
# and reserved ones refused), snapshot-list in text and JSON (the tree, the
# current top marked), writes to the top never touching lower deltas (md5
# and mtime), snapshots read-only through io -u, switch (rollback drops the
# old top and its data; the snapshot gets a second child), merge -u / the
# top / -A (the child's GUID survives on the parent's file, one file less),
# delete (a leaf goes; one child merges; the top and unknown GUIDs are
# refused), a chain of 13 deltas, resize under snapshots, raw and
# preallocated bases, and every snapshot operation refused with exit 9 and
# nothing changed while another process has the disk open.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=disk_lib.sh
. "$here/disk_lib.sh"
need qemu-img qemu-io perl

KiB=1024
MiB=$((1024 * KiB))
cb=$((64 * KiB))
DD=d/DiskDescriptor.xml

# --- create, list, lower deltas untouched ----------------------------------
note "a disk with one delta"
disk_init d 8M 64K
dio d "write -P 0x11 0 $((3 * cb))" "write -P 0x12 $((5 * cb + 100)) 5000" \
  "write -P 0x13 $((8 * MiB - 4096)) 4096"
verify_disk d
assert_eq "$(chain_of d)" "$TOP_GUID" "chain of a new disk"

note "snapshot create and list"
before=$(stamp d/root.hds)
dsnap d
S1=$SNAP
# The old top keeps its file under the snapshot's GUID; creating the
# snapshot did not touch it.
assert_eq "$(file_of d "$S1")" root.hds "file of the first snapshot"
assert_eq "$(stamp d/root.hds)" "$before" "md5/mtime of root.hds across ploop snapshot"
top_file=$(file_of d "$TOP_GUID")
[[ $top_file =~ ^root\.hds\.\{[0-9a-f-]{36}\}$ ]] || fail "new top delta file is named '$top_file'"
verify_disk d
# Text: a header, the tree indented under its root, the top marked.
pl snapshot-list "$DD"
assert_eq "$(wc -l <"$TMP/.out")" 4 "lines of snapshot-list"
out_has "^GUID +PARENT +FILE$"
out_has "^\\$S1  \\$NULL_GUID  root\\.hds$"
out_has "^  \\$TOP_GUID \\*\\$S1  root\\.hds\\.\\{"
out_has "^\\(\\* = current top\\)$"
# JSON: one object per shot; only the top is current.
assert_eq "$(shots d | LC_ALL=C sort)" "$(printf '%s\n' "$S1 $NULL_GUID false false root.hds" \
  "$TOP_GUID $S1 true false $top_file" | LC_ALL=C sort)" "snapshot-list --json"
# info agrees: two deltas, the top marked.
pl info "$DD"
out_has "deltas: +2 \\(2 in the active chain\\)"
out_has "\\$TOP_GUID \\(top\\) +$top_file"

note "writes to the top leave the snapshot's delta alone"
before=$(stamp d/root.hds)
top_before=$(md5 "d/$top_file")
sleep 0.05 # past the file system's timestamp granularity
# Over the snapshot's data, new clusters, zeros and a discard hiding the
# snapshot's data, a write across the end of a snapshot cluster.
dio d "write -P 0x21 $((cb / 2)) $cb" "write -P 0x22 $((20 * cb)) $((2 * cb))" \
  "write -z $((2 * cb)) $cb" "discard $((5 * cb)) $cb" "write -P 0x23 $((6 * cb - 10)) 20"
assert_eq "$(stamp d/root.hds)" "$before" "md5/mtime of the snapshot's delta after top writes"
[[ $(md5 "d/$top_file") != "$top_before" ]] || fail "the writes did not reach the top delta"
verify_disk d
# A snapshot is read-only through io -u, readable with its own data.
expect_error 10 "$PLOOP" io -u "$S1" "$DD" "write -P 0x99 0 512"
err_has "read-only"
pl io -r -u "$S1" "$DD" "read -P 0x11 $((2 * cb)) $cb" "read -P 0x12 $((5 * cb + 100)) 5000"
assert_eq "$(stamp d/root.hds)" "$before" "md5/mtime of the snapshot's delta after io -u"

note "snapshot GUIDs: given, normalised, taken, reserved"
dsnap d 'ABCDEF01-2345-4678-9ABC-DEF012345678'
S2=$SNAP
assert_eq "$S2" '{abcdef01-2345-4678-9abc-def012345678}' "normalised snapshot GUID"
verify_disk d
listing=$(folder_stamps d)
expect_error 4 "$PLOOP" snapshot -u "$S1" "$DD"
err_has "exists"
expect_error 4 "$PLOOP" snapshot -u "${S2^^}" "$DD"
expect_error 2 "$PLOOP" snapshot -u "$TOP_GUID" "$DD"
err_has "reserved"
expect_error 2 "$PLOOP" snapshot -u "$NULL_GUID" "$DD"
expect_error 2 "$PLOOP" snapshot -u not-a-guid "$DD"
assert_eq "$(folder_stamps d)" "$listing" "the disk after refused snapshots"
dio d "write -P 0x31 $((30 * cb)) $((4 * cb))" "write -P 0x32 0 512"
verify_disk d

# --- switch ----------------------------------------------------------------
note "snapshot-switch rolls back"
old_top=$(file_of d "$TOP_GUID")
dswitch d "$S1"
assert_absent "d/$old_top"
[[ $(file_of d "$TOP_GUID") != "$old_top" ]] || fail "switch kept the old top file"
assert_eq "$(parent_of d "$TOP_GUID")" "$S1" "parent of the new top"
# The dropped data is really gone: the rolled-back disk reads S1's bytes.
pl io -r "$DD" "read -P 0x11 0 $((3 * cb))"
expect_rc 1 "$PLOOP" io -r "$DD" "read -P 0x31 $((30 * cb)) 512"
verify_disk d
# S1 now has two children: S2 and the new top.
pl snapshot-list "$DD"
out_has "^  \\$S2  \\$S1  "
out_has "^  \\$TOP_GUID \\*\\$S1  "
expect_error 2 "$PLOOP" snapshot-switch -u "$TOP_GUID" "$DD"
expect_error 3 "$PLOOP" snapshot-switch -u '{11111111-2222-4333-8444-555555555555}' "$DD"
# Neither S1's children can be merged into it, nor the chain merged down.
listing=$(folder_stamps d)
expect_error 10 "$PLOOP" snapshot-merge "$DD"
err_has "other children"
expect_error 10 "$PLOOP" snapshot-merge -A "$DD"
expect_error 10 "$PLOOP" snapshot-merge -u "$S2" "$DD"
expect_error 10 "$PLOOP" snapshot-merge -u "$S1" "$DD" # the base
err_has "base"
expect_error 2 "$PLOOP" snapshot-merge -A -u "$S2" "$DD"
assert_eq "$(folder_stamps d)" "$listing" "the disk after refused merges"

# --- delete and merge --------------------------------------------------------
note "snapshot-delete of a leaf"
files_before=$(find d -type f | wc -l)
s2_file=$(file_of d "$S2")
ddelete d "$S2"
assert_absent "d/$s2_file"
assert_eq "$(find d -type f | wc -l)" $((files_before - 1)) "files after deleting a leaf"
verify_disk d

note "snapshot-merge -u: the child survives on the parent's file"
dio d "write -P 0x41 $((40 * cb)) $((3 * cb))" "write -P 0x42 $((cb / 2)) 100"
dsnap d
S3=$SNAP
dio d "write -P 0x43 $((41 * cb)) $cb" "write -z 0 4096"
verify_disk d
s3_file=$(file_of d "$S3")
files_before=$(find d -type f | wc -l)
dmerge d "$S3"
assert_eq "$(file_of d "$S3")" root.hds "file of the merged snapshot"
assert_eq "$(parent_of d "$S3")" "$NULL_GUID" "parent of the merged snapshot"
assert_absent "d/$s3_file"
assert_eq "$(find d -type f | wc -l)" $((files_before - 1)) "files after merge -u"
verify_disk d

note "snapshot-merge of the top"
dsnap d
S4=$SNAP
dio d "write -P 0x51 $((50 * cb)) $((2 * cb))" "discard $((40 * cb)) $cb"
s4_file=$(file_of d "$S4")
top_file=$(file_of d "$TOP_GUID")
dmerge d
assert_eq "$(file_of d "$TOP_GUID")" "$s4_file" "file of the top after merging it"
assert_absent "d/$top_file"
verify_disk d

note "snapshot-delete refusals"
listing=$(folder_stamps d)
expect_error 10 "$PLOOP" snapshot-delete -u "$TOP_GUID" "$DD"
err_has "cannot delete the top"
expect_error 3 "$PLOOP" snapshot-delete -u '{11111111-2222-4333-8444-555555555555}' "$DD"
err_has "no snapshot"
expect_error 2 "$PLOOP" snapshot-delete -u bogus "$DD"
expect_error 2 "$PLOOP" snapshot-delete "$DD"
assert_eq "$(folder_stamps d)" "$listing" "the disk after refused deletes"

note "snapshot-delete with one child merges"
ddelete d "$S3"
assert_eq "$(file_of d "$TOP_GUID")" root.hds "file of the top after deleting its parent"
verify_disk d
expect_error 10 "$PLOOP" snapshot-merge "$DD"
expect_ok "$PLOOP" snapshot-merge -A "$DD" # nothing to do
verify_disk d

# --- resize under snapshots ----------------------------------------------------
note "resize with snapshots; merging a bigger child grows the parent"
dsnap d
S5=$SNAP
pl resize -s 12M "$DD"
truncate -s 12M d.ref/top.raw
dio d "write -P 0x61 $((12 * MiB - cb - 7)) $((cb + 7))" "write -P 0x62 $((8 * MiB - 512)) 1024"
verify_disk d
pl info --json "$DD"
out_has '"virtual_size": 12582912'
# The snapshot keeps the size it was taken at.
pl export -u "$S5" "$DD" s5.raw
assert_eq "$(file_size s5.raw)" $((8 * MiB)) "size of a snapshot taken before a resize"
rm s5.raw
dmerge d
verify_disk d

# --- a long chain ---------------------------------------------------------------
note "a chain of 13 deltas"
disk_init c 4M 64K
chain_snaps=()
for i in $(seq 1 12); do
  dio c "write -P $((0x10 + i)) $(((i * 5 % 48) * cb + 1000)) $((3 * cb))" \
    "write -P $((0x80 + i)) $(((i * 7 % 60) * cb)) 512"
  ((i % 3 == 0)) && dio c "write -z $((((i - 2) * 5 % 48) * cb)) $((cb + 4096))"
  ((i % 4 == 0)) && dio c "discard $((((i - 1) * 5 % 48) * cb)) $cb"
  dsnap c
  chain_snaps+=("$SNAP")
done
dio c "write -P 0xee $((10 * cb)) $((20 * cb))"
mapfile -t chain < <(chain_of c)
assert_eq "${#chain[@]}" 13 "deltas in the chain"
assert_eq "${chain[*]}" "${chain_snaps[*]} $TOP_GUID" "the chain, base first"
verify_disk c
# None of the 12 lower deltas changes when the top is written.
lower=()
for g in "${chain_snaps[@]}"; do
  f=$(file_of c "$g")
  lower+=("c/$f")
done
stamps=$(for f in "${lower[@]}"; do stamp "$f"; done)
sleep 0.05
dio c "write -P 0xef 0 $((64 * cb))"
assert_eq "$(for f in "${lower[@]}"; do stamp "$f"; done)" "$stamps" "lower deltas after a top write"
# Merge in the middle, delete in the middle, then everything.
dmerge c "${chain_snaps[6]}"
verify_disk c
ddelete c "${chain_snaps[2]}"
verify_disk c
dmerge c "${chain_snaps[11]}"
verify_disk c
dmerge_all c
assert_eq "$(chain_of c)" "$TOP_GUID" "chain after merge -A"
assert_eq "$(file_of c "$TOP_GUID")" root.hds "file of the top after merge -A"
verify_disk c

# --- raw and preallocated bases ---------------------------------------------------
note "a raw base"
disk_init r 4M 64K -f raw
dio r "write -P 0x71 1000 $((3 * cb))"
dsnap r
R1=$SNAP
before=$(stamp r/root.hds)
sleep 0.05
dio r "write -P 0x72 $((cb / 2)) $cb" "write -z $((2 * cb)) 100" "discard 0 512"
assert_eq "$(stamp r/root.hds)" "$before" "md5/mtime of the raw base after top writes"
verify_disk r
pl io -r -u "$R1" r "read -P 0x71 1000 $((3 * cb))"
dsnap r
dio r "write -P 0x73 $((4 * MiB - 100)) 100"
dmerge_all r
verify_disk r
# The raw file is the disk.
cmp r/root.hds r.ref/top.raw || fail "raw base differs from the expected disk after merge -A"
pl snapshot-list "$(pwd)/r" # a folder works too
out_has "root\.hds$"

note "a preallocated base"
disk_init p 2M 64K -f preallocated
dio p "write -P 0x74 0 $((2 * cb))"
dsnap p
dio p "write -P 0x75 $cb $((2 * cb))" "write -P 0x76 $((2 * MiB - cb)) $cb"
verify_disk p
dmerge p
verify_disk p
assert_eq "$(file_size p/root.hds)" $((cb + 2 * MiB)) "size of the preallocated base after merge"

# --- busy -------------------------------------------------------------------------
note "a disk in use refuses snapshot operations"
disk_init b 4M 64K
BDD=b/DiskDescriptor.xml
dio b "write -P 0x81 0 $((2 * cb))"
dsnap b
B1=$SNAP
dio b "write -P 0x82 $cb $((2 * cb))"
dsnap b
B2=$SNAP
dio b "write -P 0x83 $((2 * cb)) $((2 * cb))"
verify_disk b

# refused_while_open: every chain-changing command gets exit 9 with one
# line, and no file in the folder changes.
refused_while_open() {
  local listing cmd
  listing=$(folder_stamps b)
  for cmd in "snapshot" "snapshot -u {0a0b0c0d-1111-4222-8333-444455556666}" "snapshot-merge" \
    "snapshot-merge -u $B2" "snapshot-merge -A" "snapshot-switch -u $B1" "resize -s 8M" \
    "snapshot-delete -u $B2"; do
    # shellcheck disable=SC2086  # cmd is a word list
    expect_error 9 "$PLOOP" $cmd "$BDD"
    err_has "in use by another program"
  done
  assert_eq "$(folder_stamps b)" "$listing" "the disk after commands refused while in use"
}

HOLD_MS=60000 # killed long before; the bound keeps a stray holder finite
start_bg hold.out "$PLOOP" io "$BDD" "read -P 0x83 $((2 * cb)) 512" "sleep $HOLD_MS"
holder=$BG_PID
wait_for_output hold.out "^read 512 bytes at offset $((2 * cb))" "$holder"
refused_while_open
expect_error 9 "$PLOOP" export "$BDD" b.out
assert_absent b.out
still_running "$holder" "ploop io writer"
kill_bg "$holder"
verify_disk b

start_bg hold.out "$PLOOP" io -r "$BDD" "read -P 0x83 $((2 * cb)) 512" "sleep $HOLD_MS"
holder=$BG_PID
wait_for_output hold.out "^read 512 bytes at offset $((2 * cb))" "$holder"
refused_while_open
# Readers share: export, check and io -r still work.
pl export "$BDD" b.out
qemu_same b.out b.ref/top.raw raw
rm b.out
pl check "$BDD"
pl io -r -u "$B1" "$BDD" "read -P 0x81 0 $cb"
still_running "$holder" "ploop io reader"
kill_bg "$holder"
verify_disk b
# Once the holder is gone, the operations work.
dmerge b "$B2"
verify_disk b

echo PASS
