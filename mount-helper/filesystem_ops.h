// What online operations do to a mounted file system: freeze it for a
// snapshot (FIFREEZE/FITHAW) and grow ext4 into a larger device
// (EXT4_IOC_RESIZE_FS).
//
// Thread-safety: functions.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::mount {

// Frozen file systems, thawed when this goes away (or by Thaw()).
class FrozenFilesystems {
 public:
  // Syncs, then freezes each mountpoint in turn (FIFREEZE: dirty data is
  // written, new writes wait). On an error the ones frozen so far are thawed
  // again. NotSupported for a file system that cannot be frozen.
  static Result<std::unique_ptr<FrozenFilesystems>> Freeze(const std::vector<std::string>& dirs);
  ~FrozenFilesystems();
  // Thaws them all; the first error is returned, every one is tried.
  Status Thaw();
  // When the first FIFREEZE began (after the syncs): writers wait from here.
  std::chrono::steady_clock::time_point started() const { return started_; }

 private:
  FrozenFilesystems() = default;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::vector<std::pair<std::string, int>> frozen_;  // mountpoint, open fd
};

// Grows the ext4 file system mounted at `dir` to fill its device of
// `device_bytes` (EXT4_IOC_RESIZE_FS, the call resize2fs makes for a
// mounted ext4). Returns the file system's new size in bytes. NotSupported
// for another file system type.
Result<uint64_t> GrowExt4Online(const std::string& dir, uint64_t device_bytes);

// The disk as the block device `device` shows it, read-only, without image
// locks (it is not an image file): what the device's users wrote is there,
// cached or not, and a daemon serving the disk keeps serving it. Errors of
// open(2).
Result<std::unique_ptr<Image>> OpenDeviceForReading(const std::string& device);

// Grows the ext2/3/4 file system on `device`, not mounted, to fill it:
// `e2fsck -f -p` (resize2fs insists on a checked file system), then
// `resize2fs`. NotFound when e2fsprogs is missing; FailedPrecondition when
// e2fsck finds errors it cannot fix; IOError with resize2fs's words.
Status GrowExt4OnDevice(const std::string& device);

}  // namespace ploop::mount
