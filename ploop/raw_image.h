// RawImage: a plain file whose byte i is byte i of the disk.
//
// Thread-safety: not thread-safe (but see file()).
#pragma once

#include <memory>

#include "ploop/image.h"

namespace ploop {

class RawImage final : public Image {
 public:
  // Creates `path` (which must not exist) with `size_bytes` allocated, as
  // OpenVZ ploop does for raw images. Removed again on failure.
  static Result<std::unique_ptr<RawImage>> Create(FileSystem& fs, const std::string& path,
                                                  uint64_t size_bytes);
  static Result<std::unique_ptr<RawImage>> Open(FileSystem& fs, const std::string& path,
                                                const OpenOptions& options);
  ~RawImage() override;

  ImageKind kind() const override { return ImageKind::kRaw; }
  uint64_t size_bytes() const override { return size_bytes_; }
  // Raw images have no clusters; sparse copies look at 1 MiB at a time.
  uint64_t cluster_bytes() const override { return kDefaultClusterBytes; }
  bool writable() const override { return writable_; }
  const std::string& path() const override { return file_->path(); }

  Status Read(uint64_t offset_bytes, std::span<std::byte> out) override;
  Status Write(uint64_t offset_bytes, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes) override;
  Status Flush() override;
  Status Close() override;
  Result<bool> IsAllocated(uint64_t cluster_index) override;
  Status Grow(uint64_t new_size_bytes) override;
  Result<ImageStats> Stats() override;

  // The file: disk byte i is file byte i. Reads may run from many threads
  // at once (served_disk.h reads a raw base straight from it).
  BlockFile& file() { return *file_; }

 private:
  RawImage(std::unique_ptr<BlockFile> file, uint64_t size_bytes, bool writable)
      : file_(std::move(file)), size_bytes_(size_bytes), writable_(writable) {}
  Status CheckRange(uint64_t offset, uint64_t length) const;

  std::unique_ptr<BlockFile> file_;
  uint64_t size_bytes_;
  bool writable_;
  bool closed_ = false;
};

}  // namespace ploop
