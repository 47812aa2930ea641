// `ploop send` and `ploop receive`: the CLI side of snapshot/stream.h.
// This file owns the file descriptors (stdin, stdout), the pipe tuning and
// the progress display; the library does the rest.
#include "stream_commands.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>

#include "cli_common.h"
#include "commands.h"
#include "mount-helper/stream_fd.h"
#include "ploop/disk.h"
#include "ploop/path.h"
#include "progress.h"
#include "snapshot/stream.h"
#include "units.h"

namespace ploop::cli {

namespace {

// A pipe's buffer is 64 KiB by default: a 4 MiB chunk would cross it in 64
// rounds of wake-ups. 1 MiB is the unprivileged maximum
// (/proc/sys/fs/pipe-max-size); anything else is left alone.
void WidenPipe(int fd) {
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) ::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
}

// Reads stdin; Cancel() wakes a read blocked on a quiet pipe (through a
// self-pipe), so the receiver can stop without waiting for the sender.
class FdReader final : public StreamReader {
 public:
  explicit FdReader(int fd) : fd_(fd) {
    if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) wake_[0] = wake_[1] = -1;
  }
  ~FdReader() override {
    if (wake_[0] >= 0) ::close(wake_[0]);
    if (wake_[1] >= 0) ::close(wake_[1]);
  }
  Result<size_t> Read(std::span<std::byte> out) override {
    for (;;) {
      pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
      int ready = ::poll(fds, wake_[0] >= 0 ? 2 : 1, -1);
      if (ready < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "wait for stdin");
      }
      if (wake_[0] >= 0 && (fds[1].revents & POLLIN)) {
        return Status::FromErrno(ECANCELED, "read stdin");
      }
      ssize_t n = ::read(fd_, out.data(), out.size());
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return Status::FromErrno(errno, "read stdin");
      }
      return static_cast<size_t>(n);
    }
  }
  void Cancel() override {
    if (wake_[1] >= 0) (void)!::write(wake_[1], "x", 1);
  }

 private:
  int fd_;
  int wake_[2];
};

// How busy all the CPUs were (/proc/stat), sampled every 100 ms or more,
// for --compress=auto. Saturated from 90% busy on, no longer after two
// samples in a row below 80%: while the CPUs have time to spare, the link,
// the disk or the receiver sets the pace, and every byte lz4 saves is
// worth it. Taken as saturated until measured: compressing only where it
// pays is the cheaper mistake for the first 100 ms (on a busy machine lz4
// spent 0.4 CPU-s of a 3.4 s send|receive of a real file system that
// way). Thread-safe (the sender's workers ask); without /proc/stat it
// stays saturated.
class CpuLoad {
 public:
  bool Saturated() {
    const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
    if (now - last_ms_.load(std::memory_order_relaxed) >= kIntervalMs && mu_.try_lock()) {
      if (now - last_ms_.load(std::memory_order_relaxed) >= kIntervalMs) {
        last_ms_.store(now, std::memory_order_relaxed);
        Sample();
      }
      mu_.unlock();
    }
    return saturated_.load(std::memory_order_relaxed);
  }

 private:
  // Under mu_.
  void Sample() {
    std::ifstream stat("/proc/stat");
    std::string cpu;
    uint64_t v[8] = {};
    if (!(stat >> cpu >> v[0] >> v[1] >> v[2] >> v[3] >> v[4] >> v[5] >> v[6] >> v[7]) ||
        cpu != "cpu") {
      return;
    }
    uint64_t total = 0;
    for (uint64_t x : v) total += x;
    const uint64_t idle = v[3] + v[4];  // idle, iowait
    if (prev_total_ != 0 && total > prev_total_) {
      const double busy =
          1.0 - static_cast<double>(idle - prev_idle_) / static_cast<double>(total - prev_total_);
      quiet_ = busy < 0.80 ? quiet_ + 1 : 0;
      if (busy >= 0.90) saturated_.store(true, std::memory_order_relaxed);
      if (quiet_ >= 2) saturated_.store(false, std::memory_order_relaxed);
    }
    prev_total_ = total;
    prev_idle_ = idle;
  }

  // Long enough for /proc/stat's 10 ms ticks to say 5% on two CPUs.
  static constexpr int64_t kIntervalMs = 100;
  std::mutex mu_;
  std::atomic<int64_t> last_ms_{0};
  std::atomic<bool> saturated_{true};
  int quiet_ = 0;  // samples in a row below 80% busy
  uint64_t prev_total_ = 0;
  uint64_t prev_idle_ = 0;
};

