// FuseServer: see fuse_server.h. Request handlers convert Status to errno
// in one place (ReplyStatus) and never throw.
#define FUSE_USE_VERSION 312
#include "mount-helper/fuse_server.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "mount-helper/fuse_uring_abi.h"
#include "mount-helper/log.h"
#include "ploop/io/io_memory.h"

namespace ploop::mount {

namespace {

// The kernel's struct fuse_open_out (include/uapi/linux/fuse.h), replied by
// hand: libfuse 3.14 has no field for FOPEN_PARALLEL_DIRECT_WRITES.
struct OpenOut {
  uint64_t fh;
  uint32_t open_flags;
  int32_t backing_id;
};
static_assert(sizeof(OpenOut) == 16);
constexpr uint32_t kFopenDirectIo = 1u << 0;
constexpr uint32_t kFopenParallelDirectWrites = 1u << 6;

// Attributes are cached by the kernel for this long. The size changes only
// when the disk grows, and whoever grows it invalidates the inode first.
constexpr double kAttrTimeoutSeconds = 3600;
constexpr uint64_t kMaxRequestBytes = 1 << 20;
// Ring entries served by one thread (one io_uring; see RingWorker). The
// kernel fills an entry with its request (a write's data copied in) in the
// entry's thread, so one thread for all of a queue's entries serialises
// those copies: 1 MiB writes ran at 1210-2000 MiB/s with 16 entries on one
// thread against 1830-2230 with 4 per thread (2250-2570 with the classic
// workers);
// 4 per thread also gave the most random 4 KiB reads and writes (1 and 2
// per thread cost 40-65 us of CPU per request, 4 and more 22-33 us).
constexpr unsigned kRingEntriesPerThread = 4;
// A ring queue's only request, a write up to this size, is written
// synchronously (RingWorker::WriteAlone).
constexpr uint64_t kAloneWriteBytes = 64 << 10;
// Flush ahead (Context::NoteWrite): the score from which a write alone is
// flushed before the fsync for it arrives, and the score's bound.
constexpr int kFlushAheadFrom = 4;
constexpr int kFlushAheadMax = 8;
// Classic /dev/fuse workers beside a ring in use (see Run()).
constexpr unsigned kClassicBesideRing = 2;
// Writes from this size on bypass the image's page cache, and smaller ones
// while at most this many writes are in flight (see OnWrite).
constexpr uint64_t kMinDirectWriteBytes = 64 << 10;
constexpr uint32_t kDirectWriteQueueDepth = 2;

// Where a write request's data starts in what a read() of /dev/fuse
// returns: the request header, then the write header.
constexpr size_t kWriteDataOffset = sizeof(fuse_in_header) + sizeof(fuse_write_in);
static_assert(kWriteDataOffset == 80);

// A worker's buffer for the requests it reads from /dev/fuse. libfuse
// reads up to its bufsize (256 pages of data plus a 4 KiB header area) at
// the address it is given; the buffer is placed so that a write request's
// data starts on a page boundary -- it then goes to the image with direct
// I/O as it is, with no aligned copy. While the worker serves a read, the
// page-aligned area after the header is that read's data buffer (the
// request's fields have been parsed by then). The workers' buffers are
// slices of one IoMemory (Run()), so that they lie in huge pages: a direct
// transfer of a whole data area is then one or two pieces of physically
// contiguous memory for the device, not 256 pages.
class ReceiveBuffer {
 public:
  // The bytes of one buffer: a page for the headers, then the data area.
  static size_t Bytes() { return Page() + DataBytes(); }
  // Over Bytes() bytes at `base`, page-aligned.
  explicit ReceiveBuffer(std::byte* base) : base_(base) {}

  // Where libfuse reads the next request to.
  void* mem() const { return base_ + Page() - kWriteDataOffset; }
  // The page-aligned area for a read's data.
  std::span<std::byte> data_area() const { return {base_ + Page(), DataBytes()}; }

 private:
  static size_t Page() {
    static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return page;
  }
  static size_t DataBytes() { return 256 * Page() + 4096; }  // libfuse's bufsize at most

  std::byte* base_;
};

// The data area of the receive buffer of the worker serving this thread's
// request (empty outside our workers).
thread_local std::span<std::byte> t_read_area;
// The ring entry whose request this thread's handler serves (null on the
// classic workers; see RingEntry).
class RingEntry;
thread_local RingEntry* t_ring = nullptr;

int Errno(const Status& s) {
  int e = -s.ToErrno();
  return e > 0 ? e : EIO;
}

void NoOpSignal(int) {}

}  // namespace

struct FuseServer::Context {
  ServedDisk* disk = nullptr;
  FuseOptions options;
  FuseServer* server = nullptr;
  std::atomic<uint64_t> next_fh{1};
  std::atomic<uint64_t> loop_fh{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint32_t> writes_in_flight{0};
  // Run() and its workers.
  std::mutex run_mu;
  std::condition_variable run_cv;
  bool exit_requested = false;               // by Exit()
  unsigned workers_running = 0;              // workers still in their loop
  std::atomic<unsigned> classic_workers{0};  // classic workers started
  std::vector<pthread_t> workers;            // while Run() runs (ring workers too)

  // FUSE over io_uring (FuseOptions::io_uring; see RingWorker). `uring`:
  // the kernel has it enabled and our custom I/O functions are installed.
  bool uring = false;
  std::atomic<uint64_t> init_unique{0};  // the INIT request's, until replied
  std::atomic<bool> init_offers_uring{false};
  enum class RingState { kPreparing, kGo, kStop };
  RingState ring_state = RingState::kPreparing;  // under run_mu
  unsigned rings_total = 0;                      // ring workers started
  unsigned rings_prepared = 0;                   // ... with ring and buffers
  unsigned rings_failed = 0;                     // ... without
  unsigned rings_running = 0;                    // ... still in their function
  unsigned ring_queues = 0;
  unsigned ring_queue_entries = 0;  // per queue
  unsigned ring_threads_per_queue = 0;
  // Ring entries still serving, per queue (see RingEntryGone).
  std::unique_ptr<std::atomic<unsigned>[]> ring_entries;
  std::unique_ptr<std::atomic<unsigned>[]> ring_busy;  // per queue: requests being served
  std::atomic<bool> ring_in_use{false};
  std::atomic<uint64_t> ring_requests{0};
  std::atomic<uint64_t> ring_async_requests{0};  // served by asynchronous image I/O
  // Flush ahead. At depth 1 a file system's fsync is a write, its reply,
  // and then a flush: the reply goes back through the loop device to the
  // file system, which sends the flush, and the loop device hands it to
  // FUSE and to a thread of ours -- some 30 us of hops here, while the disk
  // has nothing to do. So while the writes alone in flight (small ones, at
  // depth 1) have been followed by an fsync, the thread that served one
  // flushes the disk as soon as its reply is out. The fsync then finds the
  // data synced, or waits for the flush under way (Delta::Flush() holds its
  // lock throughout), and replies without a second device flush. A flush
  // ahead is only ever an extra flush: one that fails leaves its failure
  // to the next Flush() to report.
  //
  // NoteWrite(): a write is being served, `alone` if it is small and the
  // only request in flight; true if it should be flushed ahead once
  // replied. The score rises by one with every such write an fsync
  // followed (NoteFsync()) and falls by two with every one that another
  // write followed, and from kFlushAheadFrom on writes are flushed ahead.
  bool NoteWrite(bool alone) {
    if (!alone) {
      // Every write at depth comes here: read the shared flag, and write it
      // only when it changes, so the threads do not pass its line around.
      if (alone_write_last.load(std::memory_order_relaxed)) {
        alone_write_last.store(false, std::memory_order_relaxed);
      }
      return false;
    }
    const bool after_alone = alone_write_last.exchange(true, std::memory_order_relaxed);
    int score = fsync_follows.load(std::memory_order_relaxed);
    if (after_alone) {
      score = std::max(score - 2, 0);
      fsync_follows.store(score, std::memory_order_relaxed);
    }
    return score >= kFlushAheadFrom;
  }
  void NoteFsync() {
    if (alone_write_last.exchange(false, std::memory_order_relaxed)) {
      const int score = fsync_follows.load(std::memory_order_relaxed);
      fsync_follows.store(std::min(score + 1, kFlushAheadMax), std::memory_order_relaxed);
    }
  }
  void FlushAhead() {
    flushes_ahead.fetch_add(1, std::memory_order_relaxed);
    disk->Flush().IgnoreError();
  }
  std::atomic<bool> alone_write_last{false};  // the last write or fsync was such a write
  std::atomic<int> fsync_follows{0};          // the score
  std::atomic<uint64_t> flushes_ahead{0};

  // Logs the first errors of the data path and then every 1000th, so a
  // failing disk is visible in the log without flooding it.
  void Failed(const char* what, uint64_t offset, const Status& s) {
    uint64_t n = errors.fetch_add(1) + 1;
    if (n <= 20 || n % 1000 == 0) {
      LogError(std::string(what) + " at " + std::to_string(offset) + " failed: " + s.ToString() +
               (n > 20 ? " (" + std::to_string(n) + " errors so far)" : ""));
    }
  }
};

namespace {

using Context = FuseServer::Context;

Context& Ctx(fuse_req_t req) { return *static_cast<Context*>(fuse_req_userdata(req)); }

void ReplyStatus(fuse_req_t req, const Status& s) { fuse_reply_err(req, s.ok() ? 0 : Errno(s)); }

struct stat DiskStat(const ServedDisk& disk) {
  struct stat st = {};
  st.st_ino = FUSE_ROOT_ID;
  st.st_mode = S_IFREG | (disk.writable() ? 0600 : 0400);
  st.st_nlink = 1;
  st.st_size = static_cast<off_t>(disk.size_bytes());
  st.st_blksize = 4096;
  st.st_blocks = static_cast<blkcnt_t>(disk.size_bytes() / 512);
  return st;
}

void OnInit(void* userdata, fuse_conn_info* conn) {
  conn->max_write = kMaxRequestBytes;
  conn->max_readahead = 0;  // no page cache: nothing to read ahead
  // Asynchronous direct I/O requests count as background requests; the
  // default limit (12) would cap the loop device's queue depth.
  conn->max_background = 128;
  conn->congestion_threshold = 96;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  // No splice: requests are read into memory and replies written from
  // memory. Splicing a reply out of a delta file goes through its page
  // cache, which the direct I/O above avoids, and libfuse's splice path
  // takes three system calls per request where a read() takes one.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  (void)userdata;
}

void OnGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  (void)fi;
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct stat st = DiskStat(*Ctx(req).disk);
  fuse_reply_attr(req, &st, kAttrTimeoutSeconds);
}

void OnSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
  (void)fi;
  Context& ctx = Ctx(req);
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  // The disk's size is the image's; times and modes are not kept.
  if ((to_set & FUSE_SET_ATTR_SIZE) &&
      static_cast<uint64_t>(attr->st_size) != ctx.disk->size_bytes()) {
    fuse_reply_err(req, EPERM);
    return;
  }
  struct stat st = DiskStat(*ctx.disk);
  fuse_reply_attr(req, &st, kAttrTimeoutSeconds);
}

void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  (void)parent;
  (void)name;
  fuse_reply_err(req, ENOTDIR);
}

void OnOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Context& ctx = Ctx(req);
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if ((fi->flags & O_ACCMODE) != O_RDONLY && !ctx.disk->writable()) {
    fuse_reply_err(req, EROFS);
    return;
  }
  if (!ctx.server->TakeOpen()) {
    fuse_reply_err(req, EBUSY);  // the loop device's file is the only one
    return;
  }
  OpenOut out = {};
  out.fh = ctx.next_fh.fetch_add(1);
  out.open_flags = kFopenDirectIo | kFopenParallelDirectWrites;
  ctx.loop_fh.store(out.fh);
  struct iovec iov = {&out, sizeof out};
  fuse_reply_iov(req, &iov, 1);
}

void OnRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  (void)ino;
  Context& ctx = Ctx(req);
  fuse_reply_err(req, 0);
  if (fi->fh == ctx.loop_fh.load() && ctx.options.on_released) ctx.options.on_released();
}

void OnRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  (void)ino;
  (void)fi;
  Context& ctx = Ctx(req);
  const uint64_t disk_size = ctx.disk->size_bytes();
  const uint64_t offset = static_cast<uint64_t>(off);
  if (offset >= disk_size || size == 0) {
    fuse_reply_buf(req, nullptr, 0);
    return;
  }
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, disk_size - offset));
  // Every worker (classic or ring) sets its data area, and the kernel never
  // asks for more than max_write, which the area holds.
  if (n > t_read_area.size()) {
    ctx.Failed("read", offset,
               Status::FromErrno(EIO, "no buffer for a read of " + std::to_string(n)));
    fuse_reply_err(req, EIO);
    return;
  }
  std::span<std::byte> out = t_read_area.first(n);
  Status s = ctx.disk->Read(offset, out);
  if (!s.ok()) {
    ctx.Failed("read", offset, s);
    ReplyStatus(req, s);
    return;
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(out.data()), n);
}

void OnWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
             fuse_file_info* fi) {
  (void)ino;
  (void)fi;
  Context& ctx = Ctx(req);
  const uint64_t offset = static_cast<uint64_t>(off);
  if (offset > ctx.disk->size_bytes() || size > ctx.disk->size_bytes() - offset) {
    fuse_reply_err(req, EFBIG);
    return;
  }
  auto data = std::span<const std::byte>(reinterpret_cast<const std::byte*>(buf), size);
  // Large writes, and any write while few are in flight, go to the image
  // with direct I/O (our workers receive a write's data page-aligned): a
  // later fsync then has nothing to write back, only the device cache to
  // flush. Small writes at a high queue depth go through the host's page
  // cache, which batches them into few device requests, where direct I/O
  // would cost one device round trip (and, virtualised, one exit) each
  // (random 4 KiB writes at queue depth 32 ran at half the rate direct).
  bool alone;
  {
    const uint32_t in_flight = ctx.writes_in_flight.fetch_add(1) + 1;
    struct Done {
      std::atomic<uint32_t>& n;
      ~Done() { n.fetch_sub(1); }
    } done{ctx.writes_in_flight};
    alone = in_flight == 1 && size <= kAloneWriteBytes;
    const bool direct = size >= kMinDirectWriteBytes || in_flight <= kDirectWriteQueueDepth;
    Status s = ctx.disk->Write(
        offset, data,
        direct ? ServedDisk::Caching::kDirectWhenAligned : ServedDisk::Caching::kBuffered);
    if (!s.ok()) {
      ctx.Failed("write", offset, s);
      ReplyStatus(req, s);
      return;
    }
  }
  fuse_reply_write(req, size);
  // A ring thread notes its writes and flushes ahead itself, once the reply
  // is submitted (RingWorker::Dispatch, FlushAhead).
  if (t_ring == nullptr && ctx.NoteWrite(alone)) ctx.FlushAhead();
}

void OnFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  // close(2) of the file: durability comes with fsync.
  (void)ino;
  (void)fi;
  fuse_reply_err(req, 0);
}

void OnFsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
  (void)ino;
  (void)datasync;
  (void)fi;
  Context& ctx = Ctx(req);
  ctx.NoteFsync();
  Status s = ctx.disk->Flush();
  if (!s.ok()) ctx.Failed("flush", 0, s);
  ReplyStatus(req, s);
}

void OnFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length,
                 fuse_file_info* fi) {
  (void)ino;
  (void)fi;
  Context& ctx = Ctx(req);
  // Discards (PUNCH_HOLE) and write-zeroes (ZERO_RANGE, or PUNCH_HOLE when
  // unmapping is allowed) from the loop device: the range reads as zeros
  // afterwards and gives space back where it can. Preallocation has no
  // meaning for a disk that allocates on write.
  const int punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  const bool zero = mode == punch || (mode & ~FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE;
  if (!zero) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  const uint64_t disk_size = ctx.disk->size_bytes();
  uint64_t offset = static_cast<uint64_t>(off);
  uint64_t end = std::min<uint64_t>(offset + static_cast<uint64_t>(length), disk_size);
  if (offset >= end) {
    fuse_reply_err(req, 0);
    return;
  }
  Status s = ctx.disk->Discard(offset, end - offset);
  if (!s.ok()) ctx.Failed("discard", offset, s);
  ReplyStatus(req, s);
}

const fuse_lowlevel_ops kOps = [] {
  fuse_lowlevel_ops ops = {};
  ops.init = OnInit;
  ops.lookup = OnLookup;
  ops.getattr = OnGetattr;
  ops.setattr = OnSetattr;
  ops.open = OnOpen;
  ops.release = OnRelease;
  ops.read = OnRead;
  ops.write = OnWrite;
  ops.flush = OnFlush;
  ops.fsync = OnFsync;
  ops.fallocate = OnFallocate;
  return ops;
}();

void LogFromFuse(enum fuse_log_level level, const char* fmt, va_list ap) {
  char line[512];
  std::vsnprintf(line, sizeof line, fmt, ap);
  size_t n = std::strlen(line);
  while (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
  if (level <= FUSE_LOG_ERR) {
    LogError(std::string("fuse: ") + line);
  } else if (level <= FUSE_LOG_NOTICE) {
    LogInfo(std::string("fuse: ") + line);
  }
}

// libfuse option values escape commas with a backslash.
std::string EscapeOption(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// FUSE over io_uring (defined with the ring workers below).
bool EnableKernelUring();
ssize_t ReadHook(int fd, void* buf, size_t len, void* userdata);
ssize_t WritevHook(int fd, iovec* iov, int count, void* userdata);

}  // namespace

bool FuseServer::TakeOpen() { return open_allowed_.exchange(false); }

Result<std::unique_ptr<FuseServer>> FuseServer::Mount(ServedDisk& disk, FuseOptions options) {
  fuse_set_log_func(LogFromFuse);
  std::unique_ptr<FuseServer> server(new FuseServer());
  server->ctx_ = std::make_unique<Context>();
  server->ctx_->disk = &disk;
  server->ctx_->options = std::move(options);
  server->ctx_->server = server.get();
  const FuseOptions& o = server->ctx_->options;
  std::string mount_options = "fsname=" + EscapeOption(o.fsname) + ",subtype=ploop";
  std::string prog = "ploop";
  std::string dash_o = "-o";
  char* argv[] = {prog.data(), dash_o.data(), mount_options.data()};
  fuse_args args = FUSE_ARGS_INIT(3, argv);
  server->session_ = fuse_session_new(&args, &kOps, sizeof kOps, server->ctx_.get());
  if (server->session_ == nullptr) return Status::FromErrno(EIO, "create the FUSE session");
  // The kernel offers FUSE over io_uring in the INIT request it sends when
  // mounting: enable it before.
  const bool uring = o.io_uring && EnableKernelUring();
  if (fuse_session_mount(server->session_, o.mountpoint.c_str()) != 0) {
    return Status::FromErrno(EIO, "mount FUSE on " + o.mountpoint + " (see the log)");
  }
  server->mounted_ = true;
  if (uring) {
    fuse_custom_io io = {};
    io.writev = WritevHook;
    io.read = ReadHook;
    if (fuse_session_custom_io(server->session_, &io, fuse_session_fd(server->session_)) == 0) {
      server->ctx_->uring = true;
    } else {
      LogError("FUSE over io_uring: libfuse refused the custom I/O: classic /dev/fuse workers");
    }
  }
  return server;
}

FuseServer::~FuseServer() {
  if (session_ != nullptr) {
    Unmount();
    fuse_session_destroy(session_);
  }
}

namespace {

// One worker: reads a request, serves it, reads the next, until the
// session ends (unmounted, aborted, or Exit()). A blocked read is woken by
// SIGUSR1 (EINTR).
void ServeRequests(Context& ctx, fuse_session* session, std::byte* buffer_base) {
  ReceiveBuffer buffer(buffer_base);
  t_read_area = buffer.data_area();
  fuse_buf request = {};
  while (!fuse_session_exited(session)) {
    request.mem = buffer.mem();
    request.size = 0;
    request.flags = static_cast<fuse_buf_flags>(0);
    int rc = fuse_session_receive_buf(session, &request);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc <= 0) {
      if (rc < 0) LogError(std::string("read a FUSE request: ") + std::strerror(-rc));
      break;
    }
    fuse_session_process_buf(session, &request);
  }
  t_read_area = {};
  // Any worker leaving ends the session: the others follow.
  fuse_session_exit(session);
  std::lock_guard lock(ctx.run_mu);
  --ctx.workers_running;
  ctx.run_cv.notify_all();
}

}  // namespace

namespace {

// ---- FUSE over io_uring ----
//
// With FUSE_OVER_IO_URING agreed in INIT, the kernel hands requests to
// "ring entries" the server registered on /dev/fuse with io_uring commands
// (IORING_OP_URING_CMD, 128-byte SQEs), one queue per possible CPU; a
// request goes to the queue of the CPU it was issued on, and the ring takes
// over only once every queue has an entry. An entry is a header buffer
// (fuse_uring_abi.h's ReqHeader: in/out header, the opcode's argument
// struct) and a payload buffer (the request's data, then the reply's). The
// reply goes back with COMMIT_AND_FETCH, which also makes the entry wait for
// the next request: one system call per request where /dev/fuse takes a
// read and a writev.
//
// Each queue's entries are served by a few RingWorker threads, a few
// entries each (kRingEntriesPerThread): an event loop over one io_uring
// that holds the thread's entries AND their image I/O. A read, or a write
// into clusters the top already holds -- nearly every request of a running
// disk -- is planned by ServedDisk (PlanRead/PlanWrite) and its pieces go
// to the delta files as io_uring reads and writes straight from and into
// the entry's payload buffer; their completions commit the reply. So a
// thread keeps several requests in flight and sleeps only when all of them
// wait for the device, instead of a thread per request that wakes for the
// request and again for its own pread or pwrite. The rest (an
// allocating write or copy-up, a small write that is all its queue has to
// do (WriteAlone), discards, fsync, attributes, open/release, and anything
// a plan did not finish: a short transfer, an error) goes
// through libfuse and our synchronous handlers: on the worker itself when
// nothing else of its entries is in flight, otherwise on a helper thread
// (RingHelpers), which hands the entry back through an eventfd. Only the
// worker submits to its ring. libfuse parses those requests: the entry's
// request is laid out as a /dev/fuse read would return it,
// [fuse_in_header][op args][data], with the data where the kernel put it
// (the page-aligned payload buffer), and the custom writev (WritevHook)
// puts the reply into the entry instead of writing it to /dev/fuse -- a
// read's data is already in the payload buffer (OnRead reads into
// t_read_area), so it is not copied. INIT, interrupts, forgets and
// notifications stay on /dev/fuse with the classic workers, which also
// serve everything when the ring is not used.

// One ring entry: its buffers and the request in it.
class RingEntry {
 public:
  // The bytes of an entry's request buffer, the `base` it is given: one
  // page for the request's headers (at most sizeof(fuse_in_header) +
  // kOpInOutBytes, so libfuse sees one buffer), then the payload.
  static size_t BufferBytes(size_t payload_bytes) {
    return static_cast<size_t>(::sysconf(_SC_PAGESIZE)) + payload_bytes;
  }
  // `base`: BufferBytes(payload_bytes) page-aligned bytes the caller owns
  // (a slice of the workers' IoMemory, see ReceiveBuffer).
  RingEntry(size_t payload_bytes, std::byte* base) : payload_bytes_(payload_bytes), base_(base) {}
  ~RingEntry() { std::free(header_); }
  RingEntry(const RingEntry&) = delete;
  RingEntry& operator=(const RingEntry&) = delete;

  bool Prepare(std::string* why) {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    header_ = static_cast<fuse_uring::ReqHeader*>(
        std::aligned_alloc(page, (sizeof(fuse_uring::ReqHeader) + page - 1) / page * page));
    if (header_ == nullptr) {
      *why = "no memory for the ring buffers";
      return false;
    }
    std::memset(header_, 0, sizeof *header_);
    payload_ = base_ + page;
    iov_[0] = {header_, sizeof *header_};
    iov_[1] = {payload_, payload_bytes_};
    return true;
  }

  const iovec* iov() const { return iov_; }
  std::byte* payload() const { return payload_; }
  size_t payload_bytes() const { return payload_bytes_; }
  fuse_in_header in() const {
    fuse_in_header in;
    std::memcpy(&in, header_->in_out, sizeof in);
    return in;
  }
  template <typename T>
  T op_in() const {
    T t;
    static_assert(sizeof t <= fuse_uring::kOpInOutBytes);
    std::memcpy(&t, header_->op_in, sizeof t);
    return t;
  }
  uint32_t payload_in_bytes() const { return header_->ring_ent_in_out.payload_sz; }
  uint64_t commit_id() const { return header_->ring_ent_in_out.commit_id; }

  // WritevHook for this thread's request: the reply into the entry.
  bool Owns(const fuse_out_header& out) const { return out.unique != 0 && out.unique == unique_; }
  ssize_t TakeReply(const iovec* iov, int count) {
    size_t total = 0;
    for (int i = 0; i < count; ++i) total += iov[i].iov_len;
    fuse_out_header out;
    std::memcpy(&out, iov[0].iov_base, sizeof out);
    size_t data = total - iov[0].iov_len;
    if (data > payload_bytes_) {
      out.error = -EIO;
      out.len = sizeof out;
      data = 0;
    } else if (!(count == 2 && iov[1].iov_base == payload_)) {
      size_t at = 0;
      for (int i = 1; i < count; ++i) {
        std::memmove(payload_ + at, iov[i].iov_base, iov[i].iov_len);
        at += iov[i].iov_len;
      }
    }
    std::memcpy(header_->in_out, &out, sizeof out);
    SetPayloadBytes(static_cast<uint32_t>(data));
    replied_ = true;
    return static_cast<ssize_t>(total);
  }

  // A successful reply with `data_bytes` of the payload (the async path).
  void ReplyOk(uint32_t data_bytes) {
    const fuse_in_header request = in();
    fuse_out_header out = {static_cast<uint32_t>(sizeof out + data_bytes), 0, request.unique};
    std::memcpy(header_->in_out, &out, sizeof out);
    SetPayloadBytes(data_bytes);
  }

  // Serves the request through libfuse and our handlers, synchronously
  // (on a helper thread, or on the worker); the reply is in the entry after.
  void HandleSync(fuse_session* se) {
    const fuse_in_header request = in();
    const uint32_t payload_sz = payload_in_bytes();
    unique_ = request.unique;
    replied_ = false;
    if (request.len < sizeof request + payload_sz || payload_sz > payload_bytes_ ||
        request.len - sizeof request - payload_sz > fuse_uring::kOpInOutBytes) {
      LogError("FUSE over io_uring: malformed request (opcode " + std::to_string(request.opcode) +
               ")");
    } else {
      const size_t op_bytes = request.len - sizeof request - payload_sz;
      std::byte* start = payload_ - sizeof request - op_bytes;
      std::memcpy(start, &request, sizeof request);
      std::memcpy(start + sizeof request, header_->op_in, op_bytes);
      fuse_buf buf = {};
      buf.mem = start;
      buf.size = request.len;
      t_ring = this;
      t_read_area = {payload_, payload_bytes_};
      fuse_session_process_buf(se, &buf);
      t_read_area = {};
      t_ring = nullptr;
    }
    if (!replied_) {  // every request on the ring takes a reply
      fuse_out_header out = {sizeof out, -EIO, unique_};
      std::memcpy(header_->in_out, &out, sizeof out);
      SetPayloadBytes(0);
    }
    unique_ = 0;
  }

  // The request's asynchronous image I/O (RingWorker).
  ServedDisk::Plan plan;
  uint32_t pending = 0;      // pieces in flight
  bool io_failed = false;    // a piece failed, or could not be submitted
  uint64_t io_expected = 0;  // bytes the pieces transfer in full
  uint64_t io_done = 0;      // bytes they did
  uint32_t reply_bytes = 0;  // a read's data / a write's size
  bool is_write = false;

 private:
  // The reply's size in the entry's trailer; the rest of it zero (later
  // protocol versions give the padding a meaning, zero being the default).
  void SetPayloadBytes(uint32_t bytes) {
    fuse_uring::EntInOut& trailer = header_->ring_ent_in_out;
    trailer.flags = 0;
    trailer.payload_sz = bytes;
    trailer.padding = 0;
    trailer.reserved = 0;
  }

  size_t payload_bytes_;
  std::byte* base_;
  fuse_uring::ReqHeader* header_ = nullptr;
  std::byte* payload_ = nullptr;
  iovec iov_[2] = {};
  uint64_t unique_ = 0;
  bool replied_ = false;
};

// Threads that serve the ring's synchronous requests (see above) while the
// workers go on with the rest.
class RingHelpers {
 public:
  using Job = std::function<void()>;
  void Start(unsigned threads) {
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
  }
  void Post(Job job) {
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  // Runs the queued jobs, then ends the threads.
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }
  ~RingHelpers() { Stop(); }

 private:
  void Loop() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      Job job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// One thread's event loop over some of a queue's entries (see above).
class RingWorker {
 public:
  RingWorker(Context& ctx, unsigned qid, RingHelpers& helpers)
      : ctx_(ctx), qid_(qid), helpers_(helpers) {
    can_pin_ = qid_ < CPU_SETSIZE && CPU_ISSET(qid_, &allowed_) && CPU_COUNT(&allowed_) > 1;
  }
  ~RingWorker() {
    if (ring_ok_) io_uring_queue_exit(&ring_);
    if (event_fd_ >= 0) ::close(event_fd_);
  }
  RingWorker(const RingWorker&) = delete;
  RingWorker& operator=(const RingWorker&) = delete;

  // Sets up the io_uring, the eventfd and `entries` entries whose buffers
  // are at `base` (entries * RingEntry::BufferBytes(payload_bytes) bytes);
  // false (and why) if it cannot.
  bool Prepare(unsigned entries, size_t payload_bytes, std::byte* base, std::string* why) {
    for (unsigned i = 0; i < entries; ++i) {
      entries_.push_back(std::make_unique<RingEntry>(
          payload_bytes, base + size_t{i} * RingEntry::BufferBytes(payload_bytes)));
      if (!entries_.back()->Prepare(why)) return false;
    }
    event_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (event_fd_ < 0) {
      *why = std::string("eventfd: ") + std::strerror(errno);
      return false;
    }
    // Deferring task work to the waits (IORING_SETUP_DEFER_TASKRUN) measured
    // 5-10% slower on random reads: requests arrive as task work.
    io_uring_params params = {};
    params.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_CQSIZE;
    params.cq_entries = kRingSize * 4;
    int rc = io_uring_queue_init_params(kRingSize, &ring_, &params);
    if (rc == -EINVAL) {
      params = {};
      params.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
      params.cq_entries = kRingSize * 4;
      rc = io_uring_queue_init_params(kRingSize, &ring_, &params);
    }
    if (rc < 0) {
      *why = std::string("io_uring_queue_init: ") + std::strerror(-rc);
      return false;
    }
    ring_ok_ = true;
    return true;
  }

  // Registers the entries and serves requests until the connection ends,
  // the session exits (SIGUSR1 interrupts the wait) or the kernel refused
  // every entry, then waits for the requests in flight. Returns how many
  // entries the kernel refused (see RingEntryGone).
  unsigned Serve(fuse_session* se) {
    se_ = se;
    fuse_fd_ = fuse_session_fd(se);
    if (RefusalInjected()) {
      LogError("FUSE over io_uring: queue " + std::to_string(qid_) +
               ": registration refused (PLOOP_FAULT_FUSE_RING_REFUSE)");
      return static_cast<unsigned>(entries_.size());
    }
    for (auto& e : entries_) {
      if (!QueueCmd(*e, fuse_uring::kCmdRegister)) return static_cast<unsigned>(entries_.size());
    }
    ArmEvent();
    bool ended = false;  // the connection ended (or the session exited)
    for (;;) {
      const bool exited = fuse_session_exited(se);
      if ((exited || ended || registered_ == 0) && busy_ == 0) break;
      int rc = io_uring_submit_and_wait(&ring_, 1);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
        LogError(std::string("FUSE over io_uring: wait: ") + std::strerror(-rc));
        if (busy_ == 0) return fuse_session_exited(se) ? 0 : registered_ + lost_;
      }
      unsigned head;
      io_uring_cqe* cqe;
      unsigned seen = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        ++seen;
        ended = OnCompletion(cqe->user_data, cqe->res) || ended;
      }
      io_uring_cq_advance(&ring_, seen);
      if (flush_ahead_) FlushAhead();
      AdjustAffinity();
    }
    io_uring_submit(&ring_);  // the last replies still go back
    return lost_;
  }

  // CPU affinity follows the load. A queue belongs to a CPU: the kernel
  // puts a request on the queue of the CPU that made it, and wakes a
  // thread of that queue; the reply wakes the requester there. When the
  // queue serves one small request at a time (fsync at depth 1: a 4 KiB
  // write, then flushes), every round trip is two wake-ups, and on a VM a
  // wake-up on another CPU is an inter-processor interrupt, i.e. an exit
  // to the host. So while the queue has at most one request being served
  // and the requests are small, its threads run on the queue's CPU; with
  // more in flight, or large requests (whose copies the other CPUs help
  // with), they may run anywhere again. Measured with fio through ext4
  // (tools/bench/README.md, session 8): fsync at depth 1 0.80-0.83x of
  // the in-kernel limit, against mostly 0.68-0.80x unpinned; random 4 KiB
  // at depth 32 and sequential 1 MiB the same either way. Pinned whatever
  // the load, random writes at depth 32 lost 19-28% (the loop device sends
  // them all from one CPU); pinned whenever the queue had one request,
  // whatever its size, sequential 1 MiB writes lost 15-19%.
  static constexpr unsigned kCalmRounds = 64;  // event loop rounds before pinning
  static constexpr uint64_t kSmallRequestBytes = 64 * 1024;
  void AdjustAffinity() {
    if (!can_pin_) return;
    const unsigned load = ctx_.ring_busy[qid_].load(std::memory_order_relaxed);
    if (load >= 2 || request_bytes_avg_ > kSmallRequestBytes) {
      calm_ = 0;
      if (pinned_) SetPinned(false);
    } else if (!pinned_ && ++calm_ >= kCalmRounds) {
      SetPinned(true);
    }
  }
  void SetPinned(bool pin) {
    cpu_set_t set;
    if (pin) {
      CPU_ZERO(&set);
      CPU_SET(qid_, &set);
    } else {
      set = allowed_;
    }
    if (::pthread_setaffinity_np(::pthread_self(), sizeof set, &set) == 0) {
      pinned_ = pin;
    } else {
      can_pin_ = false;  // advice only: leave the affinity as it is
    }
  }
  // The CPUs the daemon may use; the queue's CPU must be one of them.
  cpu_set_t allowed_ = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    (void)::sched_getaffinity(0, sizeof set, &set);
    return set;
  }();
  bool can_pin_ = false;  // set by the constructor
  bool pinned_ = false;
  unsigned calm_ = 0;               // rounds with a calm queue
  uint64_t request_bytes_avg_ = 0;  // of the requests this thread took (moving average)

 public:
  // From a helper: the entry's reply is ready; the worker commits it.
  void HandBack(RingEntry* e) {
    bool was_empty;
    {
      std::lock_guard lock(done_mu_);
      was_empty = done_.empty();
      done_.push_back(e);
    }
    if (was_empty) {
      const uint64_t one = 1;
      [[maybe_unused]] ssize_t n = ::write(event_fd_, &one, sizeof one);
    }
  }

 private:
  static constexpr unsigned kRingSize = 256;
  // user_data: an entry's address, its low bits saying what completed.
  static constexpr uint64_t kTagCmd = 0, kTagIo = 1, kTagEvent = 2, kTagMask = 7;
  static_assert(alignof(RingEntry) > kTagMask);

  // Handles one completion; true when it says the connection ended.
  bool OnCompletion(uint64_t user_data, int res) {
    const uint64_t tag = user_data & kTagMask;
    auto* e = reinterpret_cast<RingEntry*>(user_data & ~kTagMask);
    if (tag == kTagEvent) {
      std::vector<RingEntry*> done;
      {
        std::lock_guard lock(done_mu_);
        done.swap(done_);
      }
      for (RingEntry* d : done) Commit(*d);
      ArmEvent();
      return false;
    }
    if (tag == kTagIo) {
      OnPieceDone(*e, res);
      return false;
    }
    // A command completed: a request arrived in the entry, or the entry
    // ended.
    --registered_;
    if (res < 0) {
      // ENOTCONN/ECANCELED: the connection ends. Anything else: the kernel
      // refused the entry (see RingEntryGone).
      if (res == -ENOTCONN || res == -ECANCELED) return true;
      LogError("FUSE over io_uring: queue " + std::to_string(qid_) + ": " + std::strerror(-res));
      ++lost_;
      return false;
    }
    ctx_.ring_requests.fetch_add(1, std::memory_order_relaxed);
    ctx_.ring_busy[qid_].fetch_add(1, std::memory_order_relaxed);
    ++busy_;
    Dispatch(*e);
    return false;
  }

  void OnPieceDone(RingEntry& e, int res);
  void Dispatch(RingEntry& e);
  bool StartRead(RingEntry& e);
  bool StartWrite(RingEntry& e);
  bool WriteAlone(uint64_t bytes) const;
  void FlushAhead();
  void Submit(RingEntry& e);
  void Slow(RingEntry& e);
  void Commit(RingEntry& e);

  bool QueueCmd(RingEntry& e, uint32_t cmd_op) {
    io_uring_sqe* sqe = Sqe();
    if (sqe == nullptr) return false;
    std::memset(static_cast<void*>(sqe), 0, 2 * sizeof(io_uring_sqe));  // a 128-byte SQE
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd_;
    sqe->cmd_op = cmd_op;
    if (cmd_op == fuse_uring::kCmdRegister) {
      sqe->addr = reinterpret_cast<uintptr_t>(e.iov());
      sqe->len = 2;
    }
    fuse_uring::CmdReq req = {};
    req.commit_id = cmd_op == fuse_uring::kCmdRegister ? 0 : e.commit_id();
    req.qid = static_cast<uint16_t>(qid_);
    std::memcpy(sqe->cmd, &req, sizeof req);
    io_uring_sqe_set_data64(sqe, reinterpret_cast<uint64_t>(&e) | kTagCmd);
    ++registered_;
    return true;
  }

  void ArmEvent() {
    io_uring_sqe* sqe = Sqe();
    if (sqe == nullptr) return;
    io_uring_prep_read(sqe, event_fd_, &event_value_, sizeof event_value_, 0);
    io_uring_sqe_set_data64(sqe, kTagEvent);
  }

  // A free submission entry, submitting what is queued when there is none.
  io_uring_sqe* Sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    if (sqe == nullptr) LogError("FUSE over io_uring: no free submission entry");
    return sqe;
  }

  // Tests: PLOOP_FAULT_FUSE_RING_REFUSE=Q makes queue Q's worker act as if
  // the kernel had refused its entries.
  bool RefusalInjected() const {
    const char* q = std::getenv("PLOOP_FAULT_FUSE_RING_REFUSE");
    return q != nullptr && *q != '\0' && std::strtoul(q, nullptr, 10) == qid_;
  }

  Context& ctx_;
  const unsigned qid_;
  RingHelpers& helpers_;
  fuse_session* se_ = nullptr;
  io_uring ring_ = {};
  bool ring_ok_ = false;
  int fuse_fd_ = -1;
  int event_fd_ = -1;
  uint64_t event_value_ = 0;
  std::vector<std::unique_ptr<RingEntry>> entries_;
  unsigned registered_ = 0;   // entries the kernel holds a command of
  unsigned busy_ = 0;         // entries serving a request
  unsigned lost_ = 0;         // entries the kernel refused
  bool flush_ahead_ = false;  // FlushAhead() once the replies are out
  std::mutex done_mu_;
  std::vector<RingEntry*> done_;  // handed back by helpers
};

