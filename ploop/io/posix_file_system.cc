#include "ploop/io/posix_file_system.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "ploop/io/fault_file_system.h"

namespace ploop {
namespace {

std::string At(std::string_view what, const std::string& path, uint64_t offset) {
  return std::string(what) + " " + path + " at " + std::to_string(offset);
}

class PosixMapping final : public FileMapping {
 public:
  PosixMapping(void* base, size_t length, size_t skip, size_t size)
      : base_(base), length_(length), skip_(skip), size_(size) {}
  ~PosixMapping() override { ::munmap(base_, length_); }
  std::span<const std::byte> data() const override {
    return std::span<const std::byte>(static_cast<const std::byte*>(base_) + skip_, size_);
  }

 private:
  void* base_;     // page-aligned start of the mapping
  size_t length_;  // mapped bytes from base_
  size_t skip_;    // from base_ to the first byte asked for
  size_t size_;    // bytes asked for
};

class PosixFile final : public BlockFile {
 public:
  PosixFile(int fd, std::string path, bool writable)
      : fd_(fd), path_(std::move(path)), writable_(writable) {}
  ~PosixFile() override {
    ::close(fd_);
    if (direct_fd_ >= 0) ::close(direct_fd_);
  }

  Result<uint64_t> EnableDirectIo() override {
    if (direct_fd_ >= 0) return direct_align_;
    // A second open file description of the same file, with O_DIRECT. The
    // locks stay with the first one.
    std::string self = "/proc/self/fd/" + std::to_string(fd_);
    int fd = ::open(self.c_str(), (writable_ ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "open " + path_ + " for direct I/O");
    uint64_t align = 4096;
    struct statx stx = {};
    if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
        (stx.stx_mask & STATX_DIOALIGN) != 0) {
      if (stx.stx_dio_offset_align == 0) {  // the file system has no direct I/O
        ::close(fd);
        return Status::NotSupported(path_ + ": the file system has no direct I/O");
      }
      // At least a page: a direct write of some sectors of a page while a
      // buffered write dirties other sectors of it would leave the cached
      // page (with the old bytes of the direct write's sectors) to be
      // written back over them. Sub-page I/O stays buffered.
      align = std::max<uint64_t>({static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)), 512,
                                  stx.stx_dio_offset_align, stx.stx_dio_mem_align});
    }
    direct_align_ = align;
    direct_fd_ = fd;
    return align;
  }

