// FuseServer: a served disk (ploop/served_disk.h) exposed as ONE regular
// file through FUSE (libfuse3's low-level API), for a loop device to sit
// on. The FUSE file system is mounted over a regular file (its root is the
// disk file itself), so there are no directories and no lookups.
//
// Data path and performance choices:
//   - the file is opened FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES:
//     no page cache for it (the loop device above reads and writes it with
//     direct I/O, the delta files below have their own), and the kernel
//     takes the inode lock shared for writes inside the file, so writes run
//     in parallel instead of one at a time;
//   - asynchronous direct I/O (FUSE_CAP_ASYNC_DIO): the loop device keeps
//     many requests in flight; max_background is raised so they reach us;
//   - requests up to 1 MiB (max_write; max_pages 256);
//   - a fixed set of `threads` workers (not libfuse's loop, which starts
//     and ends threads with the load), each serving one request at a time
//     synchronously from its own buffer: a write's data arrives there
//     page-aligned and goes to the image with direct I/O as it is; a read's
//     data is read into the same buffer and replied from it. Every request
//     in flight has its own buffer;
//   - optionally (FuseOptions::io_uring) FUSE over io_uring (Linux 6.14+,
//     the fuse module's enable_uring): per-CPU queues of ring entries, each
//     queue served by a few threads whose io_uring holds a few entries and
//     their image I/O: a request arrives in the entry's buffers (a write's data
//     page-aligned), a read or an in-place write goes to the delta files as
//     asynchronous I/O from and into those buffers (ServedDisk::PlanRead /
//     PlanWrite), and the reply goes back with the command that fetches the
//     next request -- several requests in flight per thread, no thread
//     woken per request. Allocating writes, discards, fsync and the rest run
//     synchronously on helper threads. libfuse still parses those requests
//     and handles INIT; beside a ring in use two classic workers serve what
//     does not go over it, and the full set of `threads` starts when the
//     kernel does not offer or refuses the ring;
//   - fsync -> ServedDisk::Flush(); fallocate(PUNCH_HOLE|KEEP_SIZE) and
//     fallocate(ZERO_RANGE) -> ServedDisk::Discard() (fstrim and -o discard
//     reach the image).
// The one open the daemon makes (the file it hands to the loop device) is
// the only one allowed; its release means the loop device let go of the
// file, and the server reports that through `on_released`.
//
// Thread-safety: Run() blocks in the calling thread; Exit() may be called
// from any thread (and from on_released).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "ploop/served_disk.h"

struct fuse_session;

namespace ploop::mount {

struct FuseOptions {
  std::string mountpoint;     // an existing regular file
  std::string fsname;         // shown in /proc/mounts
  unsigned max_threads = 32;  // the workers (each up to 1 MiB of buffer)
  // Serve requests through FUSE over io_uring where the kernel has it
  // (enabling it in the kernel: /sys/module/fuse/parameters/enable_uring),
  // with the classic workers as the fallback. See fuse_server.cc.
  bool io_uring = false;
  // Called (from a worker thread) when the file the loop device held is
  // released.
  std::function<void()> on_released;
};

// How many ring entries (requests in flight) each of `queues` per-CPU
// FUSE-over-io_uring queues gets when `threads` workers are asked for. The
// ring needs an entry on every queue before it is used, so at least one
// each; `threads` spread over the queues (at least two each, so that a
// second request issued on one CPU need not wait) as long as that stays
// within `threads`; one each beyond (machines with more than threads / 2
// CPUs), the fewest the ring allows. Each entry keeps a 1 MiB buffer.
unsigned RingEntriesPerQueue(unsigned threads, unsigned queues);

class FuseServer {
 public:
  // Creates the session and mounts it over options.mountpoint. IOError or
  // NotSupported (no /dev/fuse) on failure.
  static Result<std::unique_ptr<FuseServer>> Mount(ServedDisk& disk, FuseOptions options);
  ~FuseServer();

  // Serves requests until Exit() or until the file system is unmounted.
  Status Run();
  // Makes Run() return (after the request being served, if any).
  void Exit();
  // Whether the kernel agreed to FUSE over io_uring (after INIT), and how
  // many requests came through it.
  bool UsesIoUring() const;
  uint64_t RingRequests() const;
  // ... of which were served with asynchronous image I/O (planned reads
  // and in-place writes).
  uint64_t RingAsyncRequests() const;
  // Flushes started after a small write at depth 1, before the fsync
  // expected to follow it arrived (see Context::NoteWrite).
  uint64_t FlushesAhead() const;
  // The classic /dev/fuse workers running: all `max_threads` without the
  // ring; beside a ring in use, only the couple that serve what does not go
  // over it.
  unsigned ClassicWorkers() const;
  // After the disk grew: drops the attributes the kernel keeps of the file
  // (fuse_lowlevel_notify_inval_inode), so the next stat sees the new size.
  Status InvalidateSize();
  // Unmounts (lazily: the loop device may still hold the file).
  void Unmount();
  // Leaves the mount in place when this object goes (a daemon exiting
  // while a device still holds the file: the mount, dead, is cleaned up by
  // `ploop umount` as a killed daemon's is).
  void LeaveMounted() { mounted_ = false; }

  // Permits the daemon's own open (the file for the loop device); later
  // opens are refused with EBUSY.
  void ExpectOpen() { open_allowed_.store(true); }
  // For the open handler: whether an open is permitted now (once).
  bool TakeOpen();

  // Implementation details used by the request handlers.
  struct Context;

 private:
  FuseServer() = default;
  std::unique_ptr<Context> ctx_;
  fuse_session* session_ = nullptr;
  bool mounted_ = false;
  std::atomic<bool> open_allowed_{false};
};

}  // namespace ploop::mount