void RingWorker::Dispatch(RingEntry& e) {
  const fuse_in_header in = e.in();
  const uint64_t bytes = in.opcode == FUSE_READ    ? e.op_in<fuse_read_in>().size
                         : in.opcode == FUSE_WRITE ? e.payload_in_bytes()
                                                   : 0;
  request_bytes_avg_ = (request_bytes_avg_ * 7 + bytes) / 8;
  if (in.opcode == FUSE_READ && StartRead(e)) return;
  if (in.opcode == FUSE_WRITE) {
    const bool alone = WriteAlone(bytes);
    flush_ahead_ = ctx_.NoteWrite(alone);
    if (!alone && StartWrite(e)) return;
  }
  Slow(e);
}

// Context::NoteWrite() said so: the write's reply goes out, then the flush.
void RingWorker::FlushAhead() {
  flush_ahead_ = false;
  if (busy_ != 0) return;   // the write's reply is not out yet, or others wait
  io_uring_submit(&ring_);  // the replies first
  ctx_.FlushAhead();
}

bool RingWorker::StartRead(RingEntry& e) {
  const auto r = e.op_in<fuse_read_in>();
  ServedDisk& disk = *ctx_.disk;
  const uint64_t disk_size = disk.size_bytes();
  if (r.offset >= disk_size || r.size == 0) return false;  // OnRead replies
  const uint64_t n = std::min<uint64_t>(r.size, disk_size - r.offset);
  if (n > e.payload_bytes()) return false;
  if (!disk.PlanRead(r.offset, {e.payload(), n}, &e.plan)) return false;
  e.is_write = false;
  e.reply_bytes = static_cast<uint32_t>(n);
  Submit(e);
  return true;
}

