// Loop devices: attach a file to a free /dev/loopN (LOOP_CONFIGURE, one
// atomic ioctl), detach it, and read a device's state from sysfs.
//
// Direct I/O: with `direct_io` the loop device reads and writes its backing
// file with O_DIRECT semantics (IOCB_DIRECT, asynchronously), so pages are
// not cached twice (once for the device, once for the file). The kernel
// turns it on only when the backing file allows O_DIRECT and the device's
// logical block size fits the file's alignment; LoopState says whether it
// is on. A FUSE file qualifies (the daemon opens it FOPEN_DIRECT_IO).
//
// Detaching (LOOP_CLR_FD) of a device somebody still has open is deferred by
// the kernel until the last close (it sets autoclear); DetachLoop() returns
// at once either way.
//
// Thread-safety: functions; the kernel serialises per device.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "ploop/status.h"

namespace ploop::mount {

struct LoopConfig {
  int backing_fd = -1;        // kept by the device; the caller may close its copy
  uint64_t offset_bytes = 0;  // where the disk starts in the file
  uint64_t size_bytes = 0;    // 0: to the end of the file
  bool read_only = false;
  bool direct_io = true;
  bool autoclear = false;  // detach when the last opener closes
  std::string name;        // shown as lo_file_name (informational)
};

// Attaches to a free loop device; returns its path ("/dev/loop3"). Retries
// when another program takes the same free device first. IOError with the
// errno otherwise; NotSupported without loop support.
Result<std::string> AttachLoop(const LoopConfig& config);

// LOOP_CLR_FD: detaches now, or at the last close if the device is open.
// NotFound when nothing is attached.
Status DetachLoop(const std::string& device);

// Sets LO_FLAGS_AUTOCLEAR on an attached device.
Status SetAutoclear(const std::string& device);
// Makes the device take the current size of its backing file
// (LOOP_SET_CAPACITY), after the file grew.
Status RefreshLoopCapacity(const std::string& device);

struct LoopState {
  bool attached = false;
  std::string backing_file;  // as the kernel shows it ("... (deleted)" possible)
  uint64_t offset_bytes = 0;
  uint64_t size_bytes = 0;  // of the device
  bool direct_io = false;
  bool autoclear = false;
  bool read_only = false;
};
// The state of `device` from /sys/block/loopN; attached false when the
// device exists but has no file (or does not exist).
Result<LoopState> QueryLoop(const std::string& device);

// "/dev/loop3" -> "loop3"; nullopt when `device` is not a loop device path.
std::optional<std::string> LoopName(const std::string& device);
// The block device number of `device` (stat st_rdev).
Result<dev_t> DeviceNumber(const std::string& device);

}  // namespace ploop::mount
