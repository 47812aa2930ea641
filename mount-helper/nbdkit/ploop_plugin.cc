// nbdkit-ploop-plugin.so: serves a ploop disk (a DiskDescriptor.xml chain,
// one of its snapshots, or a single ploop image) over NBD through nbdkit.
//
//   nbdkit [-r] -U SOCKET nbdkit-ploop-plugin.so disk=PATH [snapshot=GUID]
//          [writable=1] [allow-outside-files=1] [report-fd=N]
//
// `ploop serve` (NbdServer) runs it; running it by hand works too.
//
// Lifecycle: the disk is opened once, in .get_ready (before nbdkit binds
// its socket, so no client can connect to a server that has no disk), and
// shared by every connection. It is flushed and closed (which clears the
// in-use mark) exactly once, by whichever comes first:
//   - a "stop" request from the supervisor on report-fd, or the end of
//     that channel (the supervisor died); a control thread started in
//     .after_fork waits for it, closes the disk after the request in
//     progress, and asks nbdkit to shut down. Connections still open get
//     ESHUTDOWN from then on. This is how `ploop serve` stops: nbdkit on
//     its own would wait for idle clients to disconnect, maybe forever;
//   - .cleanup, when nbdkit shuts down by itself (SIGINT/SIGTERM with no
//     clients left, or run by hand).
// With report-fd, the supervisor hears "ready" (.after_fork, called once
// the socket listens), "closed", or the error of opening or closing
// (server_report.h).
//
// Threads: NBDKIT_THREAD_MODEL_PARALLEL -- nbdkit receives and sends
// requests of all connections in parallel and calls us from its worker
// threads; the BlockExport serves them through a ServedDisk, so requests run
// on the disk in parallel too (no lock around reads and writes of allocated
// clusters, one cluster locked per allocation or trim, flushes beside other
// requests). Because all connections share one disk in one process, a
// flush on any connection covers writes completed on all of them, so
// multi-conn is safe to advertise.
//
// Capabilities: writes, trim and zero only for a writable disk (never for a
// snapshot); flush; FUA emulated by nbdkit with a flush; fast zero answered
// honestly (refused when zeroing would write data); block status from the
// BATs (base:allocation, holes reported as hole+zero).
//
// Errors cross into nbdkit in one place, Fail(): the message to nbdkit's
// log, the errno (NbdErrno) to the client.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "mount-helper/block_export.h"
#include "mount-helper/server_report.h"
#include "ploop/descriptor.h"
#include "ploop/io/file_system.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#ifndef PLOOP_VERSION
#define PLOOP_VERSION "unknown"
#endif

