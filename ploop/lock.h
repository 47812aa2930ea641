// Image locking compatible with QEMU and OpenVZ ploop.
//
// QEMU's file driver expresses "I hold permission P" as a shared lock on
// byte 100+P and "nobody else may hold P" as a shared lock on byte 200+P,
// for P = consistent-read 0, write 1, write-unchanged 2, resize 3,
// graph-mod 4; it tests for conflicts with F_OFD_GETLK write probes.
// OpenVZ ploop (since 2021) holds shared locks on bytes 200..204 and probes
// the same bytes. We speak both:
//   - a writer probes 100..104 and 200..204 and holds 100, 101, 103 and
//     200..204, so QEMU and ploop both see it as exclusive;
//   - a reader probes 101, 103 (someone writing) and 200 (someone refusing
//     readers) and holds 100, 201, 203: readers share, writers are refused.
#pragma once

#include "ploop/io/file_system.h"

namespace ploop {

LockRequest WriterLockRequest();
LockRequest ReaderLockRequest();

// Takes the locks for `writable` on `file`; Busy with a one-line reason when
// another program holds the image.
Status LockImage(BlockFile& file, bool writable);

}  // namespace ploop
