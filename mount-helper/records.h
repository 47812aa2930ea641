// Mount records: what `ploop mount` set up, so that `ploop umount`,
// `ploop list` and the CLI's "in use by /dev/loopN" can find it later.
//
// One JSON file per loop device, <run dir>/devices/loopN.json, written
// atomically (temporary file, rename) under a lock, devices/.lock, which
// removal takes too (see RemoveRecord). The run dir is /run/ploop (created
// 0700, root only), or $PLOOP_RUN_DIR. A record can outlive what it
// describes (a daemon killed with SIGKILL, a device detached by `umount`
// through autoclear); Health() tells, from the kernel's view of the device
// and the daemon's process, whether it still holds.
//
// Layout of the run dir:
//   devices/loopN.json      records
//   devices/.lock           flock'd by whoever writes or removes a record
//   daemons/PID/disk        a daemon's FUSE mount (the loop device's file)
//   daemons/PID/control     its control socket (mount-helper/control.h)
//   daemon.log              what every daemon logged (also in syslog)
//
// Thread-safety: functions; concurrent writers of one record are not
// expected (a device has one owner).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ploop/status.h"

namespace ploop::mount {

struct MountRecord {
  std::string device;               // "/dev/loop3"
  std::string descriptor;           // absolute path of DiskDescriptor.xml
  std::string guid;                 // the snapshot mounted; "" for the top
  std::vector<std::string> images;  // absolute paths of the layers, base first
  bool read_only = false;
  std::string kind;           // "fuse" (served by a daemon) or "direct" (loop on the image)
  int pid = 0;                // the daemon (kind "fuse")
  uint64_t pid_start = 0;     // its start time, to tell a reused pid apart
  std::string socket;         // its control socket
  std::string fuse_file;      // its FUSE mount: the loop device's backing file
  std::string work_dir;       // daemons/PID
  uint64_t offset_bytes = 0;  // where the disk starts in the image (direct)
  uint64_t created = 0;       // unix time

  const std::string& top() const { return images.back(); }
  bool operator==(const MountRecord&) const = default;
};

std::string RunDir();
// Creates the run dir and its subfolders (0700).
Status EnsureRunDir();

Status WriteRecord(const MountRecord& record);
// Removes the record of record.device -- only if it is still this record: a
// device is reused, and by then its file may describe the next mount.
// NotFound when there is none (or another).
Status RemoveRecord(const MountRecord& record);
// Every record; unreadable files are skipped.
std::vector<MountRecord> ReadRecords();

// Serialisation, for tests.
std::string RecordToJson(const MountRecord& record);
Result<MountRecord> RecordFromJson(const std::string& text);

enum class MountHealth {
  kActive,      // the device has our file; the daemon (if any) runs
  kDaemonDead,  // the device still has the daemon's file, the daemon is gone
  kStale,       // the device is detached or serves something else
};
MountHealth Health(const MountRecord& record);
const char* HealthName(MountHealth health);

// The start time of process `pid` (clock ticks after boot, /proc/PID/stat
// field 22), 0 when there is no such (live, non-zombie) process.
uint64_t ProcessStartTime(int pid);
// A "KEY:  N kB" line of /proc/PID/status (pid 0: this process) in bytes,
// 0 when there is none: ProcStatusBytes(pid, "VmRSS").
uint64_t ProcStatusBytes(int pid, const std::string& key);
bool ProcessAlive(int pid, uint64_t start_time);

// One line of /proc/self/mountinfo.
struct MountInfo {
  dev_t device = 0;
  std::string mountpoint;
  std::string fstype;
  std::string source;
};
std::vector<MountInfo> ReadMountInfo();
// Where block device `device` is mounted (most recent first).
std::vector<std::string> MountpointsOf(const std::string& device);

}  // namespace ploop::mount
