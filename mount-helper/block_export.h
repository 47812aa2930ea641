// BlockExport: a disk as a block-device server (the NBD export) sees it.
//
// A server calls these from many threads at once: several clients, each
// with several requests in flight. The interface is what a server needs and
// no more -- read, write, write zeros (with "may unmap" and "only if fast"),
// trim, flush, and block status. OpenExport() serves the disk through a
// ServedDisk (ploop/served_disk.h), the mount daemon's concurrent data path:
// reads and writes of allocated clusters run in parallel without a lock,
// allocations and trims lock one cluster each, a flush runs beside the
// other requests, and block status reads the BATs lock-free.
//
// The helpers below (AllocationExtents, ZeroIsFast, NbdErrno) hold the
// logic a server plugin would otherwise bury in its callbacks; they are
// unit-tested without a server.
//
// Thread-safety: BlockExport methods and the helpers are thread-safe.
// Ownership: the export owns its ServedDisk (and so the image files).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ploop/descriptor.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "ploop/served_disk.h"
#include "ploop/status.h"

namespace ploop::mount {

// A run of the disk for NBD block status ("base:allocation").
struct Extent {
  uint64_t offset_bytes = 0;
  uint64_t length_bytes = 0;
  // True: some layer holds data here. False: no layer does; the range is a
  // hole that reads as zeros (NBD_STATE_HOLE | NBD_STATE_ZERO).
  bool allocated = false;

  bool operator==(const Extent&) const = default;
};

class BlockExport {
 public:
  virtual ~BlockExport() = default;

  virtual uint64_t size_bytes() const = 0;
  virtual uint64_t cluster_bytes() const = 0;
  virtual bool writable() const = 0;

  // As ServedDisk::Read / ServedDisk::Write.
  virtual Status Read(uint64_t offset_bytes, std::span<std::byte> out) = 0;
  virtual Status Write(uint64_t offset_bytes, std::span<const std::byte> data) = 0;
  // The range reads as zeros afterwards. `may_unmap`: whole clusters may be
  // given back instead of written (NBD's "no hole" flag clear).
  // `fast_only`: do it only when it costs less than writing the zeros
  // (ZeroIsFast); otherwise return NotSupported without changing anything.
  virtual Status Zero(uint64_t offset_bytes, uint64_t length_bytes, bool may_unmap,
                      bool fast_only) = 0;
  // The range reads as zeros afterwards, never as older data of a lower
  // layer; whole clusters are unmapped where no lower layer holds data
  // (ServedDisk::Discard).
  virtual Status Trim(uint64_t offset_bytes, uint64_t length_bytes) = 0;
  // Makes every completed write, zero and trim durable.
  virtual Status Flush() = 0;
  // Allocation of [offset, offset+length), see AllocationExtents().
  virtual Result<std::vector<Extent>> Extents(uint64_t offset_bytes, uint64_t length_bytes,
                                              bool first_only) = 0;
  // Flushes and closes the image (clean flag set). Later calls fail.
  virtual Status Close() = 0;
};

// What to serve: a DiskDescriptor.xml (or the folder holding one) and
// optionally one of its snapshots, or a single ploop image file.
struct ExportTarget {
  std::string path;
  std::string snapshot_guid;  // empty: the top
  bool writable = false;      // only the top of a disk can be written
  DescriptorLoadOptions load;
};

// Opens `target` (a dirty top opened writable is repaired first, as every
// writable open does). Errors of OpenDisk()/OpenImage(); InvalidArgument
// for a snapshot of a single image file; FailedPrecondition for writing a
// snapshot.
Result<std::unique_ptr<Image>> OpenTarget(FileSystem& fs, const ExportTarget& target);

// OpenTarget() served through a ServedDisk, ready to serve from many
// threads. A single image is served as a chain of one layer. Errors of
// OpenTarget() and ServedDisk::Create().
Result<std::unique_ptr<BlockExport>> OpenExport(FileSystem& fs, const ExportTarget& target);

// A BlockExport over `disk`.
std::unique_ptr<BlockExport> ExportServedDisk(std::unique_ptr<ServedDisk> disk);

// The allocation of [offset, offset+length) of `disk` as contiguous runs
// in ascending order, each as long as possible, covering at least the
// first byte and at most the disk. A cluster counts as allocated when any
// layer holds it (a raw base holds everything it covers). `first_only`
// (NBD_CMD_FLAG_REQ_ONE) stops after the first run. InvalidArgument when
// the range is empty or passes the end of the disk; FailedPrecondition when
// the disk is closed.
Result<std::vector<Extent>> AllocationExtents(ServedDisk& disk, uint64_t offset_bytes,
                                              uint64_t length_bytes, bool first_only);

// Whether zeroing [offset, offset+length) of `disk` writes no data: every
// cluster it touches is held by no layer (nothing to do), or -- with
// `may_unmap` -- a whole cluster held only by the top of an expanded image
// (its BAT entry is cleared). Zeros over data of a lower layer must be
// written as a zero cluster into the top, and a preallocated image writes
// zeros in place: neither is fast. Errors of ServedDisk::Allocation().
Result<bool> ZeroIsFast(ServedDisk& disk, uint64_t offset_bytes, uint64_t length_bytes,
                        bool may_unmap);

// The errno an NBD server returns for `status`: only errors the NBD
// protocol can carry (EPERM, EIO, EINVAL, ENOSPC, ENOTSUP); corruption and
// everything without a better match become EIO. 0 for OK.
int NbdErrno(const Status& status);

}  // namespace ploop::mount
