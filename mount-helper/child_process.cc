// ChildProcess: posix_spawn plus a pump thread per child.
//
//   parent                          child
//   ------                          -----
//   stderr pipe  <-- read --  fd 2
//   stdout pipe  <-- read --  fd 1           (optional; else /dev/null)
//   report sock  <-- r/w  --> fd report_fd   (optional, a socket pair)
//   done pipe    <-- pump writes one byte after waitpid()
//
// Every descriptor we create is close-on-exec, so the child inherits only
// what the file actions give it. The child starts with default signal
// dispositions and an empty mask, whatever handlers ploop installed.
#include "mount-helper/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

extern char** environ;

namespace ploop::mount {

namespace {

constexpr size_t kMaxLineBytes = 64 * 1024;

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// Feeds bytes into a line buffer, calling `emit` per complete line.
template <typename Emit>
void SplitLines(std::string& buf, std::string_view data, bool& truncating, Emit emit) {
  for (char c : data) {
    if (c == '\n') {
      if (!truncating || !buf.empty()) emit(buf);
      buf.clear();
      truncating = false;
      continue;
    }
    if (buf.size() < kMaxLineBytes) {
      buf.push_back(c);
    } else if (!truncating) {
      emit(buf);  // cut here; drop the rest of the line
      buf.clear();
      truncating = true;
    }
  }
}

}  // namespace

std::string ChildExit::Describe() const {
  if (signaled) return "killed by signal " + std::to_string(code) + " (" + strsignal(code) + ")";
  return "exited with status " + std::to_string(code);
}

std::string FindProgram(const std::string& program) {
  if (program.empty()) return "";
  if (program.find('/') != std::string::npos) return IsExecutableFile(program) ? program : "";
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    size_t colon = dirs.find(':');
    std::string dir(dirs.substr(0, colon));
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + program;
    if (IsExecutableFile(candidate)) return candidate;
    if (colon == std::string_view::npos) return "";
    dirs.remove_prefix(colon + 1);
  }
}

Result<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(const SpawnOptions& options,
                                                          LineFn on_line, ExitFn on_exit) {
  if (options.argv.empty()) return Status::InvalidArgument("no program to run");
  const std::string& program = options.argv[0];
  int err_pipe[2] = {-1, -1};
  int out_pipe[2] = {-1, -1};
  int report_pipe[2] = {-1, -1};
  int done_pipe[2] = {-1, -1};
  auto close_all = [&] {
    for (int* p : {err_pipe, out_pipe, report_pipe, done_pipe}) {
      CloseFd(p[0]);
      CloseFd(p[1]);
    }
  };
  if (::pipe2(err_pipe, O_CLOEXEC) != 0 || ::pipe2(done_pipe, O_CLOEXEC) != 0 ||
      (options.capture_stdout && ::pipe2(out_pipe, O_CLOEXEC) != 0) ||
      (options.report_fd >= 0 &&
       ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, report_pipe) != 0)) {
    int e = errno;
    close_all();
    return Status::FromErrno(e, "create a pipe for " + program);
  }
  if (options.report_fd >= 0) {
    if (options.report_fd < 3) {
      close_all();
      return Status::InvalidArgument("the report descriptor must be 3 or more");
    }
    // dup2() onto itself would keep close-on-exec: move it out of the way.
    if (report_pipe[1] == options.report_fd) {
      int moved = ::fcntl(report_pipe[1], F_DUPFD_CLOEXEC, options.report_fd + 1);
      if (moved < 0) {
        int e = errno;
        close_all();
        return Status::FromErrno(e, "duplicate a pipe for " + program);
      }
      ::close(report_pipe[1]);
      report_pipe[1] = moved;
    }
  }

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  if (options.capture_stdout) {
    posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  } else {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  if (options.report_fd >= 0) {
    posix_spawn_file_actions_adddup2(&actions, report_pipe[1], options.report_fd);
  }
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT}) sigaddset(&defaults, sig);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setsigmask(&attr, &empty);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  std::vector<char*> argv;
  for (const auto& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view var(*e);
    bool drop = false;
    for (const auto& name : options.unset_env) {
      drop |=
          var.size() > name.size() && var.substr(0, name.size()) == name && var[name.size()] == '=';
    }
    if (!drop) envp.push_back(*e);
  }
  envp.push_back(nullptr);

  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, program.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    close_all();
    if (rc == ENOENT || rc == EACCES || rc == ENOEXEC) {
      return Status::NotFound("cannot run " + program + ": " + std::strerror(rc));
    }
    return Status::FromErrno(rc, "run " + program);
  }
  CloseFd(err_pipe[1]);
  CloseFd(out_pipe[1]);
  CloseFd(report_pipe[1]);
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid, err_pipe[0], out_pipe[0],
                                                        report_pipe[0], done_pipe[0], done_pipe[1],
                                                        std::move(on_line), std::move(on_exit)));
}

