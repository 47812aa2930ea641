// NbdServer: supervising nbdkit and our plugin.
//
//   ploop (this process)                    nbdkit (child)
//   --------------------                    --------------
//   Start(): spawn ------------------------> load plugin, config
//                                            get_ready: open the disk
//            <-- report: "error ..." ------- (open failed: exit)
//                                            bind + listen
//            <-- report: "ready" ----------- after_fork
//   Wait():  stop_fd readable
//            -- "stop" -------------------->  close the disk (after the
//                                            request in progress)
//            <-- report: "closed" ---------- (or "error ..." if that failed)
//            SIGKILL (drops idle clients)
//            reap, remove the socket
//
// Why not just SIGTERM: nbdkit then waits for every client to disconnect,
// and an idle client (a VM, a kernel nbd device) may never do so. The
// disk is closed first, by the plugin, so killing nbdkit afterwards loses
// nothing. nbdkit also runs with --exit-with-parent, and the plugin closes
// the disk when the report channel ends, so if ploop dies the disk is
// still closed cleanly. If nbdkit itself is killed, no "closed" arrives:
// Wait() reports it, and the disk keeps its in-use mark for the next
// writable open to repair.
#include "mount-helper/nbd_server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <mutex>

#include "mount-helper/server_report.h"

#ifndef PLOOP_NBDKIT_PLUGIN_FILE
#define PLOOP_NBDKIT_PLUGIN_FILE "nbdkit-ploop-plugin.so"
#endif
#ifndef PLOOP_NBDKIT_PLUGIN_DIR_FROM_BINDIR
#define PLOOP_NBDKIT_PLUGIN_DIR_FROM_BINDIR "../lib/ploop"
#endif
#ifndef PLOOP_NBDKIT_PLUGIN_INSTALL_DIR
#define PLOOP_NBDKIT_PLUGIN_INSTALL_DIR "/usr/local/lib/ploop"
#endif

namespace ploop::mount {

namespace {

// The descriptor number the plugin writes its reports to.
constexpr int kReportFd = 3;
// Lines of nbdkit's stderr kept to explain a failure.
constexpr size_t kKeptLines = 20;

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// Removes the socket nbdkit created (it does not remove it itself); never
// anything that is not a socket.
void RemoveSocket(const std::string& path) {
  struct stat st;
  if (!path.empty() && ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    ::unlink(path.c_str());
  }
}

std::string ExeDir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  return exe.parent_path().string();
}

// "nbdkit: ploop[1]: error: x" -> "error: x"; "nbdkit: bind: y" -> "bind: y".
std::string StripNbdkitPrefix(std::string_view line) {
  constexpr std::string_view kNbdkit = "nbdkit: ";
  if (line.substr(0, kNbdkit.size()) == kNbdkit) line.remove_prefix(kNbdkit.size());
  constexpr std::string_view kPlugin = "ploop[";
  if (line.substr(0, kPlugin.size()) == kPlugin) {
    size_t end = line.find("]: ");
    if (end != std::string_view::npos) line.remove_prefix(end + 3);
  }
  return std::string(line);
}

}  // namespace

// State the pump thread's callbacks share with the NbdServer.
struct NbdServer::Shared {
  std::mutex mu;
  std::condition_variable cv;
  bool ready = false;
  bool exited = false;
  bool closed = false;
  bool stop_requested = false;
  std::function<void()> kill_child;  // set once the child runs
  std::optional<Status> error;
  std::optional<Status> request_error;
  std::deque<std::string> lines;  // nbdkit's stderr before "ready", and the last ones
  LogFn on_log;

  void OnLine(ChildStream stream, std::string_view line) {
    std::unique_lock lock(mu);
    if (stream == ChildStream::kReport) {
      auto report = ParseServerReport(line);
      if (!report) return;
      switch (report->kind) {
        case ServerReport::Kind::kReady:
          ready = true;
          break;
        case ServerReport::Kind::kClosed:
          closed = true;
          break;
        case ServerReport::Kind::kError:
          if (!error) error = report->error;
          break;
        case ServerReport::Kind::kRequestFailed:
          if (!request_error) request_error = report->error;
          return;
      }
      cv.notify_all();
      // Closed (or failed to) on our request: nothing is left to wait for.
      if (stop_requested && report->kind != ServerReport::Kind::kReady && kill_child) {
        auto kill = kill_child;
        lock.unlock();
        kill();
      }
      return;
    }
    std::string text = StripNbdkitPrefix(line);
    lines.push_back(text);
    if (lines.size() > kKeptLines) lines.pop_front();
    // While serving, a client's failed request is worth showing; errors of
    // opening and closing the disk come as reports and are shown once, by
    // the caller.
    if (ready && !error && on_log) {
      lock.unlock();
      on_log(text);
    }
  }

