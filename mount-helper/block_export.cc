// BlockExport over an Image, and the allocation/zeroing rules an NBD
// server needs.
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
#include <cerrno>
#include <mutex>

#include "ploop/chain.h"
#include "ploop/disk.h"

namespace ploop::mount {

namespace {

// The layers of `image`, base first: a Chain's, or the image alone.
std::vector<Image*> LayersOf(Image& image) {
  std::vector<Image*> layers;
  if (auto* chain = dynamic_cast<Chain*>(&image)) {
    for (size_t i = 0; i < chain->depth(); ++i) layers.push_back(&chain->layer(i));
  } else {
    layers.push_back(&image);
  }
  return layers;
}

// Whether `layer` holds cluster `index`; a layer smaller than the disk
// holds nothing past its end.
Result<bool> LayerHolds(Image& layer, uint64_t index) {
  if (index * layer.cluster_bytes() >= layer.size_bytes()) return false;
  return layer.IsAllocated(index);
}

constexpr size_t kZeroChunkBytes = 1 << 20;

const std::byte* Zeros() {
  static const std::vector<std::byte> zeros(kZeroChunkBytes);
  return zeros.data();
}

class SerializedExport final : public BlockExport {
 public:
  explicit SerializedExport(std::unique_ptr<Image> image)
      : image_(std::move(image)),
        size_bytes_(image_->size_bytes()),
        cluster_bytes_(image_->cluster_bytes()),
        writable_(image_->writable()) {}

  ~SerializedExport() override {
    std::lock_guard lock(mu_);
    if (!closed_) image_->Close().IgnoreError();
  }

  uint64_t size_bytes() const override { return size_bytes_; }
  uint64_t cluster_bytes() const override { return cluster_bytes_; }
  bool writable() const override { return writable_; }

  Status Read(uint64_t offset, std::span<std::byte> out) override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    return image_->Read(offset, out);
  }

  Status Write(uint64_t offset, std::span<const std::byte> data) override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    return image_->Write(offset, data);
  }

  Status Zero(uint64_t offset, uint64_t length, bool may_unmap, bool fast_only) override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    if (!writable_) return Status::FailedPrecondition(image_->path() + " is open read-only");
    TRY(CheckDiskRange(offset, length, size_bytes_));
    if (fast_only) {
      ASSIGN_OR_RETURN(bool fast, ZeroIsFast(*image_, offset, length, may_unmap));
      if (!fast) return Status::NotSupported("zeroing this range means writing data");
    }
    if (may_unmap) return image_->Discard(offset, length);
    // Zeros written as data: the image's own rules still keep them from
    // allocating clusters nothing holds (they read as zeros already).
    while (length > 0) {
      uint64_t n = std::min<uint64_t>(length, kZeroChunkBytes);
      TRY(image_->Write(offset, std::span<const std::byte>(Zeros(), n)));
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status Trim(uint64_t offset, uint64_t length) override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    return image_->Discard(offset, length);
  }

  Status Flush() override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    return image_->Flush();
  }

  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length, bool first_only) override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    return AllocationExtents(*image_, offset, length, first_only);
  }

  Status Close() override {
    std::lock_guard lock(mu_);
    TRY(CheckOpen());
    closed_ = true;
    return image_->Close();
  }

 private:
  Status CheckOpen() const {
    return closed_ ? Status::FailedPrecondition("the export is closed") : Status::Ok();
  }

  std::mutex mu_;
  std::unique_ptr<Image> image_;  // guarded by mu_
  bool closed_ = false;           // guarded by mu_
  const uint64_t size_bytes_;
  const uint64_t cluster_bytes_;
  const bool writable_;
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
  return SerializeImage(std::move(image));
}

std::unique_ptr<BlockExport> SerializeImage(std::unique_ptr<Image> image) {
  return std::make_unique<SerializedExport>(std::move(image));
}

Result<std::vector<Extent>> AllocationExtents(Image& image, uint64_t offset, uint64_t length,
                                              bool first_only) {
  if (length == 0) return Status::InvalidArgument("block status of an empty range");
  TRY(CheckDiskRange(offset, length, image.size_bytes()));
  const uint64_t cb = image.cluster_bytes();
  const uint64_t end = offset + length;
  std::vector<Extent> out;
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t index = pos / cb;
    ASSIGN_OR_RETURN(bool allocated, image.IsAllocated(index));
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

Result<bool> ZeroIsFast(Image& image, uint64_t offset, uint64_t length, bool may_unmap) {
  TRY(CheckDiskRange(offset, length, image.size_bytes()));
  if (length == 0) return true;
  const std::vector<Image*> layers = LayersOf(image);
  Image& top = *layers.back();
  const uint64_t cb = image.cluster_bytes();
  const uint64_t size = image.size_bytes();
  const uint64_t end = offset + length;
  for (uint64_t index = offset / cb; index * cb < end; ++index) {
    for (size_t level = 0; level + 1 < layers.size(); ++level) {
      ASSIGN_OR_RETURN(bool below, LayerHolds(*layers[level], index));
      if (below) return false;  // a zero cluster must be written over it
    }
    ASSIGN_OR_RETURN(bool in_top, LayerHolds(top, index));
    if (!in_top) continue;  // reads as zeros already
    const bool whole = offset <= index * cb && std::min((index + 1) * cb, size) <= end;
    if (!(may_unmap && whole && top.kind() == ImageKind::kExpanded)) return false;
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