ChildProcess::ChildProcess(pid_t pid, int stderr_fd, int stdout_fd, int report_fd, int done_read_fd,
                           int done_write_fd, LineFn on_line, ExitFn on_exit)
    : pid_(pid),
      stderr_fd_(stderr_fd),
      stdout_fd_(stdout_fd),
      report_fd_(report_fd),
      done_read_fd_(done_read_fd),
      done_write_fd_(done_write_fd),
      on_line_(std::move(on_line)),
      on_exit_(std::move(on_exit)) {
  // The pump closes report_fd_ at EOF; writes go through their own copy.
  if (report_fd_ >= 0) report_write_fd_ = ::fcntl(report_fd_, F_DUPFD_CLOEXEC, 3);
  pump_ = std::thread([this] { Pump(); });
}

ChildProcess::~ChildProcess() {
  Signal(SIGKILL);
  if (pump_.joinable()) pump_.join();
  CloseFd(done_read_fd_);
  CloseFd(done_write_fd_);
  CloseFd(report_write_fd_);
}

Status ChildProcess::SendToChild(std::string_view line) {
  if (report_write_fd_ < 0) return Status::FromErrno(EBADF, "no report channel");
  while (!line.empty()) {
    ssize_t n = ::send(report_write_fd_, line.data(), line.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, "write to " + std::to_string(pid_));
    line.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

void ChildProcess::Pump() {
  struct Source {
    int fd;
    ChildStream stream;
    std::string buf;
    bool truncating = false;
  };
  std::vector<Source> sources;
  sources.push_back(Source{stderr_fd_, ChildStream::kStderr, {}});
  if (stdout_fd_ >= 0) sources.push_back(Source{stdout_fd_, ChildStream::kStdout, {}});
  if (report_fd_ >= 0) sources.push_back(Source{report_fd_, ChildStream::kReport, {}});
  char chunk[4096];
  while (true) {
    std::vector<pollfd> fds;
    for (auto& s : sources) {
      if (s.fd >= 0) fds.push_back(pollfd{s.fd, POLLIN, 0});
    }
    if (fds.empty()) break;
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (auto& s : sources) {
      if (s.fd < 0) continue;
      bool ready = false;
      for (const auto& p : fds) ready |= p.fd == s.fd && p.revents != 0;
      if (!ready) continue;
      ssize_t n = ::read(s.fd, chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      auto emit = [&](const std::string& line) {
        if (on_line_) on_line_(s.stream, line);
      };
      if (n <= 0) {
        if (!s.buf.empty()) emit(s.buf);
        ::close(s.fd);
        s.fd = -1;
        continue;
      }
      SplitLines(s.buf, std::string_view(chunk, static_cast<size_t>(n)), s.truncating, emit);
    }
  }
  stderr_fd_ = -1;
  stdout_fd_ = -1;
  report_fd_ = -1;
  int wstatus = 0;
  while (::waitpid(pid_, &wstatus, 0) < 0 && errno == EINTR) {
  }
  ChildExit exit;
  if (WIFSIGNALED(wstatus)) {
    exit.signaled = true;
    exit.code = WTERMSIG(wstatus);
  } else {
    exit.code = WEXITSTATUS(wstatus);
  }
  {
    std::lock_guard lock(mu_);
    reaped_ = true;
    exit_ = exit;
  }
  if (on_exit_) on_exit_(exit);
  char byte = 1;
  while (::write(done_write_fd_, &byte, 1) < 0 && errno == EINTR) {
  }
}

void ChildProcess::Signal(int sig) {
  std::lock_guard lock(mu_);
  if (!reaped_) ::kill(pid_, sig);
}

bool ChildProcess::exited() const {
  std::lock_guard lock(mu_);
  return reaped_;
}

ChildExit ChildProcess::Wait(int cancel_fd, const std::function<void()>& on_cancel) {
  bool cancelled = false;
  while (true) {
    pollfd fds[2] = {{done_read_fd_, POLLIN, 0}, {cancel_fd, POLLIN, 0}};
    const nfds_t n = cancel_fd >= 0 && !cancelled ? 2 : 1;
    if (::poll(fds, n, -1) < 0) {
      if (errno == EINTR) continue;
      // Cannot poll: fall back to waiting for the pump thread alone.
      if (pump_.joinable()) pump_.join();
      break;
    }
    if (fds[0].revents != 0) break;
    if (n == 2 && fds[1].revents != 0) {
      cancelled = true;
      if (on_cancel) {
        on_cancel();
      } else {
        Signal(SIGTERM);
      }
    }
  }
  std::lock_guard lock(mu_);
  ChildExit exit = exit_;
  exit.cancelled = cancelled;
  return exit;
}

}  // namespace ploop::mount
