#include "mount-helper/daemon.h"

#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include "mount-helper/control.h"
#include "mount-helper/filesystem_ops.h"
#include "mount-helper/fuse_server.h"
#include "mount-helper/log.h"
#include "mount-helper/loop_device.h"
#include "mount-helper/records.h"
#include "ploop/path.h"
#include "ploop/served_disk.h"

namespace ploop::mount {

namespace {

// What makes the daemon stop, set once.
class Stopper {
 public:
  void Stop(std::string reason) {
    std::lock_guard lock(mu_);
    if (reason_.empty()) reason_ = std::move(reason);
    cv_.notify_all();
  }
  std::string Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !reason_.empty(); });
    return reason_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string reason_;
};

int ThreadCount() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (struct dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

void Report(int fd, const Json& message) {
  if (fd < 0) return;
  std::string line = message.dump() + "\n";
  (void)!::write(fd, line.data(), line.size());
}

void RemoveTree(const std::string& work_dir, const std::string& fuse_file) {
  ::unlink(fuse_file.c_str());
  ::unlink((work_dir + "/control").c_str());
  ::rmdir(work_dir.c_str());
}

// The daemon proper; returns its exit code.
int DaemonMain(std::unique_ptr<Chain> chain, const DaemonOptions& options, int report_fd) {
  // Detach from the caller: no terminal, no working directory.
  if (::chdir("/") != 0) return 1;
  ::umask(077);
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(null, 2);
    ::close(null);
  }
  ::prctl(PR_SET_NAME, "ploop-fuse", 0, 0, 0);
  // Large buffers (1 MiB requests) come straight from mmap and go back to
  // the system when freed, instead of staying in malloc's arenas.
  ::mallopt(M_MMAP_THRESHOLD, 128 << 10);
  ::mallopt(M_ARENA_MAX, 2);
  // Stop signals are taken by a thread with sigwait(); every thread created
  // from here on inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGQUIT}) sigaddset(&stop_signals, sig);
  ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  const int pid = ::getpid();
  OpenLog(RunDir() + "/daemon.log");
  InstallCrashLogger();
  const auto started = std::chrono::steady_clock::now();
  const std::string work_dir = RunDir() + "/daemons/" + std::to_string(pid);
  const std::string fuse_file = work_dir + "/disk";
  std::vector<std::string> images;
  for (size_t i = 0; i < chain->depth(); ++i) images.push_back(chain->layer(i).path());

  auto fail = [&](const Status& s) {
    LogError("cannot serve " + options.descriptor + ": " + s.ToString());
    Report(report_fd, ErrorReply(s));
    return 1;
  };

  ServedDiskOptions disk_options;
  disk_options.direct_io = options.direct_io;
  auto served = ServedDisk::Create(std::move(chain), disk_options);
  if (!served.ok()) return fail(served.error());
  ServedDisk& disk = **served;
  // The folder is named after our pid, so whatever is in it was left by a
  // dead process that had the same pid (a daemon killed with SIGKILL leaves
  // its FUSE mount, which then fails every access with ENOTCONN).
  ::umount2(fuse_file.c_str(), MNT_DETACH);
  RemoveTree(work_dir, fuse_file);
  if (::mkdir(work_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return fail(Status::FromErrno(errno, "create " + work_dir));
  }
  int mp = ::open(fuse_file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (mp < 0) return fail(Status::FromErrno(errno, "create " + fuse_file));
  ::close(mp);

  Stopper stopper;
  FuseOptions fo;
  fo.mountpoint = fuse_file;
  fo.fsname = "ploop:" + options.descriptor;
  fo.max_threads = options.threads;
  fo.io_uring = options.fuse_uring;
  fo.on_released = [&] { stopper.Stop("the loop device released the disk"); };
  auto mounted = FuseServer::Mount(disk, fo);
  if (!mounted.ok()) {
    RemoveTree(work_dir, fuse_file);
    return fail(mounted.error());
  }
  FuseServer& server = **mounted;
  std::thread loop([&] {
    Status s = server.Run();
    stopper.Stop(s.ok() ? "the FUSE session ended" : "the FUSE session failed: " + s.ToString());
  });
  auto abort_start = [&](const Status& s) {
    server.Exit();
    loop.join();
    server.Unmount();
    disk.Close().IgnoreError();
    RemoveTree(work_dir, fuse_file);
    return fail(s);
  };

  // The loop device's file: opened here (through FUSE) and handed over.
  server.ExpectOpen();
  int fd = ::open(fuse_file.c_str(), (disk.writable() ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    // ENOTCONN: the connection was ended meanwhile (e.g. FUSE over io_uring
    // lost a queue, see fuse_server.cc); the log says why.
    return abort_start(Status::FromErrno(
        err, "open " + fuse_file +
                 (err == ENOTCONN ? " (the FUSE connection ended; see " + RunDir() + "/daemon.log)"
                                  : "")));
  }
  // The loop device takes its size from the FUSE inode's cached size, which
  // some kernels (6.1, 6.12) leave at 0 for the mount's root file until its
  // attributes are fetched: stat it first, so the kernel asks us.
  struct stat fuse_st;
  if (::fstat(fd, &fuse_st) != 0) {
    Status s = Status::FromErrno(errno, "stat " + fuse_file);
    ::close(fd);
    return abort_start(s);
  }
  if (static_cast<uint64_t>(fuse_st.st_size) != disk.size_bytes()) {
    ::close(fd);
    return abort_start(
        Status::FromErrno(EIO, "the FUSE file shows " + std::to_string(fuse_st.st_size) +
                                   " bytes, the disk has " + std::to_string(disk.size_bytes())));
  }
  LoopConfig lc;
  lc.backing_fd = fd;
  lc.read_only = !disk.writable();
  lc.direct_io = true;
  lc.name = options.descriptor;
  auto device = AttachLoop(lc);
  ::close(fd);
  if (!device.ok()) return abort_start(device.error());
  SetLogTag(*device);
  auto state = QueryLoop(*device);
  const bool direct_io = state.ok() && state->direct_io;

  MountRecord record;
  record.device = *device;
  record.descriptor = options.descriptor;
  record.guid = options.guid;
  record.images = images;
  record.read_only = !disk.writable();
  record.kind = "fuse";
  record.pid = pid;
  record.pid_start = ProcessStartTime(pid);
  record.socket = work_dir + "/control";
  record.fuse_file = fuse_file;
  record.work_dir = work_dir;
  record.created = static_cast<uint64_t>(std::time(nullptr));
  if (Status s = WriteRecord(record); !s.ok()) {
    DetachLoop(*device).IgnoreError();
    return abort_start(s);
  }

  auto detach = [&](const std::string& why) {
    LogInfo(why + ": detaching " + *device + " (the daemon exits when it is released)");
    Status s = DetachLoop(*device);
    if (!s.ok() && s.code() != StatusCode::kNotFound) LogError("detach: " + s.ToString());
    return s;
  };
  // Online operations run one at a time; `images` changes with them.
  std::mutex online_mu;
  std::mutex images_mu;
  auto set_images = [&](const Json& reply) {
    if (!reply.contains("images")) return;
    std::lock_guard lock(images_mu);
    images = reply["images"].get<std::vector<std::string>>();
    record.images = images;
    if (Status s = WriteRecord(record); !s.ok()) LogError("update the record: " + s.ToString());
  };
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  auto online_snapshot = [&](const Json& request) -> Json {
    std::lock_guard lock(online_mu);
    if (!options.online.snapshot)
      return ErrorReply(Status::NotSupported("no online snapshot here"));
    if (!disk.writable()) return ErrorReply(Status::FailedPrecondition("the disk is read-only"));
    // Every mountpoint of the device is the same file system (bind
    // mounts): freezing one freezes it.
    std::vector<std::string> dirs = MountpointsOf(*device);
    if (dirs.size() > 1) dirs.resize(1);
    auto prepared = options.online.snapshot(disk, request);
    if (!prepared.ok()) return ErrorReply(prepared.error());
    // The pause writers see: from the first FIFREEZE until the thaw
    // (without file systems, the quiesced switch inside the operation).
    auto frozen = FrozenFilesystems::Freeze(dirs);
    if (!frozen.ok()) {
      prepared->abandon();
      return ErrorReply(frozen.error());
    }
    const double freeze_ms = ms_since((*frozen)->started());
    const auto t1 = Clock::now();
    Result<Json> done = prepared->run();
    const double switch_ms = ms_since(t1);
    Status thawed = (*frozen)->Thaw();
    const double pause_ms = ms_since((*frozen)->started());
    if (!thawed.ok()) LogError(thawed.ToString());
    if (!done.ok()) {
      LogError("online snapshot failed: " + done.error().ToString());
      return ErrorReply(done.error());
    }
    Json reply = *done;
    set_images(reply);
    reply["ok"] = true;
    reply["pause_ms"] = pause_ms;
    reply["freeze_ms"] = freeze_ms;
    reply["switch_ms"] = switch_ms;
    reply["frozen"] = dirs;
    LogInfo("online snapshot " + reply.value("guid", "") + ": writes paused " +
            std::to_string(pause_ms) + " ms (freeze " + std::to_string(freeze_ms) + " ms, switch " +
            std::to_string(switch_ms) + " ms)");
    return reply;
  };
  auto online_grow = [&](const Json& request) -> Json {
    std::lock_guard lock(online_mu);
    if (!options.online.grow) return ErrorReply(Status::NotSupported("no online resize here"));
    if (!disk.writable()) return ErrorReply(Status::FailedPrecondition("the disk is read-only"));
    Result<Json> done = options.online.grow(disk, request);
    if (!done.ok()) return ErrorReply(done.error());
    // The loop device reads the size of its file from the FUSE inode: drop
    // the cached attributes, let a stat fetch them anew, then resize.
    Status s = server.InvalidateSize();
    struct stat st = {};
    if (s.ok() && ::stat(fuse_file.c_str(), &st) != 0)
      s = Status::FromErrno(errno, "stat " + fuse_file);
    if (s.ok() && static_cast<uint64_t>(st.st_size) != disk.size_bytes()) {
      s = Status::FromErrno(EIO,
                            "the FUSE file still shows " + std::to_string(st.st_size) + " bytes");
    }
    if (s.ok()) s = RefreshLoopCapacity(*device);
    if (!s.ok()) {
      LogError("online resize: " + s.ToString());
      return ErrorReply(s);
    }
    Json reply = *done;
    reply["ok"] = true;
    reply["size_bytes"] = disk.size_bytes();
    reply["mountpoints"] = MountpointsOf(*device);
    LogInfo("online resize: the disk is now " + std::to_string(disk.size_bytes()) + " bytes");
    return reply;
  };
  auto online_merge = [&](const Json& request) -> Json {
    std::lock_guard lock(online_mu);
    if (!options.online.merge) return ErrorReply(Status::NotSupported("no online merge here"));
    const auto t0 = Clock::now();
    Result<Json> done = options.online.merge(disk, request);
    if (!done.ok()) {
      LogError("online merge failed: " + done.error().ToString());
      return ErrorReply(done.error());
    }
    Json reply = *done;
    set_images(reply);
    reply["ok"] = true;
    LogInfo("online merge done in " + std::to_string(ms_since(t0)) + " ms");
    return reply;
  };
  auto handler = [&](const Json& request) -> Json {
    const std::string cmd = request["cmd"].get<std::string>();
    if (cmd == "snapshot") return online_snapshot(request);
    if (cmd == "grow") return online_grow(request);
    if (cmd == "merge") return online_merge(request);
    if (cmd == "status") {
      ServedDisk::Counters c = disk.counters();
      rusage ru = {};
      ::getrusage(RUSAGE_SELF, &ru);
      double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                   ru.ru_stime.tv_usec / 1e6;
      return Json{
          {"ok", true},
          {"protocol", 1},
          {"pid", pid},
          {"device", *device},
          {"descriptor", options.descriptor},
          {"guid", options.guid},
          {"read_only", !disk.writable()},
          {"images",
           [&] {
             std::lock_guard lock(images_mu);
             return images;
           }()},
          {"size_bytes", disk.size_bytes()},
          {"cluster_bytes", disk.cluster_bytes()},
          {"direct_io", direct_io},
          {"fuse_transport", server.UsesIoUring() ? "io_uring" : "dev_fuse"},
          {"fuse_ring_requests", server.RingRequests()},
          {"fuse_ring_async_requests", server.RingAsyncRequests()},
          {"fuse_flushes_ahead", server.FlushesAhead()},
          {"fuse_classic_workers", server.ClassicWorkers()},
          {"rss_bytes", ProcStatusBytes(0, "VmRSS")},
          {"peak_rss_bytes", ProcStatusBytes(0, "VmHWM")},
          {"cpu_seconds", cpu},
          {"threads", ThreadCount()},
          {"uptime_seconds",
           std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()},
          {"counters",
           {{"reads", c.reads},
            {"writes", c.writes},
            {"discards", c.discards},
            {"flushes", c.flushes},
            {"bytes_read", c.bytes_read},
            {"bytes_written", c.bytes_written},
            {"allocations", c.allocations},
            {"copy_buffers_allocated", c.copy_buffers_allocated},
            {"errors", c.errors},
            {"in_flight", c.in_flight}}}};
    }
    if (cmd == "stop") {
      Status s = detach("stop requested");
      if (!s.ok() && s.code() != StatusCode::kNotFound) return ErrorReply(s);
      return Json{{"ok", true}};
    }
    return ErrorReply(Status::NotSupported("unknown command '" + cmd + "'"));
  };
  auto control = ControlServer::Start(record.socket, handler);
  if (!control.ok()) LogError("no control socket: " + control.error().ToString());

  // Detached: it may still sit in sigwait() when the process exits, so it
  // owns copies of what it uses.
  std::thread([stop_signals, dev = *device] {
    for (;;) {
      int sig = 0;
      if (::sigwait(&stop_signals, &sig) != 0) continue;
      LogInfo(std::string("signal ") + ::strsignal(sig) + ": detaching " + dev +
              " (the daemon exits when it is released)");
      Status s = DetachLoop(dev);
      if (!s.ok() && s.code() != StatusCode::kNotFound) LogError("detach: " + s.ToString());
    }
  }).detach();

  LogInfo("serving " + options.descriptor +
          (options.guid.empty() ? "" : " snapshot " + options.guid) +
          (disk.writable() ? "" : " read-only") + " on " + *device +
          (direct_io ? " (direct I/O)" : " (direct I/O refused by the kernel: buffered)"));
  Report(report_fd, Json{{"ok", true}, {"device", *device}, {"pid", pid}});
  ::close(report_fd);

  const std::string reason = stopper.Wait();
  const bool released = reason == "the loop device released the disk";
  // The FUSE session ended while the device still holds the file (its
  // connection aborted: a ring queue without entries, fusectl's abort, a
  // forced unmount): the device's I/O fails from now on, and a file system
  // may be mounted on it.
  const auto st = QueryLoop(*device);
  const bool orphaned = !released && st.ok() && st->attached && st->backing_file == fuse_file;
  if (orphaned) {
    LogError("stopping: " + reason + ", while " + *device +
             " still uses the disk: its I/O fails from now on; `ploop umount` cleans up");
  } else {
    LogInfo("stopping: " + reason);
  }
  server.Exit();
  loop.join();
  if (control.ok()) (*control)->Stop();
  Status closed = disk.Close();
  if (closed.ok()) {
    LogInfo("disk flushed and closed cleanly");
  } else {
    LogError("closing the disk failed (it will be checked on the next mount): " +
             closed.ToString());
  }
  if (orphaned) {
    // Left as a killed daemon leaves things: the record, the device on the
    // dead FUSE file, the work folder. `ploop list` shows the device as
    // dead, and `ploop umount` unmounts its file system, detaches it and
    // removes the rest (mounts.cc, Unmount()). Removing the record here
    // would hide a device that still fails its I/O.
    server.LeaveMounted();
    LogInfo("exited");
    return 1;
  }
  server.Unmount();
  RemoveRecord(record).IgnoreError();
  RemoveTree(work_dir, fuse_file);
  LogInfo("exited");
  return closed.ok() && released ? 0 : 1;
}

}  // namespace

Result<DaemonInfo> StartDaemon(std::unique_ptr<Chain> chain, const DaemonOptions& options) {
  TRY(EnsureRunDir());
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  pid_t child = ::fork();
  if (child < 0) {
    int err = errno;
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    return Status::FromErrno(err, "fork");
  }
  if (child == 0) {
    ::close(pipefd[0]);
    ::setsid();
    pid_t daemon = ::fork();
    if (daemon != 0) ::_exit(daemon < 0 ? 1 : 0);
    ::_exit(DaemonMain(std::move(chain), options, pipefd[1]));
  }
  ::close(pipefd[1]);
  // Our copies of the image files: closing them writes nothing (the daemon
  // marks the image in use) and keeps the locks, which live as long as the
  // daemon's copies of the same open files.
  chain.reset();
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(pipefd[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  Json reply = Json::parse(text.substr(0, text.find('\n')), nullptr, false);
  if (!reply.is_object()) {
    return Status::FromErrno(
        EIO, "the mount daemon died while starting (see " + RunDir() + "/daemon.log)");
  }
  TRY(ReplyStatus(reply));
  DaemonInfo info;
  info.pid = reply.value("pid", 0);
  info.device = reply.value("device", "");
  return info;
}

}  // namespace ploop::mount
