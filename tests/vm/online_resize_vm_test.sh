#!/usr/bin/env bash
# In a VM with a stock Debian kernel (../shared/vm/run-in-vm), where root has
# every capability: tests/privileged/mount_online_resize_test.sh with the
# online branch required -- `ploop resize` of a mounted disk grows the
# mounted ext4 in place (EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE, which
# the root of some containers, this project's build machines among them,
# lacks; there the privileged test can only check the refusal).
#
# Skips (77) without root or without run-in-vm; under CI=true it fails
# instead. The VM runs the binaries of this build (it sees the host's root
# file system).
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"

vm="$(cd "$TESTS_DIR/../.." && pwd)/shared/vm/run-in-vm"
[[ $(id -u) == 0 ]] || skip "needs root (run-in-vm)"
[[ -x $vm ]] || skip "no $vm"

"$vm" --timeout 900 --mem 3G --scratch 4G \
  --env TMPDIR=/scratch --env CI=true --env PLOOP="$PLOOP" --env TESTS_DIR="$TESTS_DIR" \
  --env PLOOP_REQUIRE_ONLINE_GROW=1 \
  -- bash "$TESTS_DIR/privileged/mount_online_resize_test.sh"