namespace {

using ploop::Status;
using ploop::mount::BlockExport;

struct Config {
  std::string disk;
  std::string snapshot;
  bool writable = false;
  bool allow_outside_files = false;
  int report_fd = -1;
};

Config g_config;
// The served disk: set in .get_ready, freed in .cleanup after every
// connection is gone; closing it (CloseOnce) leaves the object in place,
// so requests racing with a stop get an error, never a dangling pointer.
std::unique_ptr<BlockExport> g_export;
std::mutex g_close_mu;
bool g_closed = false;                // guarded by g_close_mu
std::atomic<bool> g_stopping{false};  // requests now fail with ESHUTDOWN
std::atomic<bool> g_cleaning{false};  // .cleanup runs: nbdkit is shutting down
std::thread g_control;

std::mutex g_report_mu;  // one report at a time: lines never interleave

// One line to the supervisor; best effort (it may be gone).
void Report(const std::string& line) {
  if (g_config.report_fd < 0) return;
  std::lock_guard lock(g_report_mu);
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::send(g_config.report_fd, line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

// The one place a Status becomes nbdkit's error: message and errno.
int Fail(const Status& status) {
  if (g_stopping.load()) {
    nbdkit_set_error(ESHUTDOWN);  // the server is stopping: not the disk's fault
    return -1;
  }
  nbdkit_error("%s", status.message().c_str());
  Report(ploop::mount::RequestFailedReport(status));
  nbdkit_set_error(ploop::mount::NbdErrno(status));
  return -1;
}

// Flushes and closes the disk the first time it is called, and reports
// the outcome.
void CloseOnce() {
  std::lock_guard lock(g_close_mu);
  if (g_closed || !g_export) return;
  g_closed = true;
  g_stopping = true;
  Status s = g_export->Close();
  if (!s.ok()) {
    // A supervisor prints the report; nbdkit's log is for runs by hand.
    if (g_config.report_fd < 0) nbdkit_error("closing the disk: %s", s.message().c_str());
    Report(ploop::mount::ErrorReport(s.WithContext("close")));
    return;
  }
  Report(ploop::mount::ClosedReport());
}

// Waits for "stop" (or the end of the channel), then closes the disk and
// shuts nbdkit down.
void ControlLoop() {
  std::string line;
  char c;
  while (true) {
    ssize_t n = ::read(g_config.report_fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the supervisor is gone, or .cleanup woke us
    if (c != '\n') {
      if (line.size() < 64) line.push_back(c);
      continue;
    }
    if (ploop::mount::IsStopRequest(line)) break;
    line.clear();
  }
  CloseOnce();
  if (!g_cleaning.load()) nbdkit_shutdown();
}

bool ParseFlag(const char* key, const char* value, bool* out) {
  int v = nbdkit_parse_bool(value);
  if (v < 0) return false;
  *out = v == 1;
  (void)key;
  return true;
}

int PloopConfig(const char* key, const char* value) {
  const std::string k = key;
  if (k == "disk") {
    g_config.disk = value;
  } else if (k == "snapshot") {
    auto guid = ploop::ParseGuid(value);
    if (!guid.ok()) {
      nbdkit_error("snapshot: %s", guid.error().message().c_str());
      return -1;
    }
    g_config.snapshot = *guid;
  } else if (k == "writable") {
    if (!ParseFlag(key, value, &g_config.writable)) return -1;
  } else if (k == "allow-outside-files") {
    if (!ParseFlag(key, value, &g_config.allow_outside_files)) return -1;
  } else if (k == "report-fd") {
    if (nbdkit_parse_int("report-fd", value, &g_config.report_fd) == -1) return -1;
    if (g_config.report_fd < 3) {
      nbdkit_error("report-fd must be 3 or more");
      return -1;
    }
  } else {
    nbdkit_error("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

int PloopConfigComplete() {
  if (g_config.disk.empty()) {
    nbdkit_error("disk=PATH is required (a DiskDescriptor.xml or a ploop image)");
    return -1;
  }
  if (g_config.writable && !g_config.snapshot.empty()) {
    nbdkit_error("a snapshot is served read-only; drop writable=1");
    return -1;
  }
  return 0;
}

int PloopGetReady() {
  ploop::mount::ExportTarget target;
  target.path = g_config.disk;
  target.snapshot_guid = g_config.snapshot;
  target.writable = g_config.writable;
  target.load.allow_outside_files = g_config.allow_outside_files;
  auto opened = ploop::mount::OpenExport(ploop::DefaultFileSystem(), target);
  if (!opened.ok()) {
    Report(ploop::mount::ErrorReport(opened.error()));
    nbdkit_error("%s", opened.error().message().c_str());
    return -1;
  }
  g_export = std::move(opened).value();
  return 0;
}

int PloopAfterFork() {
  if (g_config.report_fd >= 0) g_control = std::thread(ControlLoop);
  Report(ploop::mount::ReadyReport());
  return 0;
}

void PloopCleanup() {
  g_cleaning = true;
  CloseOnce();
  if (g_control.joinable()) {
    // Wake the control thread (it reads the channel) and wait for it: the
    // plugin is unloaded after this returns.
    ::shutdown(g_config.report_fd, SHUT_RD);
    g_control.join();
  }
  g_export.reset();
}

void* PloopOpen(int readonly) {
  (void)readonly;  // nbdkit applies -r itself (can_write is never asked)
  return NBDKIT_HANDLE_NOT_NEEDED;
}

int64_t PloopGetSize(void*) { return static_cast<int64_t>(g_export->size_bytes()); }

int PloopCanWrite(void*) { return g_export->writable() ? 1 : 0; }
int PloopCanFlush(void*) { return 1; }
int PloopCanTrim(void*) { return g_export->writable() ? 1 : 0; }
int PloopCanZero(void*) { return g_export->writable() ? 1 : 0; }
int PloopCanFastZero(void*) { return 1; }
int PloopCanFua(void*) { return NBDKIT_FUA_EMULATE; }
int PloopCanMultiConn(void*) { return 1; }
int PloopCanExtents(void*) { return 1; }
int PloopCanCache(void*) { return NBDKIT_CACHE_NONE; }

int PloopPread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  Status s = g_export->Read(offset, std::span<std::byte>(static_cast<std::byte*>(buf), count));
  return s.ok() ? 0 : Fail(s);
}

int PloopPwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t) {
  Status s = g_export->Write(offset,
                             std::span<const std::byte>(static_cast<const std::byte*>(buf), count));
  return s.ok() ? 0 : Fail(s);
}

int PloopFlush(void*, uint32_t) {
  Status s = g_export->Flush();
  return s.ok() ? 0 : Fail(s);
}

int PloopTrim(void*, uint32_t count, uint64_t offset, uint32_t) {
  Status s = g_export->Trim(offset, count);
  return s.ok() ? 0 : Fail(s);
}

int PloopZero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  const bool fast_only = (flags & NBDKIT_FLAG_FAST_ZERO) != 0;
  Status s = g_export->Zero(offset, count, (flags & NBDKIT_FLAG_MAY_TRIM) != 0, fast_only);
  if (s.ok()) return 0;
  if (fast_only && s.code() == ploop::StatusCode::kNotSupported) {
    // The expected answer to a fast-zero probe: no error message.
    nbdkit_set_error(ploop::mount::NbdErrno(s));
    return -1;
  }
  return Fail(s);
}

int PloopExtents(void*, uint32_t count, uint64_t offset, uint32_t flags,
                 struct nbdkit_extents* extents) {
  auto runs = g_export->Extents(offset, count, (flags & NBDKIT_FLAG_REQ_ONE) != 0);
  if (!runs.ok()) return Fail(runs.error());
  for (const auto& e : *runs) {
    uint32_t type = e.allocated ? 0 : (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
    if (nbdkit_add_extent(extents, e.offset_bytes, e.length_bytes, type) == -1) return -1;
  }
  return 0;
}

nbdkit_plugin MakePlugin() {
  nbdkit_plugin p = nbdkit_plugin();
  p.name = "ploop";
  p.longname = "ploop disk (OpenVZ ploop / Parallels expanded images)";
  p.version = PLOOP_VERSION;
  p.description = "Serves a ploop disk: a DiskDescriptor.xml chain, a snapshot, or one image.";
  p.config = PloopConfig;
  p.config_complete = PloopConfigComplete;
  p.config_help =
      "disk=PATH                  DiskDescriptor.xml, its folder, or a ploop image (required)\n"
      "snapshot=GUID              serve this snapshot (read-only)\n"
      "writable=1                 open the top for writing (also drop nbdkit -r)\n"
      "allow-outside-files=1      accept descriptors naming files outside their folder\n"
      "report-fd=N                write ready/closed/error reports to descriptor N";
  p.magic_config_key = "disk";
  p.get_ready = PloopGetReady;
  p.after_fork = PloopAfterFork;
  p.cleanup = PloopCleanup;
  p.open = PloopOpen;
  p.get_size = PloopGetSize;
  p.can_write = PloopCanWrite;
  p.can_flush = PloopCanFlush;
  p.can_trim = PloopCanTrim;
  p.can_zero = PloopCanZero;
  p.can_fast_zero = PloopCanFastZero;
  p.can_fua = PloopCanFua;
  p.can_multi_conn = PloopCanMultiConn;
  p.can_extents = PloopCanExtents;
  p.can_cache = PloopCanCache;
  p.pread = PloopPread;
  p.pwrite = PloopPwrite;
  p.flush = PloopFlush;
  p.trim = PloopTrim;
  p.zero = PloopZero;
  p.extents = PloopExtents;
  return p;
}

nbdkit_plugin plugin = MakePlugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