  void OnExit() {
    std::lock_guard lock(mu);
    exited = true;
    cv.notify_all();
  }

  // Why nbdkit failed, from what it printed.
  Status StderrError(std::string_view what, const std::string& endpoint) {
    std::string last;
    for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
      if (!it->empty()) {
        last = *it;
        break;
      }
    }
    for (const auto& l : lines) {
      if (l.find("Address already in use") != std::string::npos) {
        return Status::Busy(endpoint + " is already in use");
      }
      if (l.find("getaddrinfo") != std::string::npos) {
        return Status::InvalidArgument("cannot listen on " + endpoint + ": " + l);
      }
    }
    return Status::FromErrno(EIO, std::string(what) + (last.empty() ? "" : ": " + last));
  }
};

std::string NbdUnixUri(const std::string& socket_path) {
  return "nbd+unix:///?socket=" + socket_path;
}

std::string NbdTcpUri(const std::string& address, uint16_t port) {
  std::string host = address.find(':') != std::string::npos ? "[" + address + "]" : address;
  return "nbd://" + host + ":" + std::to_string(port) + "/";
}

Result<std::string> FindNbdkitPlugin() {
  if (const char* env = std::getenv("PLOOP_NBDKIT_PLUGIN"); env != nullptr && *env != '\0') {
    if (!Exists(env)) {
      return Status::NotSupported(std::string("PLOOP_NBDKIT_PLUGIN=") + env + " does not exist");
    }
    return std::string(env);
  }
  std::vector<std::string> candidates;
  const std::string exe_dir = ExeDir();
  if (!exe_dir.empty()) {
    candidates.push_back(exe_dir + "/" PLOOP_NBDKIT_PLUGIN_FILE);
    candidates.push_back(exe_dir + "/" PLOOP_NBDKIT_PLUGIN_DIR_FROM_BINDIR
                                   "/" PLOOP_NBDKIT_PLUGIN_FILE);
  }
  candidates.push_back(PLOOP_NBDKIT_PLUGIN_INSTALL_DIR "/" PLOOP_NBDKIT_PLUGIN_FILE);
  for (const auto& c : candidates) {
    if (Exists(c)) return std::filesystem::path(c).lexically_normal().string();
  }
  return Status::NotSupported("the nbdkit plugin " PLOOP_NBDKIT_PLUGIN_FILE
                              " is not installed (looked in " +
                              std::filesystem::path(candidates.back()).parent_path().string() +
                              "; build with nbdkit-plugin-dev)");
}

