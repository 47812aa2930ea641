// BlockExport: a disk as a block-device server (the NBD export) sees it.
//
// A server calls these from many threads at once: several clients, each
// with several requests in flight. The interface is what a server needs and
// no more -- read, write, write zeros (with "may unmap" and "only if fast"),
// trim, flush, and block status -- so the one implementation here,
// SerializeImage(), which puts one mutex around an Image (Image, Chain and
// Delta are not thread-safe), can later be replaced by a concurrent layer
// without touching the server.
//
// The pure helpers below (AllocationExtents, ZeroIsFast, NbdErrno) hold the
// logic a server plugin would otherwise bury in its callbacks; they are
// unit-tested without a server.
//
// Thread-safety: BlockExport methods are thread-safe. The helpers taking an
// Image& need the caller to serialise access to that Image.
// Ownership: SerializeImage() takes the Image.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ploop/descriptor.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
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

  // As Image::Read / Image::Write.
  virtual Status Read(uint64_t offset_bytes, std::span<std::byte> out) = 0;
  virtual Status Write(uint64_t offset_bytes, std::span<const std::byte> data) = 0;
  // The range reads as zeros afterwards. `may_unmap`: whole clusters may be
  // given back instead of written (NBD's "no hole" flag clear).
  // `fast_only`: do it only when it costs less than writing the zeros
  // (ZeroIsFast); otherwise return NotSupported without changing anything.
  virtual Status Zero(uint64_t offset_bytes, uint64_t length_bytes, bool may_unmap,
                      bool fast_only) = 0;
  // The range reads as zeros afterwards; whole clusters are unmapped where
  // no lower layer holds data (Image::Discard).
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

// OpenTarget() wrapped in SerializeImage(), ready to serve.
Result<std::unique_ptr<BlockExport>> OpenExport(FileSystem& fs, const ExportTarget& target);

// A BlockExport over `image` whose every call holds one mutex. Correct for
// any number of threads; requests are served one at a time (the network
// I/O around them still runs in parallel).
std::unique_ptr<BlockExport> SerializeImage(std::unique_ptr<Image> image);

// The allocation of [offset, offset+length) of `image` (a Chain, or one
// image) as contiguous runs in ascending order, each as long as possible,
// covering at least the first byte and at most the disk. A cluster counts
// as allocated when any layer holds it (a raw base holds everything it
// covers). `first_only` (NBD_CMD_FLAG_REQ_ONE) stops after the first run.
// InvalidArgument when the range is empty or passes the end of the disk.
Result<std::vector<Extent>> AllocationExtents(Image& image, uint64_t offset_bytes,
                                              uint64_t length_bytes, bool first_only);

// Whether zeroing [offset, offset+length) of `image` writes no data: every
// cluster it touches is held by no layer (nothing to do), or -- with
// `may_unmap` -- a whole cluster held only by the top of an expanded image
// (its BAT entry is cleared). Zeros over data of a lower layer must be
// written as a zero cluster into the top, and a preallocated image writes
// zeros in place: neither is fast.
Result<bool> ZeroIsFast(Image& image, uint64_t offset_bytes, uint64_t length_bytes, bool may_unmap);

// The errno an NBD server returns for `status`: only errors the NBD
// protocol can carry (EPERM, EIO, EINVAL, ENOSPC, ENOTSUP); corruption and
// everything without a better match become EIO. 0 for OK.
int NbdErrno(const Status& status);

}  // namespace ploop::mount
