#include "mount-helper/filesystem_ops.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <mutex>

#include "mount-helper/child_process.h"
#include "ploop/raw_image.h"

namespace ploop::mount {

namespace {

constexpr unsigned long kExt4SuperMagic = 0xEF53;
// <linux/ext4.h> is not a uapi header on every distribution.
#ifndef EXT4_IOC_RESIZE_FS
#define EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t)
#endif

}  // namespace

Result<std::unique_ptr<FrozenFilesystems>> FrozenFilesystems::Freeze(
    const std::vector<std::string>& dirs) {
  std::unique_ptr<FrozenFilesystems> out(new FrozenFilesystems());
  std::vector<std::pair<std::string, int>> opened;
  auto close_opened = [&] {
    for (auto& [dir, fd] : opened) ::close(fd);
  };
  for (const std::string& dir : dirs) {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      close_opened();
      return Status::FromErrno(err, "open " + dir);
    }
    opened.emplace_back(dir, fd);
    // Most dirty data goes out before the freeze, while writers still run,
    // so the freeze itself (and the pause it makes) is short.
    ::syncfs(fd);
  }
  out->started_ = std::chrono::steady_clock::now();
  for (size_t i = 0; i < opened.size(); ++i) {
    auto [dir, fd] = opened[i];
    if (::ioctl(fd, FIFREEZE, 0) != 0) {
      int err = errno;
      for (size_t j = i; j < opened.size(); ++j) ::close(opened[j].second);
      if (err == EOPNOTSUPP)
        return Status::NotSupported("the file system at " + dir + " cannot be frozen");
      return Status::FromErrno(err, "freeze " + dir);
    }
    out->frozen_.emplace_back(dir, fd);
  }
  return out;
}

FrozenFilesystems::~FrozenFilesystems() { Thaw().IgnoreError(); }

Status FrozenFilesystems::Thaw() {
  Status first = Status::Ok();
  for (auto it = frozen_.rbegin(); it != frozen_.rend(); ++it) {
    if (::ioctl(it->second, FITHAW, 0) != 0 && errno != EINVAL && first.ok()) {
      first = Status::FromErrno(errno, "thaw " + it->first);
    }
    ::close(it->second);
  }
  frozen_.clear();
  return first;
}

Result<std::unique_ptr<Image>> OpenDeviceForReading(const std::string& device) {
  OpenOptions o;
  o.raw = true;
  o.lock = false;
  ASSIGN_OR_RETURN(auto image, RawImage::Open(DefaultFileSystem(), device, o));
  return std::unique_ptr<Image>(std::move(image));
}

Result<uint64_t> GrowExt4Online(const std::string& dir, uint64_t device_bytes) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + dir);
  struct statfs st = {};
  if (::fstatfs(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(err, "statfs " + dir);
  }
  if (static_cast<unsigned long>(st.f_type) != kExt4SuperMagic) {
    ::close(fd);
    return Status::NotSupported("the file system at " + dir + " is not ext4");
  }
  const uint64_t block_bytes = static_cast<uint64_t>(st.f_bsize);
  uint64_t blocks = device_bytes / block_bytes;
  if (::ioctl(fd, EXT4_IOC_RESIZE_FS, &blocks) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(err, "grow the ext4 file system at " + dir);
  }
  ::close(fd);
  return blocks * block_bytes;
}

namespace {

// Runs argv; returns how it ended and its last stderr/stdout line.
Result<std::pair<ChildExit, std::string>> RunTool(const std::vector<std::string>& argv) {
  SpawnOptions o;
  o.argv = argv;
  o.capture_stdout = true;
  auto last = std::make_shared<std::string>();
  auto mu = std::make_shared<std::mutex>();
  ASSIGN_OR_RETURN_CTX(
      auto child,
      ChildProcess::Spawn(o,
                          [last, mu](ChildStream, std::string_view line) {
                            if (line.find_first_not_of(" \t") == std::string_view::npos) {
                              return;
                            }
                            std::lock_guard lock(*mu);
                            *last = std::string(line);
                          }),
      argv[0]);
  ChildExit exit = child->Wait();
  std::lock_guard lock(*mu);
  return std::make_pair(exit, *last);
}

}  // namespace

Status GrowExt4OnDevice(const std::string& device) {
  ASSIGN_OR_RETURN(auto fsck, RunTool({"e2fsck", "-f", "-p", device}));
  // 0: clean; 1: errors corrected. Anything else needs a person.
  if (fsck.first.signaled || fsck.first.code > 1) {
    return Status::FailedPrecondition("e2fsck -f -p " + device + " " + fsck.first.Describe() +
                                      ": " + fsck.second);
  }
  ASSIGN_OR_RETURN(auto resize, RunTool({"resize2fs", device}));
  if (!resize.first.ok()) {
    return Status::FromErrno(
        EIO, "resize2fs " + device + " " + resize.first.Describe() + ": " + resize.second);
  }
  return Status::Ok();
}

}  // namespace ploop::mount
