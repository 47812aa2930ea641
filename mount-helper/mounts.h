// Mounting ploop disks as block devices: what `ploop mount`, `ploop umount`,
// `ploop list` and mount.ploop do, with the kernel parts (loop devices,
// mount(2), the daemon) behind one small API.
//
// How a disk becomes /dev/loopN:
//   - a single raw image, or a single preallocated image whose clusters are
//     in identity order: a loop device straight on the image file (with the
//     data area's offset), direct I/O, no daemon. The loop device keeps the
//     open file description the chain locked, so the image locks last from
//     the chain's open exactly as long as the device;
//   - anything else (expanded images, snapshot chains): the mount daemon
//     (daemon.h) serves the chain through FUSE and a loop device sits on
//     that (direct I/O).
// With a mountpoint the file system is mounted (mount(2)) and the device is
// then set to autoclear, so a plain `umount DIR` releases the device, which
// stops the daemon: nothing is left behind.
//
// Thread-safety: functions; MountChain() forks (single-threaded callers).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "mount-helper/daemon.h"
#include "mount-helper/records.h"
#include "ploop/chain.h"

namespace ploop::mount {

struct MountRequest {
  std::string descriptor;  // absolute path of DiskDescriptor.xml
  std::string guid;        // the snapshot mounted ("" = the top)
  bool read_only = false;
  std::string mountpoint;  // "" = only the device
  std::string fs_type = "ext4";
  std::string fs_options;  // mount(8) style: "noatime,discard,..."
  unsigned threads = 32;   // the daemon's FUSE threads at most
  // The daemon serves through FUSE over io_uring where the kernel has it
  // (turning on the fuse module's enable_uring), else through /dev/fuse.
  bool fuse_uring = true;
  OnlineOperations online;  // what the daemon's control socket may do
  // Tests only: on a loop device straight on the image, called after the
  // chain is closed and before the device is attached -- the moment the
  // image must still be locked.
  std::function<void()> after_release;
};

struct Mounted {
  std::string device;
  bool daemon = false;
  int pid = 0;
};

// Serves `chain` -- opened by the caller from request.descriptor with the
// locks taken and a dirty image repaired -- as a block device, and mounts
// its file system when request.mountpoint is set. On failure nothing is
// left (device detached, daemon stopped). Errors: the daemon's, the loop
// driver's, mount(2)'s (InvalidArgument for an unknown file system or a
// bad option, with the reason).
Result<Mounted> MountChain(std::unique_ptr<Chain> chain, const MountRequest& request);

// The mounts a target names. NotFound when there are none.
Result<std::vector<MountRecord>> FindByDevice(const std::string& device);
Result<std::vector<MountRecord>> FindByDescriptor(const std::string& descriptor);
Result<std::vector<MountRecord>> FindByMountpoint(const std::string& dir);

// Unmounts the file systems on the record's device, detaches it, waits for
// its daemon to close the image cleanly and exit, and removes the record.
// After a dead daemon (SIGKILL): lazy unmounts, detach, FUSE unmounted,
// record removed. Busy when a file system is in use, or the device stays
// open by another program (it is then released when that program closes
// it).
Status Unmount(const MountRecord& record);

// Cleans up what dead daemons and detached devices of `descriptor` left
// (as Unmount does), before a new mount of that disk.
void CleanUpDeadMounts(const std::string& descriptor);

struct MountListing {
  MountRecord record;
  MountHealth health = MountHealth::kActive;
  std::vector<std::string> mountpoints;
  bool direct_io = false;
  uint64_t rss_bytes = 0;  // the daemon's
  double cpu_seconds = 0;  // the daemon's, user + system
};
// What is mounted now. Records of detached devices are dropped.
std::vector<MountListing> ListMounts();

// For a Busy error naming an image file: "/dev/loop3 (mounted at /mnt/ct)"
// when a mount holds that image; "" when none does.
std::string DescribeUser(const std::string& message);

// mount(2) of `device` on `dir`; `options` in mount(8) style (flags such as
// ro, noatime, nosuid are turned into mount flags, the rest passed to the
// file system).
Status MountFilesystem(const std::string& device, const std::string& dir, const std::string& type,
                       const std::string& options, bool read_only);

}  // namespace ploop::mount