// SIGBUS while sending: a page of a mapped delta file (MappedSource in
// snapshot/stream_source.h) could not be read -- the file shrank under the
// sender (a writer ignoring our reader locks) or the device returned an
// I/O error. The stream is lost either way; say so in one line and exit
// with the I/O code instead of dying with "Bus error". Only
// async-signal-safe calls.
void OnSendSigbus(int) {
  static const char kMessage[] =
      "ploop send: read a delta file through its mapping: SIGBUS (the file shrank while being "
      "sent, or the device returned an I/O error); without PLOOP_SEND_MAP=1 it reads with direct "
      "I/O and names the error\n";
  (void)!::write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
  ::_exit(kExitIo);
}

// One line, the documented exit code. Not Fail(): its "run 'ploop check'"
// hint for corrupt images does not fit a corrupt stream.
int StreamFail(std::string_view command, const Status& status) {
  std::cerr << "ploop " << command << ": " << status.message() << "\n";
  return ExitCodeFor(status);
}

struct SendArgs {
  std::string dd;
  std::string guid;
  std::string from;
  bool flatten = false;
  bool layers = false;
  std::string resume;
  bool no_compress = false;
  std::string compress = "auto";
  std::string progress = "auto";
};

struct ReceiveArgs {
  std::string dir;
  bool resume = false;
  bool token = false;
  bool abort = false;
  std::string progress = "auto";
};

const char* PhaseName(StreamProgress::Phase phase) {
  switch (phase) {
    case StreamProgress::Phase::kDigest:
      return "digest";
    case StreamProgress::Phase::kVerifyBase:
      return "verify-base";
    case StreamProgress::Phase::kTransfer:
      return "transfer";
  }
  return "transfer";
}

const char* PhasePrefix(StreamProgress::Phase phase) {
  switch (phase) {
    case StreamProgress::Phase::kDigest:
      return "digesting snapshots: ";
    case StreamProgress::Phase::kVerifyBase:
      return "checking the base: ";
    case StreamProgress::Phase::kTransfer:
      return "";
  }
  return "";
}

StreamProgressFn ProgressTo(ProgressBar& bar) {
  if (!bar.enabled()) return {};
  return [&bar](const StreamProgress& p) {
    bar.Update(ProgressSample{PhaseName(p.phase), p.done_bytes, p.total_bytes, PhasePrefix(p.phase),
                              p.stream_bytes});
  };
}

int RunSend(const SendArgs& args) {
  if (args.flatten && args.layers) return Usage("send", "give one of --flatten and --layers");
  auto mode = ParseProgressMode(args.progress);
  if (!mode) return Usage("send", "--progress takes auto, json or none");
  std::string dd_path;
  if (!IsDescriptorPath(DefaultFileSystem(), args.dd, &dd_path)) {
    return Usage("send", args.dd + " is not a DiskDescriptor.xml (nor a folder holding one)");
  }
  if (::isatty(STDOUT_FILENO) == 1) {
    return Usage("send", "refusing to write a binary stream to a terminal; redirect stdout");
  }
  // A receiver that goes away is an EPIPE from write(), not a signal.
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGBUS, OnSendSigbus);
  WidenPipe(STDOUT_FILENO);
  SendOptions options;
  options.guid = args.guid;
  options.from_guid = args.from;
  options.layout = args.layers ? StreamLayout::kLayers : StreamLayout::kFlatten;
  options.resume_token = args.resume;
  if (args.compress != "auto" && args.compress != "lz4" && args.compress != "none") {
    return Usage("send", "--compress takes auto, lz4 or none");
  }
  options.compress = !args.no_compress && args.compress != "none";
  // auto: a stream kept in a file is compressed wherever lz4 shrinks it.
  // Into a pipe or a socket, a chunk is compressed when lz4 shrinks it and
  // either the CPUs have time to spare (the link or the receiver sets the
  // pace) or compressing costs less CPU than the bytes it saves would cost
  // to hash on both sides (CompressionPaysOff).
  CpuLoad load;
  struct stat st;
  const bool to_file = ::fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode);
  if (options.compress && args.compress == "auto" && !to_file) {
    options.compress_if = [&load](const CompressionEstimate& e) {
      return !load.Saturated() || CompressionPaysOff(e);
    };
  }
  ProgressBar bar(*mode);
  options.progress = ProgressTo(bar);
  // The snapshot is read ahead with direct I/O (PLOOP_SEND_MAP=1: through
  // mappings of the delta files, for a snapshot that is in the page
  // cache), and stored data goes into a pipe by reference
  // (PLOOP_SEND_NO_SPLICE=1: copied, for comparisons: tests,
  // tools/bench/README.md). The stream's bytes are the same.
  mount::FdStreamWriter out(STDOUT_FILENO, "stdout",
                            std::getenv("PLOOP_SEND_NO_SPLICE") == nullptr);
  options.map_source = std::getenv("PLOOP_SEND_MAP") != nullptr;
  auto sent = SendStream(DefaultFileSystem(), dd_path, out, options, LoadOptions());
  bar.Finish();
  if (!sent.ok()) return StreamFail("send", sent.error());
  return kExitOk;
}