// A small write that is all the queue has to do goes the synchronous
// way, on this thread (Slow() runs it here when nothing else of the
// thread's is in flight). The host's direct-I/O path completes an
// asynchronous write through a workqueue (iomap's completion work): a
// kernel thread woken, then this one through io_uring's task work. A
// pwrite's completion wakes the writer itself, one hop fewer, and at depth
// 1 (a write, then the fsync that waits for it) every hop is latency.
// Measured with fio through ext4, 4 KiB writes with an fsync after each
// (tools/bench/README.md, session 10): faster in 24 of 32 alternated
// rounds, median +4%. With more in flight the asynchronous path, which
// keeps the thread free for the others, is kept.
bool RingWorker::WriteAlone(uint64_t bytes) const {
  return busy_ == 1 && bytes <= kAloneWriteBytes &&
         ctx_.ring_busy[qid_].load(std::memory_order_relaxed) <= 1;
}

bool RingWorker::StartWrite(RingEntry& e) {
  const auto w = e.op_in<fuse_write_in>();
  ServedDisk& disk = *ctx_.disk;
  const uint64_t disk_size = disk.size_bytes();
  if (w.size == 0 || e.payload_in_bytes() != w.size || w.offset > disk_size ||
      w.size > disk_size - w.offset) {
    return false;  // OnWrite replies
  }
  // Direct from the entry's buffer, whatever the size: unlike a worker
  // blocked in a pwrite (OnWrite), the queue's thread goes on with other
  // requests meanwhile, and the host's page cache would only add a copy
  // (io_uring hands buffered writes to ext4 through worker threads, one
  // file's writes one at a time: 46-63k random 4 KiB writes per second
  // against 59-62k direct, measured).
  const auto caching = ServedDisk::Caching::kDirectWhenAligned;
  if (!disk.PlanWrite(w.offset, {e.payload(), w.size}, caching, &e.plan)) return false;
  e.is_write = true;
  e.reply_bytes = w.size;
  Submit(e);
  return true;
}

