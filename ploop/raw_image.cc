#include "ploop/raw_image.h"

#include <algorithm>
#include <vector>

#include "ploop/lock.h"

namespace ploop {

Result<std::unique_ptr<RawImage>> RawImage::Create(FileSystem& fs, const std::string& path,
                                                   uint64_t size_bytes) {
  if (size_bytes == 0) return Status::InvalidArgument("disk size must not be zero");
  if (size_bytes % kSectorBytes != 0) {
    return Status::InvalidArgument("raw disk size must be a multiple of 512 bytes");
  }
  ASSIGN_OR_RETURN(auto file, fs.Create(path, /*exclusive=*/true));
  Status s = [&]() -> Status {
    TRY(LockImage(*file, true));
    TRY(file->Allocate(0, size_bytes));
    TRY(file->Sync());
    return Status::Ok();
  }();
  file.reset();
  if (!s.ok()) {
    fs.Remove(path).IgnoreError();
    return std::move(s).WithContext("create " + path);
  }
  OpenOptions open;
  open.writable = true;
  open.raw = true;
  return Open(fs, path, open);
}

Result<std::unique_ptr<RawImage>> RawImage::Open(FileSystem& fs, const std::string& path,
                                                 const OpenOptions& options) {
  ASSIGN_OR_RETURN(auto file,
                   fs.Open(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly));
  if (options.lock) TRY(LockImage(*file, options.writable));
  ASSIGN_OR_RETURN(uint64_t size, file->Size());
  return std::unique_ptr<RawImage>(new RawImage(std::move(file), size, options.writable));
}

RawImage::~RawImage() {
  if (!closed_) Close().IgnoreError();
}

Status RawImage::CheckRange(uint64_t offset, uint64_t length) const {
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  return CheckDiskRange(offset, length, size_bytes_);
}

Status RawImage::Read(uint64_t offset, std::span<std::byte> out) {
  TRY(CheckRange(offset, out.size()));
  return file_->ReadAt(offset, out);
}

Status RawImage::Write(uint64_t offset, std::span<const std::byte> data) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckRange(offset, data.size()));
  return file_->WriteAt(offset, data);
}

Status RawImage::Discard(uint64_t offset, uint64_t length) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckRange(offset, length));
  if (length == 0) return Status::Ok();
  if (file_->CanPunchHole()) {
    Status s = file_->PunchHole(offset, length);
    if (s.ok() || s.code() != StatusCode::kNotSupported) return s;
  }
  std::vector<std::byte> zeros(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    uint64_t n = std::min<uint64_t>(length, zeros.size());
    TRY(file_->WriteAt(offset, std::span<const std::byte>(zeros.data(), n)));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Status RawImage::Flush() {
  if (!writable_ || closed_) return Status::Ok();
  return file_->Sync();
}

Status RawImage::Close() {
  if (closed_) return Status::Ok();
  Status s = Flush();
  closed_ = true;
  file_.reset();
  return s;
}

Result<bool> RawImage::IsAllocated(uint64_t cluster_index) {
  uint64_t start = cluster_index * cluster_bytes();
  if (start >= size_bytes_) return Status::InvalidArgument("cluster index past the end");
  ASSIGN_OR_RETURN(auto data, file_->NextData(start));
  return data.has_value() && *data < std::min(start + cluster_bytes(), size_bytes_);
}

Status RawImage::Grow(uint64_t new_size_bytes) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  if (new_size_bytes < size_bytes_) {
    return Status::InvalidArgument("new size is smaller than the disk; shrinking is not supported");
  }
  if (new_size_bytes % kSectorBytes != 0) {
    return Status::InvalidArgument("raw disk size must be a multiple of 512 bytes");
  }
  if (new_size_bytes == size_bytes_) return Status::Ok();
  TRY(file_->Allocate(size_bytes_, new_size_bytes - size_bytes_));
  TRY(file_->Sync());
  size_bytes_ = new_size_bytes;
  return Status::Ok();
}

Result<ImageStats> RawImage::Stats() {
  ImageStats st;
  ASSIGN_OR_RETURN(st.file_bytes, file_->Size());
  uint64_t clusters = (size_bytes_ + cluster_bytes() - 1) / cluster_bytes();
  for (uint64_t c = 0; c < clusters; ++c) {
    ASSIGN_OR_RETURN(bool allocated, IsAllocated(c));
    st.allocated_clusters += allocated;
  }
  return st;
}

}  // namespace ploop
