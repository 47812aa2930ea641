// Online operations on a mounted disk: what `ploop snapshot`, `ploop
// resize` and `ploop snapshot-merge` do when the disk's top is served by a
// mount daemon. The daemon (mount-helper/daemon.h) runs the kernel's part
// (freeze, FUSE and loop sizes); the layer and descriptor steps given to it
// here need snapshot/, which mount-helper does not link.
#pragma once

#include <optional>
#include <string>

#include "mount-helper/daemon.h"
#include "mount-helper/records.h"
#include "ploop/descriptor.h"

namespace ploop::cli {

// The online operations a daemon serving `dd_path` runs (given to it at
// mount time, with the descriptor load options of the mount).
mount::OnlineOperations OnlineOperationsFor(const std::string& dd_path,
                                            const DescriptorLoadOptions& load);

// The live read-write mount of the disk's top, if there is one. The run
// dir is root's, so without root this finds nothing and the offline path
// reports the disk Busy ("in use by /dev/loopN").
std::optional<mount::MountRecord> ActiveMount(const std::string& dd_path);

// Sends `request` to the mount's daemon; NotSupported for a disk attached
// straight to a loop device (no daemon).
Result<mount::Json> OnlineCall(const mount::MountRecord& record, const mount::Json& request,
                               int timeout_ms = 600000);

// `ploop snapshot-merge` of a mounted disk: a snapshot below the top that
// the daemon serves is merged online (the daemon, online.cc); the top (or
// -A) is refused (FailedPrecondition, exit 10). nullopt when the disk is
// not mounted or the snapshot is off the served chain (the offline merge
// then runs). Prints errors; returns the exit code.
std::optional<int> MergeIfMounted(const std::string& dd_path, const std::string& guid, bool all);

// `ploop resize -s SIZE DD.xml`: online when the disk is mounted (the
// daemon grows the disk, the FUSE file and the loop device; then the
// mounted ext4 is grown with EXT4_IOC_RESIZE_FS), else offline (ResizeDisk,
// then an ext4 at the start of the disk is grown by resize2fs on a device
// our daemon serves -- root only; without root a note says so). Prints
// errors; returns the exit code.
int ResizeDescriptorDisk(const std::string& dd_path, uint64_t size_bytes);

}  // namespace ploop::cli