void RingWorker::Submit(RingEntry& e) {
  ctx_.ring_async_requests.fetch_add(1, std::memory_order_relaxed);
  e.pending = 0;
  e.io_failed = false;
  e.io_expected = 0;
  e.io_done = 0;
  for (const ServedDisk::IoPiece& p : e.plan.pieces()) {
    std::byte* at = e.payload() + p.buffer_offset;
    if (p.fd < 0) {
      std::memset(at, 0, p.length);
      continue;
    }
    io_uring_sqe* sqe = Sqe();
    if (sqe == nullptr) {
      e.io_failed = true;  // done the synchronous way once the rest is back
      break;
    }
    if (e.is_write) {
      io_uring_prep_write(sqe, p.fd, at, static_cast<unsigned>(p.length), p.file_offset);
    } else {
      io_uring_prep_read(sqe, p.fd, at, static_cast<unsigned>(p.length), p.file_offset);
    }
    io_uring_sqe_set_data64(sqe, reinterpret_cast<uint64_t>(&e) | kTagIo);
    ++e.pending;
    e.io_expected += p.length;
  }
  if (e.pending == 0) OnPieceDone(e, 0);
}

void RingWorker::OnPieceDone(RingEntry& e, int res) {
  if (e.pending > 0) {
    if (res < 0) {
      e.io_failed = true;
    } else {
      e.io_done += static_cast<uint64_t>(res);
    }
    if (--e.pending > 0) return;
  }
  const bool ok = !e.io_failed && e.io_done == e.io_expected;
  ctx_.disk->Finish(&e.plan, ok);
  if (!ok) {
    // An error or a short transfer: the whole request again, the
    // synchronous way, which finishes it or reports the error.
    Slow(e);
    return;
  }
  if (e.is_write) {
    fuse_write_out out = {};
    out.size = e.reply_bytes;
    std::memcpy(e.payload(), &out, sizeof out);
    e.ReplyOk(sizeof out);
  } else {
    e.ReplyOk(e.reply_bytes);
  }
  Commit(e);
}

void RingWorker::Slow(RingEntry& e) {
  if (busy_ == 1) {  // nothing else of this thread's in flight: no need to wait
    e.HandleSync(se_);
    Commit(e);
    return;
  }
  helpers_.Post([this, &e] {
    e.HandleSync(se_);
    HandBack(&e);
  });
}

void RingWorker::Commit(RingEntry& e) {
  --busy_;
  ctx_.ring_busy[qid_].fetch_sub(1, std::memory_order_relaxed);
  QueueCmd(e, fuse_uring::kCmdCommitAndFetch);
}