  Status ReadAt(uint64_t offset, std::span<std::byte> out) override {
    int fd = Direct(offset, out.data(), out.size()) ? direct_fd_ : fd_;
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::pread(fd, out.data() + done, out.size() - done, offset + done);
      if (n >= 0 && static_cast<size_t>(n) < out.size() - done) fd = fd_;
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, At("read", path_, offset + done));
      }
      if (n == 0) {
        return Status::Corruption("short read of " + path_ + " at " +
                                  std::to_string(offset + done) + ": unexpected end of file");
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    return WriteVia(Direct(offset, data.data(), data.size()) ? direct_fd_ : fd_, offset, data);
  }

  Status WriteAtBuffered(uint64_t offset, std::span<const std::byte> data) override {
    return WriteVia(fd_, offset, data);
  }

  int DescriptorFor(uint64_t offset, const void* buffer, uint64_t length,
                    bool buffered) const override {
    return !buffered && Direct(offset, buffer, length) ? direct_fd_ : fd_;
  }

  Status WriteVia(int fd, uint64_t offset, std::span<const std::byte> data) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd, data.data() + done, data.size() - done, offset + done);
      if (n >= 0 && static_cast<size_t>(n) < data.size() - done) fd = fd_;
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, At("write", path_, offset + done));
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) return Status::FromErrno(errno, "fsync " + path_);
    return Status::Ok();
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + path_);
    if (S_ISBLK(st.st_mode)) {
      // A block device's st_size is 0; its end is its capacity. (The file
      // offset this moves is used by nothing: all I/O here is positional.)
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return Status::FromErrno(errno, "seek to the end of " + path_);
      return static_cast<uint64_t>(end);
    }
    return static_cast<uint64_t>(st.st_size);
  }

  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
      return Status::FromErrno(errno, "truncate " + path_ + " to " + std::to_string(size));
    }
    return Status::Ok();
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) != 0) {
      if (errno == EOPNOTSUPP) punch_supported_.store(false, std::memory_order_relaxed);
      return Status::FromErrno(errno, At("punch hole in", path_, offset));
    }
    return Status::Ok();
  }

  Status Allocate(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
      if (errno != EOPNOTSUPP) return Status::FromErrno(errno, At("allocate", path_, offset));
      // No fallocate (tmpfs on old kernels, some FUSE file systems): at least
      // extend the file so the range exists.
      ASSIGN_OR_RETURN(uint64_t size, Size());
      if (offset + length > size) return Truncate(offset + length);
    }
    return Status::Ok();
  }

  Result<std::optional<uint64_t>> NextData(uint64_t offset) override {
    off_t r = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (r < 0) {
      if (errno == ENXIO) return std::optional<uint64_t>();
      if (errno == EINVAL || errno == EOPNOTSUPP) return std::optional<uint64_t>(offset);
      return Status::FromErrno(errno, At("seek data in", path_, offset));
    }
    return std::optional<uint64_t>(static_cast<uint64_t>(r));
  }

  Result<uint64_t> NextHole(uint64_t offset) override {
    off_t r = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    if (r < 0) {
      if (errno == ENXIO) return offset;
      if (errno == EINVAL || errno == EOPNOTSUPP) return Size();
      return Status::FromErrno(errno, At("seek hole in", path_, offset));
    }
    return static_cast<uint64_t>(r);
  }

  void Prefetch(uint64_t offset, uint64_t length) override {
    // WILLNEED queues readahead for the range and returns without waiting
    // for it. Advice only: an error changes nothing a reader sees.
    (void)::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                          POSIX_FADV_WILLNEED);
  }

  Result<std::unique_ptr<FileMapping>> Map(uint64_t offset, uint64_t length) override {
    ASSIGN_OR_RETURN(uint64_t size, Size());
    if (length == 0 || offset > size || length > size - offset) {
      return Status::InvalidArgument(
          At("map " + std::to_string(length) + " bytes of", path_, offset) +
          ": not inside the file (" + std::to_string(size) + " bytes)");
    }
    static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t start = offset / page * page;
    const size_t mapped = static_cast<size_t>(offset + length - start);
    void* p = ::mmap(nullptr, mapped, PROT_READ, MAP_SHARED, fd_, static_cast<off_t>(start));
    if (p == MAP_FAILED) {
      if (errno == ENODEV) return Status::NotSupported(path_ + ": the file system cannot map it");
      return Status::FromErrno(errno, At("map", path_, offset));
    }
    // Advice only: readahead in large steps when a fault misses the cache,
    // into large folios (MADV_HUGEPAGE: readahead for a fault then reads
    // 2 MiB folios where the file system has them, and maps them with few
    // faults). Measured on the mapped sender, cold (tools/bench/README.md,
    // session 11): send|receive 1.60 s and 2.8 CPU-seconds with it, 2.02 s
    // and 3.5 CPU-seconds without.
    (void)::madvise(p, mapped, MADV_SEQUENTIAL);
    (void)::madvise(p, mapped, MADV_HUGEPAGE);
    return std::unique_ptr<FileMapping>(new PosixMapping(p, mapped, offset - start, length));
  }

  Status Lock(const LockRequest& request) override {
    return LockFileDescriptor(fd_, path_, request);
  }

  Result<int> DuplicateDescriptor() override {
    int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "duplicate the descriptor of " + path_);
    return fd;
  }

  bool CanPunchHole() const override { return punch_supported_.load(std::memory_order_relaxed); }
  const std::string& path() const override { return path_; }

 private:
  // Whether an access can go through the O_DIRECT descriptor. After a
  // short transfer the rest goes through the buffered one (its offset need
  // not be aligned any more).
  bool Direct(uint64_t offset, const void* buffer, size_t length) const {
    const uint64_t a = direct_align_;
    return direct_fd_ >= 0 && offset % a == 0 && length % a == 0 &&
           reinterpret_cast<uintptr_t>(buffer) % a == 0;
  }

  int fd_;
  std::string path_;
  bool writable_;
  int direct_fd_ = -1;
  uint64_t direct_align_ = 4096;
  std::atomic<bool> punch_supported_{true};
};

}  // namespace

