// Image: one disk image file seen as a virtual block device of size_bytes().
//
// Two implementations: Delta (delta.h), a ploop/Parallels expanded or
// preallocated image, and RawImage (raw_image.h), a plain file. CreateImage()
// and OpenImage() pick the right one.
//
// Thread-safety: an Image is not thread-safe; callers serialise calls.
// Ownership: an Image owns its BlockFile; the FileSystem must outlive it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "ploop/format.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop {

enum class ImageKind {
  kExpanded,      // ploop image, clusters allocated on first write
  kPreallocated,  // ploop image, every cluster allocated at creation, identity BAT
  kRaw,           // plain file, byte i of the disk at byte i of the file
};

std::string_view ImageKindName(ImageKind kind);
// "expanded" (also "ploop1"), "preallocated", "raw"; nullopt otherwise.
std::optional<ImageKind> ParseImageKind(std::string_view name);

struct CreateOptions {
  uint64_t size_bytes = 0;
  uint64_t cluster_bytes = kDefaultClusterBytes;
  ImageKind kind = ImageKind::kExpanded;
};

struct OpenOptions {
  bool writable = false;
  // Treat the file as raw instead of looking for a ploop header.
  bool raw = false;
  // Take the QEMU/OpenVZ-compatible byte-range locks (lock.h). Turning this
  // off is for read-only inspection (`info`) of an image someone is using.
  bool lock = true;
  // A writable open of a dirty image runs check --repair first (the image
  // was not closed cleanly). When false such an open fails instead.
  bool repair_dirty = true;
};

// Facts about an image for `info`.
struct ImageStats {
  uint64_t allocated_clusters = 0;
  uint64_t file_bytes = 0;
};

class Image {
 public:
  virtual ~Image() = default;

  virtual ImageKind kind() const = 0;
  virtual uint64_t size_bytes() const = 0;
  virtual uint64_t cluster_bytes() const = 0;
  virtual bool writable() const = 0;
  virtual const std::string& path() const = 0;

  // Reads out.size() bytes at `offset_bytes`; unallocated ranges read as
  // zeros. InvalidArgument when the range passes size_bytes().
  virtual Status Read(uint64_t offset_bytes, std::span<std::byte> out) = 0;
  // Writes `data` at `offset_bytes`. Durable only after Flush(). NoSpace
  // when the host file system is full (the image stays consistent).
  // FailedPrecondition on a read-only image.
  virtual Status Write(uint64_t offset_bytes, std::span<const std::byte> data) = 0;
  // The range reads as zeros afterwards; whole clusters give their space
  // back where the kind allows it.
  virtual Status Discard(uint64_t offset_bytes, uint64_t length_bytes) = 0;
  // Makes every completed Write and Discard durable.
  virtual Status Flush() = 0;
  // Flushes, marks the image clean and releases it. Later calls fail. The
  // destructor closes an image that was not closed, ignoring errors.
  virtual Status Close() = 0;

  // Whether virtual cluster `cluster_index` may hold data (false: it reads
  // as zeros without looking). Used to copy images sparsely.
  virtual Result<bool> IsAllocated(uint64_t cluster_index) = 0;
  // Grows the virtual size (offline). InvalidArgument when smaller.
  virtual Status Grow(uint64_t new_size_bytes) = 0;
  virtual Result<ImageStats> Stats() = 0;
};

// Creates a new image file at `path` (which must not exist) and returns it
// open read-write. On failure nothing is left at `path`.
Result<std::unique_ptr<Image>> CreateImage(FileSystem& fs, const std::string& path,
                                           const CreateOptions& options);

// Opens an existing image: a ploop image when the file starts with a ploop
// signature, raw only when options.raw. Corruption (with the reason and a
// hint to run `ploop check`) when the header or BAT is invalid, Busy when
// another program holds it.
Result<std::unique_ptr<Image>> OpenImage(FileSystem& fs, const std::string& path,
                                         const OpenOptions& options);

// InvalidArgument unless [offset, offset+length) lies within a disk of
// `size_bytes` (overflow-safe); the one range check of every Image.
Status CheckDiskRange(uint64_t offset_bytes, uint64_t length_bytes, uint64_t size_bytes);

// True when every byte of `data` is zero.
bool IsZero(std::span<const std::byte> data);

// Writes `length_bytes` zeros into `file` at `offset_bytes` (real writes,
// not holes), in chunks from one shared zero buffer. Errors of WriteAt().
Status WriteZeros(BlockFile& file, uint64_t offset_bytes, uint64_t length_bytes);

}  // namespace ploop