// An entry of queue `qid` stopped serving while the connection goes on
// (the kernel refused it, or its ring failed). Once INIT has
// agreed to the ring, Linux (6.18) does not fall back to /dev/fuse: it
// holds every request until each queue has an entry, so a queue left
// without any would stall the disk (seen with PLOOP_FAULT_FUSE_RING_REFUSE).
// The last entry of a queue gone, the connection is ended instead (a
// forced unmount of the FUSE file aborts it, even while the loop device
// holds it open): requests then fail, the daemon's loop ends, and the mount
// fails or the disk reports I/O errors, with this in the log -- never a
// hang.
void RingEntryGone(Context& ctx, fuse_session* se, unsigned qid) {
  if (ctx.ring_entries[qid].fetch_sub(1) != 1 || fuse_session_exited(se)) return;
  LogError("FUSE over io_uring: queue " + std::to_string(qid) +
           " has no ring entry left; ending the FUSE connection so that the disk's requests "
           "fail instead of waiting");
  if (::umount2(ctx.options.mountpoint.c_str(), MNT_FORCE) != 0 && errno != EBUSY) {
    LogError("FUSE over io_uring: force unmount of " + ctx.options.mountpoint + ": " +
             std::strerror(errno));
  }
  fuse_session_exit(se);
}

// One ring worker: prepares, waits for INIT to decide, serves.
void ServeRing(Context& ctx, fuse_session* se, unsigned qid, unsigned entries,
               std::byte* buffer_base, RingHelpers& helpers) {
  RingWorker worker(ctx, qid, helpers);
  std::string why;
  const bool ok = worker.Prepare(entries, kMaxRequestBytes, buffer_base, &why);
  std::unique_lock lock(ctx.run_mu);
  ++(ok ? ctx.rings_prepared : ctx.rings_failed);
  if (!ok && ctx.rings_failed == 1) LogError("FUSE over io_uring: " + why);
  ctx.run_cv.notify_all();
  ctx.run_cv.wait(lock, [&] { return ctx.ring_state != Context::RingState::kPreparing; });
  const bool go = ok && ctx.ring_state == Context::RingState::kGo;
  lock.unlock();
  if (go) {
    for (unsigned lost = worker.Serve(se); lost > 0; --lost) RingEntryGone(ctx, se, qid);
  }
  lock.lock();
  --ctx.rings_running;
  ctx.run_cv.notify_all();
}

// The INIT reply, when the ring may be used: asks for FUSE_OVER_IO_URING if
// the kernel offered it and every ring worker is ready, then lets them
// register (or go).
ssize_t ReplyInit(Context& ctx, int fd, iovec* iov, int count) {
  ctx.init_unique.store(0);
  std::string why;
  fuse_init_out out = {};
  iovec patched[2];
  {
    std::unique_lock lock(ctx.run_mu);
    ctx.run_cv.wait_for(lock, std::chrono::seconds(10), [&] {
      return ctx.rings_prepared + ctx.rings_failed == ctx.rings_total || ctx.exit_requested;
    });
    const auto* header = static_cast<const fuse_out_header*>(iov[0].iov_base);
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    if (!ctx.init_offers_uring.load()) {
      why = "the kernel did not offer it in INIT";
    } else if (ctx.rings_total == 0 || ctx.rings_prepared != ctx.rings_total) {
      why = "the rings could not be set up";
    } else if (count != 2 || header->error != 0 ||
               iov[1].iov_len < offsetof(fuse_init_out, flags2) + sizeof out.flags2 ||
               iov[1].iov_len > sizeof out) {
      why = "unexpected INIT reply";
    } else {
      std::memcpy(&out, iov[1].iov_base, iov[1].iov_len);
      // The kernel's payload size: max(8 KiB, max_write, max_pages pages).
      const size_t need = std::max<size_t>({8192, out.max_write, size_t{out.max_pages} * page});
      if (need > kMaxRequestBytes) {
        why = "requests larger than the ring buffers";
      } else {
        out.flags |= FUSE_INIT_EXT;
        out.flags2 |= fuse_uring::kInitFlags2OverIoUring;
        patched[0] = iov[0];
        patched[1] = {&out, iov[1].iov_len};
      }
    }
  }
  const bool use = why.empty();
  ssize_t res = use ? ::writev(fd, patched, 2) : ::writev(fd, iov, count);
  const int err = errno;
  {
    std::lock_guard lock(ctx.run_mu);
    ctx.ring_state = use && res >= 0 ? Context::RingState::kGo : Context::RingState::kStop;
    ctx.ring_in_use.store(use && res >= 0);
    ctx.run_cv.notify_all();
    if (use && res >= 0) {
      LogInfo("FUSE over io_uring: " + std::to_string(ctx.ring_queues) + " queues of " +
              std::to_string(ctx.ring_queue_entries) + " entries, each served by " +
              std::to_string(ctx.ring_threads_per_queue) + " threads");
    } else if (!use) {
      LogInfo("FUSE over io_uring not used (" + why + "): classic /dev/fuse workers");
    }
  }
  errno = err;
  return res;
}

// libfuse's custom I/O (fuse_session_custom_io), installed when the ring
// may be used: reads note the INIT request; writes put a ring request's
// reply into its entry and patch the INIT reply.
ssize_t ReadHook(int fd, void* buf, size_t len, void* userdata) {
  Context& ctx = *static_cast<Context*>(userdata);
  const ssize_t n = ::read(fd, buf, len);
  if (n >= static_cast<ssize_t>(sizeof(fuse_in_header))) {
    fuse_in_header in;
    std::memcpy(&in, buf, sizeof in);
    if (in.opcode == FUSE_INIT) {
      fuse_init_in init = {};
      std::memcpy(&init, static_cast<const char*>(buf) + sizeof in,
                  std::min(sizeof init, static_cast<size_t>(n) - sizeof in));
      ctx.init_offers_uring.store((init.flags & FUSE_INIT_EXT) != 0 &&
                                  (init.flags2 & fuse_uring::kInitFlags2OverIoUring) != 0);
      ctx.init_unique.store(in.unique);
    }
  }
  return n;
}

ssize_t WritevHook(int fd, iovec* iov, int count, void* userdata) {
  Context& ctx = *static_cast<Context*>(userdata);
  if (count >= 1 && iov[0].iov_len >= sizeof(fuse_out_header)) {
    fuse_out_header out;
    std::memcpy(&out, iov[0].iov_base, sizeof out);
    if (t_ring != nullptr && t_ring->Owns(out)) return t_ring->TakeReply(iov, count);
    if (out.unique != 0 && out.unique == ctx.init_unique.load()) {
      return ReplyInit(ctx, fd, iov, count);
    }
  }
  return ::writev(fd, iov, count);
}

// Lets the kernel use FUSE over io_uring (its module parameter), as the
// daemon was told to. False, with a log line, where the kernel has none.
bool EnableKernelUring() {
  const std::string path = "/sys/module/fuse/parameters/enable_uring";
  std::ifstream in(path);
  std::string value;
  if (!in || !(in >> value)) {
    LogInfo("FUSE over io_uring: this kernel has none (no " + path +
            "): classic /dev/fuse workers");
    return false;
  }
  if (value == "Y" || value == "1") return true;
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  const bool written = fd >= 0 && ::write(fd, "Y", 1) == 1;
  const int err = errno;
  if (fd >= 0) ::close(fd);
  if (!written) {
    LogInfo("FUSE over io_uring: cannot enable it (" + path + ": " + std::strerror(err) +
            "): classic /dev/fuse workers");
    return false;
  }
  LogInfo("FUSE over io_uring: enabled in the kernel (" + path + " = Y)");
  return true;
}

// The kernel's queue count: num_possible_cpus().
unsigned PossibleCpus() {
  std::ifstream in("/sys/devices/system/cpu/possible");
  std::string list;
  unsigned count = 0;
  if (in >> list) {
    size_t at = 0;
    while (at < list.size()) {
      size_t end = list.find(',', at);
      if (end == std::string::npos) end = list.size();
      const std::string range = list.substr(at, end - at);
      const size_t dash = range.find('-');
      const unsigned first = static_cast<unsigned>(std::strtoul(range.c_str(), nullptr, 10));
      const unsigned last =
          dash == std::string::npos
              ? first
              : static_cast<unsigned>(std::strtoul(range.c_str() + dash + 1, nullptr, 10));
      count += last >= first ? last - first + 1 : 0;
      at = end + 1;
    }
  }
  return count > 0 ? count : static_cast<unsigned>(std::max(1L, ::sysconf(_SC_NPROCESSORS_CONF)));
}

}  // namespace

