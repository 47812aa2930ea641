// ChildProcess: runs a helper program (nbdkit, qemu-img) and collects what
// it says.
//
// The child gets /dev/null as stdin, a pipe as stderr (and stdout, or
// /dev/null) and, optionally, a "report" channel (a socket pair) as a
// chosen file descriptor, on which a cooperating child (our nbdkit plugin)
// writes one-line reports and reads requests (SendToChild). A pump
// thread reads the pipes, hands every line to a callback, and reaps the
// child when all pipes are closed, so a chatty child never blocks on a
// full pipe while the caller waits for something else.
//
// Thread-safety: Signal(), Wait() and exited() may be called from any
// thread; the callbacks run on the pump thread.
// Ownership: the destructor kills (SIGKILL) and reaps a child still
// running, and joins the pump thread.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "ploop/status.h"

namespace ploop::mount {

struct SpawnOptions {
  // argv[0] is looked up in PATH when it holds no '/'.
  std::vector<std::string> argv;
  // When >= 3, the child gets its end of the report channel as this file
  // descriptor.
  int report_fd = -1;
  // Environment variables removed for the child (e.g. LISTEN_FDS, which
  // would make nbdkit take our descriptors for activated sockets).
  std::vector<std::string> unset_env;
  // Collect stdout as lines of ChildStream::kStdout instead of discarding it.
  bool capture_stdout = false;
};

enum class ChildStream { kStderr, kStdout, kReport };

// How a child ended.
struct ChildExit {
  bool signaled = false;   // killed by a signal (code = the signal number)
  int code = 0;            // exit status, or the signal
  bool cancelled = false;  // Wait() sent SIGTERM because cancel_fd fired

  bool ok() const { return !signaled && code == 0; }
  std::string Describe() const;  // "exited with status 1", "killed by signal 9"
};

class ChildProcess {
 public:
  using LineFn = std::function<void(ChildStream stream, std::string_view line)>;
  using ExitFn = std::function<void(const ChildExit& exit)>;

  // Starts the child. NotFound when the program does not exist (or is not
  // executable); IOError for other failures. `on_line` gets every line
  // (without its newline; a line longer than 64 KiB is cut), `on_exit` is
  // called once after the child was reaped; both may be empty.
  static Result<std::unique_ptr<ChildProcess>> Spawn(const SpawnOptions& options, LineFn on_line,
                                                     ExitFn on_exit = {});

  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // Sends `sig` unless the child was already reaped.
  void Signal(int sig);
  // Writes `line` (newline included) to the report channel. IOError when
  // there is none or the child has closed its end.
  Status SendToChild(std::string_view line);
  // Waits until the child has exited and returns how. When `cancel_fd`
  // (if >= 0) becomes readable first, calls `on_cancel` once (default:
  // send SIGTERM), notes it in ChildExit::cancelled, and keeps waiting.
  ChildExit Wait(int cancel_fd = -1, const std::function<void()>& on_cancel = {});
  bool exited() const;

 private:
  ChildProcess(pid_t pid, int stderr_fd, int stdout_fd, int report_fd, int done_read_fd,
               int done_write_fd, LineFn on_line, ExitFn on_exit);
  void Pump();

  const pid_t pid_;
  int stderr_fd_;
  int stdout_fd_;
  int report_fd_;
  int report_write_fd_ = -1;  // a duplicate of report_fd_ for SendToChild()
  int done_read_fd_;          // readable once the child was reaped
  int done_write_fd_;         // written by the pump thread
  LineFn on_line_;
  ExitFn on_exit_;
  mutable std::mutex mu_;
  bool reaped_ = false;  // guarded by mu_
  ChildExit exit_;       // guarded by mu_
  std::thread pump_;
};

// The full path of `program` found in PATH (or `program` itself when it
// holds a '/' and is executable); empty when there is none.
std::string FindProgram(const std::string& program);

}  // namespace ploop::mount
