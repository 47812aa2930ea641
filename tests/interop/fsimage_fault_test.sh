#!/usr/bin/env bash
# A failed `init --from-dir` / `--from-tar` leaves nothing behind: with the
# host disk full from the Nth write on (PLOOP_FAULT=failfrom=write:N:ENOSPC)
# init exits 8 with one line and removes root.hds and DiskDescriptor.xml,
# for N from the first write to past mkfs and into the data; with enough
# writes it succeeds and e2fsck -fn is clean.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need e2fsck tar

mkdir -p src/sub
for i in $(seq 1 40); do head -c 20000 /dev/urandom >"src/sub/f$i"; done
for i in $(seq 1 300); do : >"src/sub/empty-with-a-long-name-$i"; done
tar -C src -czf src.tgz .

for from in "--from-dir src" "--from-tar src.tgz"; do
  note "init $from with the disk full from the Nth write"
  n=1
  tries=0
  while :; do
    rm -rf d
    mkdir d
    # shellcheck disable=SC2086
    run env PLOOP_FAULT="failfrom=write:$n:ENOSPC" "$PLOOP" init -s 64M $from d/root.hds
    if ((RC == 0)); then break; fi
    if ((RC != 8)); then
      _show "PLOOP_FAULT=failfrom=write:$n:ENOSPC $PLOOP init -s 64M $from d/root.hds" >&2
      fail "exit code $RC, expected 8"
    fi
    [[ $(wc -l <"$TMP/.err") == 1 ]] || fail "N=$n: more than one line on stderr: $ERR"
    [[ -z $(ls -A d) ]] || fail "N=$n: init failed but left $(ls -A d)"
    tries=$((tries + 1))
    ((tries < 200)) || fail "init never succeeded"
    n=$((n < 12 ? n + 1 : n * 3 / 2))
  done
  ((tries > 12)) || fail "only $tries failing points were tried"
  out_has 'files copied'
  pl export d/DiskDescriptor.xml whole.raw
  expect_ok e2fsck -fn whole.raw
  rm whole.raw
done
echo PASS
