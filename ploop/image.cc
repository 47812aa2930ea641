#include "ploop/image.h"

#include <array>

#include "ploop/delta.h"
#include "ploop/raw_image.h"

namespace ploop {

std::string_view ImageKindName(ImageKind kind) {
  switch (kind) {
    case ImageKind::kExpanded:
      return "expanded";
    case ImageKind::kPreallocated:
      return "preallocated";
    case ImageKind::kRaw:
      return "raw";
  }
  return "?";
}

std::optional<ImageKind> ParseImageKind(std::string_view name) {
  if (name == "expanded" || name == "ploop1") return ImageKind::kExpanded;
  if (name == "preallocated") return ImageKind::kPreallocated;
  if (name == "raw") return ImageKind::kRaw;
  return std::nullopt;
}

Status CheckDiskRange(uint64_t offset, uint64_t length, uint64_t size) {
  if (offset > size || length > size - offset) {
    return Status::InvalidArgument("range " + std::to_string(offset) + "+" +
                                   std::to_string(length) + " is past the end of the disk (" +
                                   std::to_string(size) + " bytes)");
  }
  return Status::Ok();
}

Result<std::unique_ptr<Image>> CreateImage(FileSystem& fs, const std::string& path,
                                           const CreateOptions& options) {
  if (options.kind == ImageKind::kRaw) {
    ASSIGN_OR_RETURN(auto raw, RawImage::Create(fs, path, options.size_bytes));
    return std::unique_ptr<Image>(std::move(raw));
  }
  ASSIGN_OR_RETURN(auto delta, Delta::Create(fs, path, options));
  return std::unique_ptr<Image>(std::move(delta));
}

Result<std::unique_ptr<Image>> OpenImage(FileSystem& fs, const std::string& path,
                                         const OpenOptions& options) {
  if (options.raw) {
    ASSIGN_OR_RETURN(auto raw, RawImage::Open(fs, path, options));
    return std::unique_ptr<Image>(std::move(raw));
  }
  ASSIGN_OR_RETURN(auto delta, Delta::Open(fs, path, options));
  return std::unique_ptr<Image>(std::move(delta));
}

}  // namespace ploop