int RunReceive(const ReceiveArgs& args) {
  if (args.resume + args.token + args.abort > 1) {
    return Usage("receive", "give at most one of --resume, --token and --abort");
  }
  auto mode = ParseProgressMode(args.progress);
  if (!mode) return Usage("receive", "--progress takes auto, json or none");
  FileSystem& fs = DefaultFileSystem();
  if (args.token) {
    auto token = ReceiveResumeToken(fs, args.dir);
    if (!token.ok()) return StreamFail("receive", token.error());
    std::cout << *token << "\n";
    return kExitOk;
  }
  if (args.abort) {
    Status s = AbortReceive(fs, args.dir);
    if (!s.ok()) return StreamFail("receive", s);
    return kExitOk;
  }
  if (::isatty(STDIN_FILENO) == 1) {
    return Usage("receive", "stdin is a terminal; feed the stream from ploop send");
  }
  // The folder is made here (only its last component); everything inside
  // it is named by the receiver.
  if (::mkdir(args.dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return StreamFail("receive", Status::FromErrno(errno, "create " + args.dir));
  }
  struct stat st;
  if (::stat(args.dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Usage("receive", args.dir + " is not a folder");
  }
  WidenPipe(STDIN_FILENO);
  ReceiveOptions options;
  options.resume = args.resume;
  // PLOOP_RECEIVE_BUFFERED=1: write through the page cache, for
  // comparisons (tools/bench/README.md); the received files are the same.
  options.direct_io = std::getenv("PLOOP_RECEIVE_BUFFERED") == nullptr;
  ProgressBar bar(*mode);
  options.progress = ProgressTo(bar);
  FdReader in(STDIN_FILENO);
  auto received = ReceiveStream(fs, args.dir, in, options);
  bar.Finish();
  if (!received.ok()) {
    // Asked of the real file system, not through PLOOP_FAULT's wrapper
    // (which fails everything after an injected cut).
    struct stat state;
    const std::string state_path = JoinPath(args.dir, kReceiveStateFileName);
    if (::stat(state_path.c_str(), &state) == 0) {
      std::cerr << "ploop receive: " << received.error().message()
                << "; the partial receive is kept: continue it with 'ploop send --resume "
                   "TOKEN ... | ploop receive --resume "
                << args.dir << "' (TOKEN from 'ploop receive --token " << args.dir
                << "') or discard it with --abort\n";
      return kExitInterrupted;
    }
    return StreamFail("receive", received.error());
  }
  // The snapshot (or top) the stream was made of: what a later
  // incremental stream is sent --from.
  std::cout << received->guids.back() << "\n";
  return kExitOk;
}

}  // namespace

void RegisterStreamCommands(CLI::App& app, int& rc) {
  static SendArgs send;
  auto* c_send = app.add_subcommand(
      "send", "write a snapshot (or the changes since an older one) to stdout as a stream");
  c_send->add_option("-u,--uuid", send.guid, "the snapshot to send (default: the current top)");
  c_send->add_option("--from", send.from,
                     "send only the changes since this older snapshot (incremental)");
  c_send->add_flag("--flatten", send.flatten, "one delta holding the snapshot's data (default)");
  c_send->add_flag("--layers", send.layers, "one delta per delta of the chain, GUIDs kept");
  c_send->add_option("--resume", send.resume,
                     "continue an interrupted transfer (TOKEN from receive --token)");
  CLI::Option* compress =
      c_send->add_option("--compress", send.compress,
                         "auto (default: lz4 where it pays, see the README), lz4 or none");
  c_send->add_flag("--no-compress", send.no_compress, "the same as --compress=none")
      ->excludes(compress);
  c_send->add_option("--progress", send.progress,
                     "auto (a bar on a terminal), json (lines on stderr) or none");
  c_send->add_option("DD", send.dd, "DiskDescriptor.xml (or its folder)")->required();
  c_send->callback([&rc] { rc = RunSend(send); });

  static ReceiveArgs receive;
  auto* c_receive = app.add_subcommand(
      "receive", "make a disk (or add snapshots to one) in DIR from a stream on stdin");
  c_receive->add_flag("--resume", receive.resume,
                      "continue the interrupted receive in DIR (with the stream send --resume "
                      "makes)");
  c_receive->add_flag("--token", receive.token,
                      "print the resume token of the interrupted receive in DIR");
  c_receive->add_flag("--abort", receive.abort, "discard the interrupted receive in DIR");
  c_receive->add_option("--progress", receive.progress,
                        "auto (a bar on a terminal), json (lines on stderr) or none");
  c_receive->add_option("DIR", receive.dir, "folder of the disk")->required();
  c_receive->callback([&rc] { rc = RunReceive(receive); });
}

}  // namespace ploop::cli
