// BlockExport over a ServedDisk, and the allocation/zeroing rules an NBD
// server needs.
//
// Concurrency is the ServedDisk's (served_disk.h): this layer adds no lock
// of its own on the data path. A fast-zero decision and the zeroing that
// follows are two steps: a write landing between them may make the zeroing
// slower than promised, never wrong (Discard and zero writes keep their
// semantics whatever the allocation is by then).
//
// Block status. NBD's "base:allocation" context says, per byte range,
// whether it is a hole (reads as zeros, no storage) or data. Clients use it
// to copy sparsely: qemu-img convert, nbdcopy and qemu-img compare skip
// holes. Our unit of allocation is the cluster: a cluster is data when any
// layer of the chain holds it (a BAT entry, or a raw base covering it), a
// hole otherwise. Data clusters that happen to hold zeros are reported as
// data; telling them apart would mean reading them.
//
//     clusters   [ D D . . D . . . ]      D = some layer holds it
//     request        [-----------]        offset..offset+length
//     extents        [D][ hole ][D][hole]  clipped to the request
//
// Zeroing. A zero request may unmap whole clusters (may_unmap) where no
// lower layer holds data; over data of a lower layer the top must get a
// real zero cluster (there is no on-disk zero marker), which is as slow as
// writing. A "fast zero" request is refused up front (NotSupported, nothing
// changed) unless ZeroIsFast() says no data needs writing, so a client that
// asks for one (qemu-img convert pre-zeroing a target) falls back to its
// own plan instead of waiting for a slow one.
#include "mount-helper/block_export.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>

#include "ploop/chain.h"
#include "ploop/disk.h"

namespace ploop::mount {

namespace {

constexpr size_t kZeroChunkBytes = 1 << 20;

const std::byte* Zeros() {
  static const std::vector<std::byte> zeros(kZeroChunkBytes);
  return zeros.data();
}

class ServedExport final : public BlockExport {
 public:
  explicit ServedExport(std::unique_ptr<ServedDisk> disk) : disk_(std::move(disk)) {}

  uint64_t size_bytes() const override { return disk_->size_bytes(); }
  uint64_t cluster_bytes() const override { return disk_->cluster_bytes(); }
  bool writable() const override { return disk_->writable(); }

  Status Read(uint64_t offset, std::span<std::byte> out) override {
    TRY(CheckOpen());
    return disk_->Read(offset, out);
  }

  Status Write(uint64_t offset, std::span<const std::byte> data) override {
    TRY(CheckOpen());
    return disk_->Write(offset, data);
  }

