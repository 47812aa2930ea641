#include "mount-helper/mounts.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "mount-helper/daemon.h"
#include "mount-helper/loop_device.h"
#include "ploop/delta.h"
#include "ploop/io/posix_file_system.h"
#include "ploop/lock.h"
#include "ploop/raw_image.h"

namespace ploop::mount {

namespace {

// Bounds for waits on the kernel and the daemon. They only keep a wedged
// system from hanging the command; nothing depends on their length.
constexpr auto kDaemonExitWait = std::chrono::seconds(120);
constexpr auto kDetachWait = std::chrono::seconds(30);
constexpr auto kPoll = std::chrono::milliseconds(10);

std::string RealPath(const std::string& path) {
  std::error_code ec;
  auto p = std::filesystem::weakly_canonical(std::filesystem::absolute(path, ec), ec);
  return ec ? path : p.string();
}

template <typename Pred>
bool WaitFor(std::chrono::steady_clock::duration limit, Pred done) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(kPoll);
  }
  return true;
}

// The image's locks are gone (the loop device dropped its file).
bool Unlocked(const std::string& image) {
  int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;
  LockRequest probe;
  probe.probe_bytes = WriterLockRequest().probe_bytes;
  const bool unlocked = LockFileDescriptor(fd, image, probe).ok();
  ::close(fd);
  return unlocked;
}

// A loop device straight on the image: the disk is bytes [offset,
// offset+size) of the file. `fd` (taken over, closed here) is a descriptor
// of the open file description the chain locked: the loop device keeps that
// description, so the locks never lapse between the chain's open and the
// device's.
Result<std::string> AttachDirect(int fd, const std::string& image, uint64_t offset, uint64_t size,
                                 bool read_only) {
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  // Held already when the caller opened the chain with locks (then this
  // changes nothing: a description never conflicts with its own locks);
  // taken here otherwise, so the device never runs unlocked.
  Status locked =
      LockFileDescriptor(fd, image, read_only ? ReaderLockRequest() : WriterLockRequest());
  if (!locked.ok()) return locked;
  LoopConfig lc;
  lc.backing_fd = fd;
  lc.offset_bytes = offset;
  lc.size_bytes = size;
  lc.read_only = read_only;
  lc.direct_io = true;
  lc.name = image;
  return AttachLoop(lc);
}

struct Direct {
  bool ok = false;
  uint64_t offset = 0;
  uint64_t size = 0;
  BlockFile* file = nullptr;  // the image file (the chain's)
};

// Whether the chain can go straight onto a loop device.
Direct DirectLayout(Chain& chain) {
  Direct d;
  if (chain.depth() != 1) return d;
  if (const char* force = std::getenv("PLOOP_MOUNT_FORCE_DAEMON"); force && *force == '1') return d;
  Image& image = chain.layer(0);
  if (auto* raw = dynamic_cast<RawImage*>(&image); raw != nullptr) {
    d.ok = true;
    d.size = image.size_bytes();
    d.file = &raw->file();
    return d;
  }
  auto* delta = dynamic_cast<Delta*>(&image);
  if (delta == nullptr || image.kind() != ImageKind::kPreallocated) return d;
  // A format extension (changed-block bitmap) must be dropped before the
  // first write, which only the daemon's path does.
  if (delta->header().ext_offset_sectors != 0 && image.writable()) return d;
  d.ok = true;
  d.offset = delta->header().first_block_bytes();
  d.size = image.size_bytes();
  d.file = &delta->file();
  return d;
}

struct Flag {
  const char* name;
  unsigned long set;
  unsigned long clear;
};

