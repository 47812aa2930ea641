#include "mount-helper/loop_device.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

namespace ploop::mount {

namespace {

// Closes a descriptor on scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

std::string ReadSys(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

}  // namespace

std::optional<std::string> LoopName(const std::string& device) {
  const std::string prefix = "/dev/loop";
  if (device.compare(0, prefix.size(), prefix) != 0 || device.size() == prefix.size()) {
    return std::nullopt;
  }
  for (size_t i = prefix.size(); i < device.size(); ++i) {
    if (device[i] < '0' || device[i] > '9') return std::nullopt;
  }
  return device.substr(5);
}

Result<dev_t> DeviceNumber(const std::string& device) {
  struct stat st;
  if (::stat(device.c_str(), &st) != 0) return Status::FromErrno(errno, "stat " + device);
  if (!S_ISBLK(st.st_mode)) return Status::InvalidArgument(device + " is not a block device");
  return st.st_rdev;
}

Result<std::string> AttachLoop(const LoopConfig& config) {
  Fd control(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (control.fd < 0) {
    if (errno == ENOENT) return Status::NotSupported("no loop devices (/dev/loop-control)");
    return Status::FromErrno(errno, "open /dev/loop-control");
  }
  struct loop_config lc = {};
  lc.fd = static_cast<uint32_t>(config.backing_fd);
  lc.block_size = 0;  // the kernel picks it (and may use direct I/O with it)
  lc.info.lo_offset = config.offset_bytes;
  lc.info.lo_sizelimit = config.size_bytes;
  lc.info.lo_flags = (config.read_only ? LO_FLAGS_READ_ONLY : 0) |
                     (config.direct_io ? LO_FLAGS_DIRECT_IO : 0) |
                     (config.autoclear ? LO_FLAGS_AUTOCLEAR : 0);
  std::strncpy(reinterpret_cast<char*>(lc.info.lo_file_name), config.name.c_str(),
               LO_NAME_SIZE - 1);
  // Another program may grab the free device between GET_FREE and
  // CONFIGURE (EBUSY): ask again.
  for (int attempt = 0; attempt < 64; ++attempt) {
    int n = ::ioctl(control.fd, LOOP_CTL_GET_FREE);
    if (n < 0) return Status::FromErrno(errno, "find a free loop device");
    std::string device = "/dev/loop" + std::to_string(n);
    int fd = -1;
    for (int wait = 0; wait < 100; ++wait) {
      fd = ::open(device.c_str(), (config.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
      if (fd >= 0 || errno != ENOENT) break;
      // udev may not have made the node of a new device yet.
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (fd < 0) return Status::FromErrno(errno, "open " + device);
    Fd dev(fd);
    if (::ioctl(dev.fd, LOOP_CONFIGURE, &lc) == 0) return device;
    if (errno != EBUSY) return Status::FromErrno(errno, "attach " + device);
  }
  return Status::Busy("every free loop device was taken by another program first");
}

Status DetachLoop(const std::string& device) {
  Fd dev(::open(device.c_str(), O_RDONLY | O_CLOEXEC));
  if (dev.fd < 0) return Status::FromErrno(errno, "open " + device);
  if (::ioctl(dev.fd, LOOP_CLR_FD, 0) != 0) {
    if (errno == ENXIO) return Status::NotFound(device + " has no file attached");
    return Status::FromErrno(errno, "detach " + device);
  }
  return Status::Ok();
}

Status SetAutoclear(const std::string& device) {
  Fd dev(::open(device.c_str(), O_RDONLY | O_CLOEXEC));
  if (dev.fd < 0) return Status::FromErrno(errno, "open " + device);
  struct loop_info64 info = {};
  if (::ioctl(dev.fd, LOOP_GET_STATUS64, &info) != 0) {
    return Status::FromErrno(errno, "read the state of " + device);
  }
  info.lo_flags |= LO_FLAGS_AUTOCLEAR;
  if (::ioctl(dev.fd, LOOP_SET_STATUS64, &info) != 0) {
    return Status::FromErrno(errno, "set autoclear on " + device);
  }
  return Status::Ok();
}

Status RefreshLoopCapacity(const std::string& device) {
  Fd dev(::open(device.c_str(), O_RDONLY | O_CLOEXEC));
  if (dev.fd < 0) return Status::FromErrno(errno, "open " + device);
  if (::ioctl(dev.fd, LOOP_SET_CAPACITY, 0) != 0) {
    return Status::FromErrno(errno, "set the capacity of " + device);
  }
  return Status::Ok();
}

Result<LoopState> QueryLoop(const std::string& device) {
  auto name = LoopName(device);
  if (!name) return Status::InvalidArgument(device + " is not a loop device");
  const std::string sys = "/sys/block/" + *name;
  LoopState st;
  std::string backing = ReadSys(sys + "/loop/backing_file");
  if (backing.empty()) return st;  // no "loop" folder: nothing attached
  st.attached = true;
  st.backing_file = backing;
  st.offset_bytes = std::strtoull(ReadSys(sys + "/loop/offset").c_str(), nullptr, 10);
  st.size_bytes = std::strtoull(ReadSys(sys + "/size").c_str(), nullptr, 10) * 512;
  st.direct_io = ReadSys(sys + "/loop/dio") == "1";
  st.autoclear = ReadSys(sys + "/loop/autoclear") == "1";
  st.read_only = ReadSys(sys + "/ro") == "1";
  return st;
}

}  // namespace ploop::mount