Status LockFileDescriptor(int fd, const std::string& path, const LockRequest& request) {
  for (uint64_t byte : request.probe_bytes) {
    struct flock fl = {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) {
      return Status::FromErrno(errno, "probe lock on " + path);
    }
    if (fl.l_type != F_UNLCK) {
      std::string who = fl.l_pid > 0 ? " (pid " + std::to_string(fl.l_pid) + ")" : "";
      return Status::Busy(path + " is in use by another program" + who + ": lock byte " +
                          std::to_string(byte) + " is held");
    }
  }
  for (uint64_t byte : request.hold_bytes) {
    struct flock fl = {};
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    if (::fcntl(fd, F_OFD_SETLK, &fl) != 0) {
      if (errno == EAGAIN || errno == EACCES) {
        return Status::Busy(path + " is in use by another program: lock byte " +
                            std::to_string(byte) + " is held");
      }
      return Status::FromErrno(errno, "lock " + path);
    }
  }
  return Status::Ok();
}

Result<std::unique_ptr<BlockFile>> PosixFileSystem::Open(const std::string& path, OpenMode mode) {
  int flags = (mode == OpenMode::kReadOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  int fd = ::open(path.c_str(), flags);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument(path + " is a directory");
  }
  return std::unique_ptr<BlockFile>(new PosixFile(fd, path, mode == OpenMode::kReadWrite));
}

Result<std::unique_ptr<BlockFile>> PosixFileSystem::Create(const std::string& path,
                                                           bool exclusive) {
  int flags = O_RDWR | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : O_TRUNC);
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return Status::FromErrno(errno, "create " + path);
  return std::unique_ptr<BlockFile>(new PosixFile(fd, path, /*writable=*/true));
}

Status PosixFileSystem::Rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + from + " to " + to);
  }
  return Status::Ok();
}

Status PosixFileSystem::Remove(const std::string& path) {
  if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, "remove " + path);
  return Status::Ok();
}

Status PosixFileSystem::SyncDir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open directory " + dir);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Status::FromErrno(err, "fsync directory " + dir);
  return Status::Ok();
}

Result<bool> PosixFileSystem::Exists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return Status::FromErrno(errno, "stat " + path);
}

Result<uint64_t> PosixFileSystem::FreeSpace(const std::string& path) {
  struct statvfs st;
  if (::statvfs(path.c_str(), &st) != 0) return Status::FromErrno(errno, "statvfs " + path);
  return static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
}

Result<std::string> PosixFileSystem::RealPath(const std::string& path) {
  // weakly_canonical: realpath(3) of the longest existing prefix, the rest
  // appended lexically.
  std::error_code ec;
  std::filesystem::path absolute = std::filesystem::absolute(path, ec);
  if (ec) return Status::FromErrno(ec.value(), "resolve " + path);
  std::filesystem::path real = std::filesystem::weakly_canonical(absolute, ec);
  if (ec) return Status::FromErrno(ec.value(), "resolve " + path);
  return real.string();
}

Result<std::vector<std::string>> PosixFileSystem::ListDir(const std::string& dir) {
  const std::string path = dir.empty() ? "." : dir;
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return Status::FromErrno(errno, "list " + path);
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat st;
    if (::fstatat(::dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
      names.push_back(std::move(name));
    }
  }
  ::closedir(d);
  return names;
}

FileSystem& DefaultFileSystem() {
  static PosixFileSystem posix;
  static FileSystem* fs = []() -> FileSystem* {
    const char* spec = std::getenv("PLOOP_FAULT");
    if (spec == nullptr || *spec == '\0') return &posix;
    static FaultFileSystem fault(posix);
    Status s = fault.Configure(spec);
    if (!s.ok()) std::abort();  // A test asked for a fault spec we cannot parse.
    return &fault;
  }();
  return *fs;
}

}  // namespace ploop