constexpr Flag kFlags[] = {
    {"ro", MS_RDONLY, 0},
    {"rw", 0, MS_RDONLY},
    {"nosuid", MS_NOSUID, 0},
    {"suid", 0, MS_NOSUID},
    {"nodev", MS_NODEV, 0},
    {"dev", 0, MS_NODEV},
    {"noexec", MS_NOEXEC, 0},
    {"exec", 0, MS_NOEXEC},
    {"sync", MS_SYNCHRONOUS, 0},
    {"async", 0, MS_SYNCHRONOUS},
    {"dirsync", MS_DIRSYNC, 0},
    {"noatime", MS_NOATIME, 0},
    {"atime", 0, MS_NOATIME},
    {"nodiratime", MS_NODIRATIME, 0},
    {"diratime", 0, MS_NODIRATIME},
    {"relatime", MS_RELATIME, 0},
    {"norelatime", 0, MS_RELATIME},
    {"strictatime", MS_STRICTATIME, 0},
    {"lazytime", MS_LAZYTIME, 0},
    {"nolazytime", 0, MS_LAZYTIME},
    {"silent", MS_SILENT, 0},
    {"loud", 0, MS_SILENT},
    {"defaults", 0, 0},
    {"auto", 0, 0},
    {"noauto", 0, 0},
    {"nofail", 0, 0},
    {"_netdev", 0, 0},
};

std::vector<MountRecord> Matching(const std::function<bool(const MountRecord&)>& pred) {
  std::vector<MountRecord> out;
  for (auto& r : ReadRecords()) {
    if (pred(r)) out.push_back(std::move(r));
  }
  return out;
}

double ProcCpu(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return 0;
  size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::vector<std::string> f;
  std::string x;
  while (rest >> x) f.push_back(x);
  if (f.size() < 13) return 0;
  // utime, stime: fields 14 and 15 (f[11], f[12]).
  return (std::strtod(f[11].c_str(), nullptr) + std::strtod(f[12].c_str(), nullptr)) /
         static_cast<double>(::sysconf(_SC_CLK_TCK));
}

}  // namespace

Status MountFilesystem(const std::string& device, const std::string& dir, const std::string& type,
                       const std::string& options, bool read_only) {
  unsigned long flags = read_only ? MS_RDONLY : 0;
  std::string data;
  std::stringstream in(options);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    auto f = std::find_if(std::begin(kFlags), std::end(kFlags),
                          [&](const Flag& flag) { return item == flag.name; });
    if (f != std::end(kFlags)) {
      flags = (flags | f->set) & ~f->clear;
    } else {
      data += (data.empty() ? "" : ",") + item;
    }
  }
  if (read_only) flags |= MS_RDONLY;  // a read-only device takes nothing else
  if (::mount(device.c_str(), dir.c_str(), type.c_str(), flags,
              data.empty() ? nullptr : data.c_str()) != 0) {
    int err = errno;
    std::string why = "mount " + device + " on " + dir + " (" + type + ")";
    if (err == EINVAL) {
      return Status::InvalidArgument(why + ": invalid argument (no " + type +
                                     " file system on the disk, or a bad option)");
    }
    return Status::FromErrno(err, why);
  }
  return Status::Ok();
}