Result<std::unique_ptr<NbdServer>> NbdServer::Start(const NbdServeOptions& options, LogFn on_log) {
  const bool unix_socket = !options.socket_path.empty();
  if (unix_socket == (options.port != 0)) {
    return Status::InvalidArgument("give exactly one of a socket path and a TCP port");
  }
  const char* nbdkit_env = std::getenv("PLOOP_NBDKIT");
  const std::string nbdkit =
      FindProgram(nbdkit_env != nullptr && *nbdkit_env != '\0' ? nbdkit_env : "nbdkit");
  if (nbdkit.empty()) {
    return Status::NotSupported(
        "nbdkit is not installed (the NBD export runs it; install the nbdkit package)");
  }
  ASSIGN_OR_RETURN(std::string plugin, FindNbdkitPlugin());

  std::error_code ec;
  const std::string disk = std::filesystem::absolute(options.disk_path, ec).string();
  if (ec) return Status::FromErrno(ec.value(), options.disk_path);

  std::unique_ptr<NbdServer> server(new NbdServer());
  std::string endpoint;
  std::vector<std::string> argv = {nbdkit, "--foreground", "--exit-with-parent", "--log=stderr",
                                   "--tls=off"};
  if (!options.writable) argv.push_back("--readonly");
  if (unix_socket) {
    const std::string socket = std::filesystem::absolute(options.socket_path, ec).string();
    if (ec) return Status::FromErrno(ec.value(), options.socket_path);
    if (socket.size() >= sizeof(sockaddr_un::sun_path)) {
      return Status::InvalidArgument("socket path " + socket + " is longer than " +
                                     std::to_string(sizeof(sockaddr_un::sun_path) - 1) + " bytes");
    }
    if (Exists(socket)) return Status::AlreadyExists(socket + " already exists");
    const std::string dir = std::filesystem::path(socket).parent_path().string();
    if (!std::filesystem::is_directory(dir, ec)) {
      return Status::NotFound("folder " + dir + " for the socket does not exist");
    }
    argv.insert(argv.end(), {"--unix", socket});
    server->uri_ = NbdUnixUri(socket);
    server->socket_path_ = socket;
    endpoint = "socket " + socket;
  } else {
    if (options.bind_address.empty()) return Status::InvalidArgument("empty bind address");
    argv.insert(argv.end(),
                {"--port", std::to_string(options.port), "--ipaddr", options.bind_address});
    server->uri_ = NbdTcpUri(options.bind_address, options.port);
    endpoint = "port " + std::to_string(options.port) + " on " + options.bind_address;
  }
  argv.push_back(plugin);
  argv.push_back("disk=" + disk);
  if (!options.snapshot_guid.empty()) argv.push_back("snapshot=" + options.snapshot_guid);
  argv.push_back(std::string("writable=") + (options.writable ? "1" : "0"));
  if (options.allow_outside_files) argv.push_back("allow-outside-files=1");
  argv.push_back("report-fd=" + std::to_string(kReportFd));

  auto shared = std::make_shared<Shared>();
  shared->on_log = std::move(on_log);
  server->shared_ = shared;
  SpawnOptions spawn;
  spawn.argv = argv;
  spawn.report_fd = kReportFd;
  spawn.unset_env = {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"};
  auto child = ChildProcess::Spawn(
      spawn, [shared](ChildStream s, std::string_view line) { shared->OnLine(s, line); },
      [shared](const ChildExit&) { shared->OnExit(); });
  if (!child.ok()) {
    if (child.error().code() == StatusCode::kNotFound) {
      return Status::NotSupported("cannot run nbdkit: " + child.error().message());
    }
    return child.error();
  }
  server->child_ = std::move(child).value();
  {
    ChildProcess* raw = server->child_.get();
    std::lock_guard lock(shared->mu);
    shared->kill_child = [raw] { raw->Signal(SIGKILL); };
  }

  std::unique_lock lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->ready || shared->exited; });
  if (shared->ready) return server;
  // nbdkit ended before listening: the disk did not open, or the socket
  // could not be bound.
  lock.unlock();
  ChildExit exit = server->child_->Wait();
  lock.lock();
  RemoveSocket(server->socket_path_);
  server->finished_ = true;
  if (shared->error) return *shared->error;
  return shared->StderrError("nbdkit " + exit.Describe(), endpoint);
}

NbdServer::~NbdServer() {
  if (!finished_ && child_) Stop().IgnoreError();
}

int NbdServer::pid() const { return child_ ? child_->pid() : -1; }

std::optional<Status> NbdServer::first_request_error() const {
  std::lock_guard lock(shared_->mu);
  return shared_->request_error;
}

Status NbdServer::Wait(int stop_fd) {
  if (finished_) return final_;
  return Finish(child_->Wait(stop_fd, [this] { RequestStop(); }));
}

Status NbdServer::Stop() {
  if (finished_) return final_;
  RequestStop();
  return Finish(child_->Wait());
}

void NbdServer::RequestStop() {
  {
    std::lock_guard lock(shared_->mu);
    if (shared_->stop_requested) return;
    shared_->stop_requested = true;
    if (shared_->closed || shared_->error) {
      child_->Signal(SIGKILL);
      return;
    }
  }
  // A child that can no longer hear us is stopped by signal; nbdkit then
  // waits for its clients, but it has nothing left to close cleanly.
  if (!child_->SendToChild(StopRequest()).ok()) child_->Signal(SIGTERM);
}

Status NbdServer::Finish(const ChildExit& exit) {
  finished_ = true;
  RemoveSocket(socket_path_);
  std::lock_guard lock(shared_->mu);
  if (shared_->error) {
    final_ = *shared_->error;
  } else if (shared_->closed) {
    final_ = Status::Ok();
  } else {
    final_ =
        shared_->StderrError("nbdkit " + exit.Describe() +
                                 " before closing the disk (the next writable open repairs it)",
                             uri_);
  }
  return final_;
}

}  // namespace ploop::mount
