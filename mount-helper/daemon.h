// The mount daemon: serves a disk (its open Chain) through FUSE with a loop
// device on top, until the loop device lets go of it.
//
// Life cycle:
//   1. StartDaemon() forks twice (the daemon is not a child of the caller
//      and has its own session). The caller's copies of the image files
//      are then closed; the locks (OFD locks live with the open file
//      descriptions, which the daemon keeps) stay held by the daemon, so
//      offline commands and a second mount get Busy while it runs.
//   2. The daemon marks the top delta in use, mounts FUSE over
//      <run dir>/daemons/PID/disk, opens that file and attaches it to a free
//      loop device in direct-I/O mode, writes the mount record, starts its
//      control socket (control.h) and reports the device to the caller,
//      which is waiting on a pipe. Stdin/out/err go to /dev/null; messages
//      go to syslog and <run dir>/daemon.log (log.h).
//   3. It serves requests with a pool of threads (fuse_server.h).
//   4. It stops when the loop device releases its file: after `umount` of an
//      autoclear device, `ploop umount`, a `stop` request or SIGTERM/SIGINT
//      (the last two detach the device -- at once if nobody has it open,
//      else when the last user closes it). It then flushes, marks the image
//      clean, unmounts FUSE, removes its record and exits 0. If FUSE goes
//      away under it, it logs that and exits 1 (the image stays marked in
//      use and is repaired on the next mount).
//
// Thread-safety: StartDaemon() must be called from a single-threaded
// process (it forks).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "mount-helper/control.h"
#include "ploop/chain.h"

namespace ploop {
class ServedDisk;
}

namespace ploop::mount {

// The online operations of the control socket (control.h): how the served
// disk's layers and its descriptor change. They are given by the caller
// (tools/), because the descriptor's snapshot and merge logic lives in
// snapshot/, which this library does not link; the daemon runs them one at
// a time and does the kernel's part around them:
//   snapshot  prepares (the new top's file: before the freeze, so writers
//             do not wait for it) and returns the switch, which the daemon
//             runs with the device's file systems frozen; the switch returns
//             {"guid", "images"} (the layers' files, base first). A prepared
//             snapshot not switched (the freeze failed) is abandoned;
//   grow      it grows the disk ({"size_bytes"}); the daemon then makes the
//             FUSE file and the loop device show the new size;
//   merge     it merges a snapshot below the top and returns {"images"}.
// An operation not given is refused (NotSupported).
using OnlineOperation = std::function<Result<Json>(ServedDisk& disk, const Json& request)>;
struct PreparedSwitch {
  std::function<Result<Json>()> run;
  std::function<void()> abandon;
};
struct OnlineOperations {
  std::function<Result<PreparedSwitch>(ServedDisk& disk, const Json& request)> snapshot;
  OnlineOperation grow;
  OnlineOperation merge;
};

struct DaemonOptions {
  std::string descriptor;  // absolute path, for the record and the log
  std::string guid;        // the snapshot served ("" = the top)
  unsigned threads = 32;   // FUSE worker threads at most
  // FUSE over io_uring where the kernel has it (FuseOptions::io_uring).
  bool fuse_uring = true;
  // The image files' data bypasses the page cache (ServedDiskOptions).
  bool direct_io = true;
  OnlineOperations online;
};

struct DaemonInfo {
  int pid = 0;
  std::string device;
};

// Starts a daemon serving `chain` and returns once the loop device is
// attached (or the daemon failed: its error, as a Status, e.g. IOError
// "attach /dev/loop3: ..."). Consumes the chain either way.
Result<DaemonInfo> StartDaemon(std::unique_ptr<Chain> chain, const DaemonOptions& options);

}  // namespace ploop::mount