Result<Mounted> MountChain(std::unique_ptr<Chain> chain, const MountRequest& request) {
  TRY(EnsureRunDir());
  Mounted out;
  MountRecord record;
  Direct direct = DirectLayout(*chain);
  if (direct.ok) {
    const std::string image = RealPath(chain->layer(0).path());
    const bool read_only = !chain->writable();
    // The loop device gets the chain's own open file description, whose
    // image locks then outlive the chain's descriptor: closing the chain
    // writes nothing (no write happened), and at no moment is the image
    // unlocked (another process could otherwise take it in between, e.g.
    // `ploop snapshot` turning it into a read-only snapshot under a new
    // top, and we would attach the old image read-write).
    ASSIGN_OR_RETURN(int fd, direct.file->DuplicateDescriptor());
    chain.reset();
    if (request.after_release) request.after_release();
    // (Discards of a preallocated image punch holes through the loop
    // device: the range reads as zeros, its reservation is given up.)
    ASSIGN_OR_RETURN(out.device, AttachDirect(fd, image, direct.offset, direct.size, read_only));
    record.device = out.device;
    record.descriptor = request.descriptor;
    record.guid = request.guid;
    record.images = {image};
    record.read_only = read_only;
    record.kind = "direct";
    record.offset_bytes = direct.offset;
    record.created = static_cast<uint64_t>(std::time(nullptr));
    if (Status s = WriteRecord(record); !s.ok()) {
      DetachLoop(out.device).IgnoreError();
      return s;
    }
  } else {
    DaemonOptions options;
    options.descriptor = request.descriptor;
    options.guid = request.guid;
    options.threads = request.threads;
    // PLOOP_FUSE_URING=0 or =1: as --no-fuse-uring or --fuse-uring (for
    // benchmarks and tests).
    options.fuse_uring = request.fuse_uring;
    if (const char* uring = std::getenv("PLOOP_FUSE_URING"); uring != nullptr) {
      if (*uring == '0') options.fuse_uring = false;
      if (*uring == '1') options.fuse_uring = true;
    }
    options.online = request.online;
    // PLOOP_DAEMON_BUFFERED=1: the image files through the page cache (to
    // measure what direct I/O gains; see tools/bench/fio_bench.sh).
    if (const char* b = std::getenv("PLOOP_DAEMON_BUFFERED"); b != nullptr && *b == '1') {
      options.direct_io = false;
    }
    ASSIGN_OR_RETURN(DaemonInfo info, StartDaemon(std::move(chain), options));
    out.device = info.device;
    out.daemon = true;
    out.pid = info.pid;
    auto found = FindByDevice(out.device);
    if (!found.ok()) {
      // Nothing could unmount a disk without a record: let it go now (the
      // daemon exits when its device releases its file).
      const std::string file = RunDir() + "/daemons/" + std::to_string(info.pid) + "/disk";
      if (auto st = QueryLoop(out.device); st.ok() && st->attached && st->backing_file == file) {
        DetachLoop(out.device).IgnoreError();
      }
      return Status::FromErrno(EIO, "the daemon wrote no record for " + out.device);
    }
    record = found->front();
  }
  if (!request.mountpoint.empty()) {
    Status s = MountFilesystem(out.device, request.mountpoint, request.fs_type, request.fs_options,
                               request.read_only);
    if (s.ok()) s = SetAutoclear(out.device);
    if (!s.ok()) {
      Unmount(record).IgnoreError();
      return s;
    }
  }
  return out;
}

Result<std::vector<MountRecord>> FindByDevice(const std::string& device) {
  auto out = Matching([&](const MountRecord& r) { return r.device == device; });
  if (out.empty()) return Status::NotFound("no ploop disk is mounted on " + device);
  return out;
}

Result<std::vector<MountRecord>> FindByDescriptor(const std::string& descriptor) {
  const std::string real = RealPath(descriptor);
  auto out = Matching([&](const MountRecord& r) { return r.descriptor == real; });
  if (out.empty()) return Status::NotFound(descriptor + " is not mounted");
  return out;
}

Result<std::vector<MountRecord>> FindByMountpoint(const std::string& dir) {
  const std::string real = RealPath(dir);
  std::vector<MountRecord> out;
  for (const MountInfo& m : ReadMountInfo()) {
    if (m.mountpoint != real) continue;
    for (auto& r : ReadRecords()) {
      auto dev = DeviceNumber(r.device);
      if (dev.ok() && *dev == m.device) out.push_back(std::move(r));
    }
  }
  if (out.empty()) return Status::NotFound("no ploop disk is mounted on " + dir);
  return out;
}

Status Unmount(const MountRecord& r) {
  const MountHealth health = Health(r);
  const bool dead = health == MountHealth::kDaemonDead;
  if (health != MountHealth::kStale) {
    for (const std::string& mp : MountpointsOf(r.device)) {
      if (::umount2(mp.c_str(), dead ? MNT_DETACH : 0) != 0 && errno != EINVAL && errno != ENOENT) {
        if (errno == EBUSY) {
          return Status::Busy(mp + " is busy: a program uses files there");
        }
        return Status::FromErrno(errno, "unmount " + mp);
      }
    }
    Status s = DetachLoop(r.device);
    if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
  }
  if (r.kind == "fuse") {
    if (health == MountHealth::kActive) {
      if (!WaitFor(kDaemonExitWait, [&] { return !ProcessAlive(r.pid, r.pid_start); })) {
        return Status::Busy(r.device + " is still open by another program; its daemon (pid " +
                            std::to_string(r.pid) + ") stops when it is released");
      }
    }
    // What a daemon killed with SIGKILL left: its FUSE mount and folder --
    // unless its pid went to a new process, whose folder that is now.
    if (ProcessStartTime(r.pid) == 0) {
      ::umount2(r.fuse_file.c_str(), MNT_DETACH);
      ::unlink(r.fuse_file.c_str());
      ::unlink(r.socket.c_str());
      ::rmdir(r.work_dir.c_str());
    }
  } else if (health == MountHealth::kActive) {
    bool gone = WaitFor(kDetachWait, [&] {
      auto st = QueryLoop(r.device);
      return (!st.ok() || !st->attached) && Unlocked(r.top());
    });
    if (!gone) {
      return Status::Busy(r.device +
                          " is still open by another program; it is released when "
                          "that program closes it");
    }
  }
  Status removed = RemoveRecord(r);
  if (!removed.ok() && removed.code() != StatusCode::kNotFound) return removed;
  return Status::Ok();
}