  Status Zero(uint64_t offset, uint64_t length, bool may_unmap, bool fast_only) override {
    TRY(CheckOpen());
    if (!disk_->writable()) return Status::FailedPrecondition("the disk is open read-only");
    TRY(CheckDiskRange(offset, length, disk_->size_bytes()));
    if (fast_only) {
      ASSIGN_OR_RETURN(bool fast, ZeroIsFast(*disk_, offset, length, may_unmap));
      if (!fast) return Status::NotSupported("zeroing this range means writing data");
    }
    if (may_unmap) return disk_->Discard(offset, length);
    // Zeros written as data: the disk's own rules still keep them from
    // allocating clusters nothing holds (they read as zeros already).
    while (length > 0) {
      uint64_t n = std::min<uint64_t>(length, kZeroChunkBytes);
      TRY(disk_->Write(offset, std::span<const std::byte>(Zeros(), n)));
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status Trim(uint64_t offset, uint64_t length) override {
    TRY(CheckOpen());
    return disk_->Discard(offset, length);
  }

  Status Flush() override {
    TRY(CheckOpen());
    return disk_->Flush();
  }

  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length, bool first_only) override {
    TRY(CheckOpen());
    return AllocationExtents(*disk_, offset, length, first_only);
  }

  Status Close() override {
    std::lock_guard lock(close_mu_);
    TRY(CheckOpen());
    closed_.store(true, std::memory_order_release);
    // The plugin closes on a stop request while requests may still run:
    // ServedDisk::Close() sets its closed flag before it quiesces, so a
    // request already past its check is waited for (the gate) and any later
    // one fails with FailedPrecondition; the disk object lives on until
    // the export is destroyed, after every connection is gone.
    return disk_->Close();
  }

 private:
  Status CheckOpen() const {
    return closed_.load(std::memory_order_acquire)
               ? Status::FailedPrecondition("the export is closed")
               : Status::Ok();
  }

  std::unique_ptr<ServedDisk> disk_;
  std::mutex close_mu_;  // one Close() at a time
  std::atomic<bool> closed_{false};
};

}  // namespace

Result<std::unique_ptr<Image>> OpenTarget(FileSystem& fs, const ExportTarget& target) {
  OpenOptions options;
  options.writable = target.writable;
  std::string dd_path;
  if (IsDescriptorPath(fs, target.path, &dd_path)) {
    ASSIGN_OR_RETURN(auto chain, OpenDisk(fs, dd_path, target.snapshot_guid, options, target.load));
    return std::unique_ptr<Image>(std::move(chain));
  }
  if (!target.snapshot_guid.empty()) {
    return Status::InvalidArgument("-u selects a snapshot of a disk: give its DiskDescriptor.xml");
  }
  return OpenImage(fs, target.path, options);
}

Result<std::unique_ptr<BlockExport>> OpenExport(FileSystem& fs, const ExportTarget& target) {
  ASSIGN_OR_RETURN(auto image, OpenTarget(fs, target));
  std::unique_ptr<Chain> chain;
  if (auto* as_chain = dynamic_cast<Chain*>(image.get())) {
    image.release();
    chain.reset(as_chain);
  } else {
    std::vector<std::unique_ptr<Image>> layers;
    layers.push_back(std::move(image));
    ASSIGN_OR_RETURN(chain, Chain::FromLayers(std::move(layers)));
  }
  ASSIGN_OR_RETURN(auto disk, ServedDisk::Create(std::move(chain), ServedDiskOptions{}));
  return ExportServedDisk(std::move(disk));
}

std::unique_ptr<BlockExport> ExportServedDisk(std::unique_ptr<ServedDisk> disk) {
  return std::make_unique<ServedExport>(std::move(disk));
}

Result<std::vector<Extent>> AllocationExtents(ServedDisk& disk, uint64_t offset, uint64_t length,
                                              bool first_only) {
  if (length == 0) return Status::InvalidArgument("block status of an empty range");
  ASSIGN_OR_RETURN(ServedDisk::AllocationMap map, disk.Allocation(offset, length));
  const uint64_t cb = disk.cluster_bytes();
  const uint64_t end = offset + length;
  std::vector<Extent> out;
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t index = pos / cb;
    const ServedDisk::ClusterHolders& h = map.clusters[index - map.first_cluster_index];
    const bool allocated = h.top || h.below;
    const uint64_t run_end = std::min((index + 1) * cb, end);
    if (!out.empty() && out.back().allocated == allocated) {
      out.back().length_bytes += run_end - pos;
    } else {
      if (first_only && !out.empty()) break;
      out.push_back(Extent{pos, run_end - pos, allocated});
    }
    pos = run_end;
  }
  return out;
}

Result<bool> ZeroIsFast(ServedDisk& disk, uint64_t offset, uint64_t length, bool may_unmap) {
  ASSIGN_OR_RETURN(ServedDisk::AllocationMap map, disk.Allocation(offset, length));
  const uint64_t cb = disk.cluster_bytes();
  const uint64_t size = disk.size_bytes();
  const uint64_t end = offset + length;
  for (size_t i = 0; i < map.clusters.size(); ++i) {
    const ServedDisk::ClusterHolders& h = map.clusters[i];
    if (h.below) return false;  // a zero cluster must be written over it
    if (!h.top) continue;       // reads as zeros already
    const uint64_t index = map.first_cluster_index + i;
    const bool whole = offset <= index * cb && std::min((index + 1) * cb, size) <= end;
    if (!(may_unmap && whole && map.top_unmaps)) return false;
  }
  return true;
}

int NbdErrno(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kInvalidArgument:
      return EINVAL;
    case StatusCode::kNoSpace:
      return ENOSPC;
    case StatusCode::kNotSupported:
      return ENOTSUP;
    case StatusCode::kFailedPrecondition:
      return EPERM;
    default:
      return EIO;
  }
}

}  // namespace ploop::mount
