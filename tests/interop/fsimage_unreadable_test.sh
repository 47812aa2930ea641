#!/usr/bin/env bash
# Unreadable source files: init --from-dir skips them with a one-line
# warning each (a directory it cannot list is created empty), still builds a
# clean file system, and says so. Run unprivileged: as root the build drops
# to nobody with setpriv, since root reads everything.
set -euo pipefail
. "$TESTS_DIR/interop/lib.sh"
need e2fsck

as_user=()
if [ "$(id -u)" = 0 ]; then
  need setpriv
  as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi

mkdir -p src/sub out
echo ok >src/good
echo secret >src/bad
echo hidden >src/sub/f
chmod 000 src/bad src/sub
chmod 0777 out
chmod o+rx . src

rc=0
"${as_user[@]}" "$PLOOP" init -s 64M --from-dir src out/root.hds >init.out 2>init.err || rc=$?
[ "$rc" = 0 ] || fail "init exited $rc: $(cat init.err)"
[ "$(wc -l <init.err)" = 2 ] || fail "expected two warnings, got: $(cat init.err)"
grep -q "src/bad: Permission denied (skipped)" init.err || fail "no warning for src/bad: $(cat init.err)"
grep -q "src/sub: Permission denied" init.err || fail "no warning for src/sub: $(cat init.err)"

pl ls out/DiskDescriptor.xml /
grep -q " good$" <<<"$OUT" || fail "good is missing: $OUT"
grep -q " sub$" <<<"$OUT" || fail "sub is missing: $OUT"
if grep -q " bad$" <<<"$OUT"; then fail "the unreadable file was copied: $OUT"; fi
pl ls out/DiskDescriptor.xml /sub
[ "$(grep -vc '^$' <<<"$OUT" || true)" = 0 ] || fail "sub should be empty: $OUT"
pl cat out/DiskDescriptor.xml /good
[ "$OUT" = ok ] || fail "good reads '$OUT'"
pl export out/DiskDescriptor.xml out.raw
e2fsck -fn out.raw >fsck.log 2>&1 || fail "e2fsck: $(cat fsck.log)"
echo PASS