void CleanUpDeadMounts(const std::string& descriptor) {
  const std::string real = RealPath(descriptor);
  for (const MountRecord& r : ReadRecords()) {
    if (r.descriptor == real && Health(r) != MountHealth::kActive) Unmount(r).IgnoreError();
  }
}

std::vector<MountListing> ListMounts() {
  std::vector<MountListing> out;
  for (MountRecord& r : ReadRecords()) {
    MountListing l;
    l.health = Health(r);
    if (l.health == MountHealth::kStale) {
      Unmount(r).IgnoreError();  // drops the record (and a dead daemon's leftovers)
      continue;
    }
    l.mountpoints = MountpointsOf(r.device);
    if (auto st = QueryLoop(r.device); st.ok()) l.direct_io = st->direct_io;
    if (r.kind == "fuse" && l.health == MountHealth::kActive) {
      l.rss_bytes = ProcStatusBytes(r.pid, "VmRSS");
      l.cpu_seconds = ProcCpu(r.pid);
    }
    l.record = std::move(r);
    out.push_back(std::move(l));
  }
  return out;
}

std::string DescribeUser(const std::string& message) {
  // Which mounted image the message is about. A path in the message is
  // delimited like a word (by spaces, colons, brackets, quotes or commas)
  // yet may hold spaces itself, so each record's images are looked for in
  // the message as whole words, absolute or relative to the current
  // folder; the message's words are also resolved as files, for other
  // spellings of a path.
  auto delimiter = [](char c) {
    return c == ' ' || c == ':' || c == '(' || c == ')' || c == '\'' || c == '"' || c == ',';
  };
  auto names = [&](const std::string& path) {
    for (size_t at = message.find(path); !path.empty() && at != std::string::npos;
         at = message.find(path, at + 1)) {
      const size_t after = at + path.size();
      if ((at == 0 || delimiter(message[at - 1])) &&
          (after == message.size() || delimiter(message[after]))) {
        return true;
      }
    }
    return false;
  };
  // An image under the current folder, as a relative path names it.
  std::error_code ec;
  std::string here = std::filesystem::current_path(ec).string();
  if (ec) here.clear();
  if (!here.empty() && here.back() != '/') here += '/';
  std::vector<std::string> named;
  std::string word;
  auto flush = [&] {
    if (!word.empty()) {
      struct stat st;
      if (::stat(word.c_str(), &st) == 0 && S_ISREG(st.st_mode)) named.push_back(RealPath(word));
    }
    word.clear();
  };
  for (char c : message) {
    if (delimiter(c)) {
      flush();
    } else {
      word += c;
    }
  }
  flush();
  auto mentioned = [&](const std::string& image) {
    return std::find(named.begin(), named.end(), image) != named.end() || names(image) ||
           (!here.empty() && image.starts_with(here) && names(image.substr(here.size())));
  };
  for (const MountRecord& r : ReadRecords()) {
    const MountHealth health = Health(r);
    if (health == MountHealth::kStale) continue;
    const bool holds = std::any_of(r.images.begin(), r.images.end(), mentioned);
    if (!holds) continue;
    std::string out = r.device;
    auto mps = MountpointsOf(r.device);
    if (!mps.empty()) out += " (mounted at " + mps.front() + ")";
    if (health == MountHealth::kDaemonDead)
      out += "; its daemon died, run 'ploop umount " + r.device + "'";
    return out;
  }
  return "";
}

}  // namespace ploop::mount
