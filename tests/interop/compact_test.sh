#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `ploop compact`: a fragmented disk (discards in the base and in a delta
# above a snapshot) gives its space back. After compacting, every snapshot
# and the current disk export to the same content as before (checked
# against the qemu-io model of disk_lib.sh), every delta passes
# `qemu-img check`, the delta files are smaller on the host, a second run
# moves nothing, and a disk in use is refused with exit 9 and left as it
# was.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=disk_lib.sh
. "$here/disk_lib.sh"
need qemu-img qemu-io perl

KiB=1024
cb=$((64 * KiB))
DD=d/DiskDescriptor.xml
HOLD_MS=20000

# Allocated bytes of a file on the host.
host_bytes() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }

note "a fragmented disk: holes in the base and in the top above a snapshot"
disk_init d 16M 64K
dio d "write -P 0x31 0 $((40 * cb))"
dio d "discard $((2 * cb)) $((10 * cb))" "discard $((20 * cb)) $((5 * cb))"
dsnap d
S1=$SNAP
dio d "write -P 0x32 $((60 * cb)) $((30 * cb))" "write -z $((30 * cb)) $cb"
dio d "discard $((62 * cb)) $((20 * cb))"
verify_disk d
base_file=d/$(file_of d "$S1")
top_file=d/$(file_of d "$TOP_GUID")
base_size=$(file_size "$base_file")
top_size=$(file_size "$top_file")

note "compact"
pl compact "$DD"
out_has "^compacted 2 delta\\(s\\): "
verify_disk d
# Base: 40 clusters - 15 discarded = 25 data clusters and the header
# cluster; top: 30 - 20 discarded + the zero cluster hiding base data = 11.
assert_eq "$(file_size "$base_file")" $((26 * cb)) "base delta size after compact"
assert_eq "$(file_size "$top_file")" $((12 * cb)) "top delta size after compact"
((base_size > 26 * cb)) || fail "base delta was already $base_size bytes"
((top_size > 12 * cb)) || fail "top delta was already $top_size bytes"
(($(host_bytes "$base_file") <= 26 * cb)) || fail "base delta still holds $(host_bytes "$base_file") bytes"

note "a second compact moves nothing"
pl compact --json "$DD"
out_has '"moved_clusters": 0'
if grep -Eq '"moved_clusters": [1-9]' "$TMP/.out"; then fail "second compact moved clusters"; fi
verify_disk d

note "a disk in use is refused and left as it was"
dio d "discard $((60 * cb)) $cb"
before=$(folder_stamps d)
start_bg hold.out "$PLOOP" io "$DD" "read -P 0x32 $((85 * cb)) 512" "sleep $HOLD_MS"
holder=$BG_PID
wait_for_output hold.out "^read 512 bytes at offset $((85 * cb))" "$holder"
expect_error 9 "$PLOOP" compact "$DD"
err_has "ploop compact: .*in use"
still_running "$holder" "the disk holder"
kill_bg "$holder"
pl check "$DD"
assert_eq "$(folder_stamps d)" "$before" "files of the disk after a refused compact"

note "bad arguments"
expect_error 2 "$PLOOP" compact
expect_error 3 "$PLOOP" compact nowhere/DiskDescriptor.xml
echo "ok"