unsigned RingEntriesPerQueue(unsigned threads, unsigned queues) {
  queues = std::max(1u, queues);
  if (2 * queues > threads) return 1;
  return (threads + queues - 1) / queues;
}

Status FuseServer::Run() {
  // Exit() and a worker that ends interrupt the others' reads of /dev/fuse
  // with SIGUSR1 (a handler without SA_RESTART: the read fails with EINTR
  // and the worker sees that the session has exited).
  struct sigaction sa = {};
  sa.sa_handler = NoOpSignal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGUSR1, &sa, nullptr);
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  ::pthread_sigmask(SIG_UNBLOCK, &usr1, nullptr);  // the workers inherit it
  // A fixed set of workers, each with its own buffer, rather than
  // libfuse's loop: that one starts and ends threads with the load and
  // takes a shared lock twice per request, and reads requests into buffers
  // that leave a write's data 80 bytes into a page (an aligned copy before
  // every direct write).
  const unsigned n = std::max(1u, ctx_->options.max_threads);
  IoMemory buffers = AllocateIoMemory(size_t{n} * ReceiveBuffer::Bytes());
  if (buffers == nullptr) return Status::FromErrno(ENOMEM, "buffers for the FUSE workers");
  IoMemory ring_buffers;  // the ring entries', likewise
  RingHelpers helpers;    // stopped (in its destructor) after the workers end
  std::vector<std::thread> threads;
  unsigned classic = 0;                       // classic workers started
  auto start_classic = [&](unsigned count) {  // under run_mu
    ctx_->workers_running += count;
    for (unsigned i = 0; i < count; ++i) {
      threads.emplace_back(ServeRequests, std::ref(*ctx_), session_,
                           buffers.get() + size_t{classic + i} * ReceiveBuffer::Bytes());
      ctx_->workers.push_back(threads.back().native_handle());
    }
    classic += count;
    ctx_->classic_workers.store(classic);
  };
  {
    std::lock_guard lock(ctx_->run_mu);
    if (ctx_->exit_requested) return Status::Ok();
    // The ring workers first: they prepare their rings while the first
    // classic worker reads INIT, whose reply waits for them. Every queue
    // needs entries; the worker count is spread over the queues.
    if (ctx_->uring) {
      const unsigned queues = PossibleCpus();
      const unsigned per_queue = RingEntriesPerQueue(n, queues);
      const size_t entry_bytes = RingEntry::BufferBytes(kMaxRequestBytes);
      ring_buffers = AllocateIoMemory(size_t{queues} * per_queue * entry_bytes);
      if (ring_buffers == nullptr) return Status::FromErrno(ENOMEM, "buffers for the ring entries");
      ctx_->ring_queues = queues;
      ctx_->ring_queue_entries = per_queue;
      ctx_->ring_entries = std::make_unique<std::atomic<unsigned>[]>(queues);
      for (unsigned q = 0; q < queues; ++q) ctx_->ring_entries[q].store(per_queue);
      ctx_->ring_busy = std::make_unique<std::atomic<unsigned>[]>(queues);
      for (unsigned q = 0; q < queues; ++q) ctx_->ring_busy[q].store(0);
      // Each queue's entries are split between a few threads (see
      // kRingEntriesPerThread).
      const unsigned per_thread = std::min(kRingEntriesPerThread, per_queue);
      std::vector<unsigned> split;  // entries of each thread of a queue
      for (unsigned left = per_queue; left > 0; left -= std::min(left, per_thread)) {
        split.push_back(std::min(left, per_thread));
      }
      ctx_->rings_total = queues * static_cast<unsigned>(split.size());
      ctx_->rings_running = ctx_->rings_total;
      ctx_->ring_threads_per_queue = static_cast<unsigned>(split.size());
      // As many helpers as entries: a burst of allocating writes keeps its
      // depth.
      helpers.Start(queues * per_queue);
      for (unsigned q = 0; q < queues; ++q) {
        std::byte* base = ring_buffers.get() + size_t{q} * per_queue * entry_bytes;
        for (unsigned entries : split) {
          threads.emplace_back(ServeRing, std::ref(*ctx_), session_, q, entries, base,
                               std::ref(helpers));
          ctx_->workers.push_back(threads.back().native_handle());
          base += size_t{entries} * entry_bytes;
        }
      }
    }
    // Beside the ring, the classic workers only serve what does not go
    // over it (INIT, requests before the rings are registered, forgets and
    // interrupts): a couple do. The full set starts if INIT ends without
    // the ring.
    start_classic(ctx_->uring ? std::min(n, kClassicBesideRing) : n);
  }
  {
    std::unique_lock lock(ctx_->run_mu);
    if (ctx_->uring) {
      ctx_->run_cv.wait(lock, [&] {
        return ctx_->exit_requested || ctx_->workers_running < classic ||
               ctx_->ring_state != Context::RingState::kPreparing;
      });
      if (ctx_->ring_state == Context::RingState::kStop && !ctx_->exit_requested &&
          ctx_->workers_running == classic) {
        start_classic(n - classic);
      }
    }
    ctx_->run_cv.wait(lock,
                      [&] { return ctx_->exit_requested || ctx_->workers_running < classic; });
    fuse_session_exit(session_);
    if (ctx_->ring_state == Context::RingState::kPreparing) {
      ctx_->ring_state = Context::RingState::kStop;
      ctx_->run_cv.notify_all();
    }
    // A signal can land just before a worker blocks in read() (or in
    // io_uring_enter): repeat it until every worker has left its loop.
    while (ctx_->workers_running > 0 || ctx_->rings_running > 0) {
      for (pthread_t t : ctx_->workers) ::pthread_kill(t, SIGUSR1);
      ctx_->run_cv.wait_for(lock, std::chrono::milliseconds(20),
                            [&] { return ctx_->workers_running == 0 && ctx_->rings_running == 0; });
    }
    ctx_->workers.clear();
  }
  for (std::thread& t : threads) t.join();
  return Status::Ok();
}

void FuseServer::Exit() {
  fuse_session_exit(session_);
  std::lock_guard lock(ctx_->run_mu);
  ctx_->exit_requested = true;
  ctx_->run_cv.notify_all();
}

bool FuseServer::UsesIoUring() const { return ctx_->ring_in_use.load(); }

unsigned FuseServer::ClassicWorkers() const { return ctx_->classic_workers.load(); }

uint64_t FuseServer::RingRequests() const { return ctx_->ring_requests.load(); }

uint64_t FuseServer::RingAsyncRequests() const { return ctx_->ring_async_requests.load(); }
uint64_t FuseServer::FlushesAhead() const { return ctx_->flushes_ahead.load(); }

Status FuseServer::InvalidateSize() {
  // A negative offset invalidates the attributes only (no page cache here).
  int rc = fuse_lowlevel_notify_inval_inode(session_, FUSE_ROOT_ID, -1, 0);
  if (rc != 0 && rc != -ENOENT) return Status::FromErrno(-rc, "invalidate the disk file's size");
  return Status::Ok();
}

void FuseServer::Unmount() {
  if (!mounted_) return;
  fuse_session_unmount(session_);
  // libfuse leaves a mount whose connection was aborted (its /dev/fuse
  // polls POLLERR; see RingEntryGone) in place, failing every access with
  // ENOTCONN: detach it here (EINVAL when libfuse did unmount it).
  ::umount2(ctx_->options.mountpoint.c_str(), MNT_DETACH);
  mounted_ = false;
}

}  // namespace ploop::mount
