#include "fs_test_support.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "ploop/convert.h"
#include "ploop/io/file_system.h"
#include "test_support.h"

namespace ploop::fsimage::testing {

using ::ploop::testing::TestRng;

namespace {
constexpr uint64_t kMiB = 1024 * 1024;
}  // namespace

std::string FindE2fsck() {
  std::string dirs = std::getenv("PATH") ? std::getenv("PATH") : "";
  dirs += ":/sbin:/usr/sbin";
  std::stringstream ss(dirs);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string candidate = dir + "/e2fsck";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

FsckResult RunE2fsck(const std::string& raw_path) {
  FsckResult result;
  std::string cmd = FindE2fsck() + " -fn '" + raw_path + "' 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) result.output.append(buf.data(), n);
  int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

void RequireFsckClean(Image& image, const std::string& raw_path) {
  if (FindE2fsck().empty()) ::ploop::testing::Skip("e2fsck not found (install e2fsprogs)");
  REQUIRE_OK(ExportRaw(image, DefaultFileSystem(), raw_path));
  FsckResult fsck = RunE2fsck(raw_path);
  INFO("e2fsck -fn output:\n" << fsck.output);
  CHECK(fsck.exit_code == 0);
  std::remove(raw_path.c_str());
}

std::string ReadAll(Ext4Reader& reader, const std::string& path) {
  std::string out;
  REQUIRE_OK(reader.Read(path, [&](uint64_t off, std::span<const std::byte> d) {
    if (out.size() < off) out.resize(off, '\0');
    out.append(reinterpret_cast<const char*>(d.data()), d.size());
    return Status::Ok();
  }));
  return out;
}

std::string HostRead(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

HostTree MakeHostTree(const std::string& root, TestRng& rng, bool with_socket) {
  HostTree t;
  auto write = [](const std::string& path, const std::string& data) {
    std::ofstream(path, std::ios::binary) << data;
  };
  REQUIRE(::mkdir((root + "/dir").c_str(), 0750) == 0);
  REQUIRE(::mkdir((root + "/dir/sub").c_str(), 01777) == 0);
  auto random = rng.Bytes(300000);
  write(root + "/dir/data.bin",
        std::string(reinterpret_cast<const char*>(random.data()), random.size()));
  write(root + "/empty", "");
  write(root + "/setuid", "#!/bin/sh\n");
  REQUIRE(::chmod((root + "/setuid").c_str(), 04755) == 0);
  write(root + "/setgid", "g");
  REQUIRE(::chmod((root + "/setgid").c_str(), 02711) == 0);
  // Sparse: 1 MiB of data in the middle of 64 MiB.
  {
    int fd = ::open((root + "/sparse").c_str(), O_CREAT | O_WRONLY, 0600);
    REQUIRE(fd >= 0);
    std::string chunk(kMiB, 'S');
    REQUIRE(::pwrite(fd, chunk.data(), chunk.size(), 32 * kMiB) == static_cast<ssize_t>(kMiB));
    REQUIRE(::ftruncate(fd, 64 * kMiB) == 0);
    ::close(fd);
  }
  REQUIRE(::symlink("dir/data.bin", (root + "/short-link").c_str()) == 0);
  std::string long_target(200, 'x');
  long_target += "/target";
  REQUIRE(::symlink(long_target.c_str(), (root + "/long-link").c_str()) == 0);
  REQUIRE(::link((root + "/dir/data.bin").c_str(), (root + "/hard1").c_str()) == 0);
  REQUIRE(::link((root + "/dir/data.bin").c_str(), (root + "/dir/sub/hard2").c_str()) == 0);
  REQUIRE(::mkfifo((root + "/fifo").c_str(), 0640) == 0);
  {
    int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    std::string sp = root + "/sock";
    if (with_socket && sp.size() < sizeof(addr.sun_path)) {
      std::strcpy(addr.sun_path, sp.c_str());
      REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    }
    ::close(s);
  }
  t.devices = ::mknod((root + "/null").c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0 &&
              ::mknod((root + "/bigdev").c_str(), S_IFBLK | 0660, makedev(259, 70000)) == 0;
  t.user_xattrs = ::setxattr((root + "/empty").c_str(), "user.test", "value", 5, 0) == 0;
  if (t.user_xattrs) {
    std::string big(3000, 'v');  // needs an xattr block
    REQUIRE(::setxattr((root + "/dir").c_str(), "user.big", big.data(), big.size(), 0) == 0);
  }
  // security.capability: v2, cap_net_bind_service permitted+effective.
  const unsigned char cap[20] = {0x01, 0, 0, 0x02, 0x00, 0x04, 0, 0, 0, 0,
                                 0,    0, 0, 0,    0,    0,    0, 0, 0, 0};
  t.caps = ::setxattr((root + "/setuid").c_str(), "security.capability", cap, sizeof(cap), 0) == 0;
  // POSIX ACL: user::rw-, user:1234:r--, group::r--, mask::r--, other::---
  const unsigned char acl[] = {2,    0,    0,    0,    1,    0,    6,    0,    0xff, 0xff, 0xff,
                               0xff, 2,    0,    4,    0,    0xd2, 0x04, 0,    0,    4,    0,
                               4,    0,    0xff, 0xff, 0xff, 0xff, 0x10, 0,    4,    0,    0xff,
                               0xff, 0xff, 0xff, 0x20, 0,    0,    0,    0xff, 0xff, 0xff, 0xff};
  t.acls =
      ::setxattr((root + "/setgid").c_str(), "system.posix_acl_access", acl, sizeof(acl), 0) == 0;
  // Owners (root only) and timestamps with nanoseconds, some past 2038.
  if (::geteuid() == 0) {
    REQUIRE(::lchown((root + "/dir").c_str(), 1234, 5678) == 0);
    REQUIRE(::lchown((root + "/short-link").c_str(), 42, 43) == 0);
    REQUIRE(::lchown((root + "/setgid").c_str(), 65536 + 7, 70000) == 0);
  }
  struct timespec times[2] = {{1700000000, 123456789}, {1600000000, 987654321}};
  REQUIRE(::utimensat(AT_FDCWD, (root + "/empty").c_str(), times, AT_SYMLINK_NOFOLLOW) == 0);
  struct timespec far[2] = {{4102444800, 5}, {4102444800 + 99, 999999999}};  // 2100
  REQUIRE(::utimensat(AT_FDCWD, (root + "/setgid").c_str(), far, 0) == 0);
  REQUIRE(::utimensat(AT_FDCWD, (root + "/short-link").c_str(), times, AT_SYMLINK_NOFOLLOW) == 0);
  return t;
}

std::string HexOf(const std::string& bytes) {
  std::string out;
  char buf[4];
  for (unsigned char c : bytes) {
    std::snprintf(buf, sizeof(buf), "%02x", c);
    out += buf;
  }
  return out;
}

// Compares every entry of the source tree with the file system.
void CompareTree(const std::string& host_root, Ext4Reader& reader, uint32_t uid_shift,
                 uint32_t gid_shift) {
  REQUIRE_ASSIGN(auto source, OpenDirSource(host_root));
  std::map<std::string, uint32_t> inode_of;
  Entry e;
  int compared = 0;
  while (true) {
    REQUIRE_ASSIGN(bool more, source->Next(&e));
    if (!more) break;
    CAPTURE(e.path);
    REQUIRE_ASSIGN(FileInfo got, reader.Stat("/" + e.path));
    const Entry& g = got.entry;
    ++compared;
    if (e.type == EntryType::kHardLink) {
      CHECK(got.inode == inode_of.at(e.link_target));
      continue;
    }
    inode_of[e.path] = got.inode;
    CHECK(static_cast<int>(g.type) == static_cast<int>(e.type));
    CHECK(g.mode == e.mode);
    CHECK(g.uid == e.uid + uid_shift);
    CHECK(g.gid == e.gid + gid_shift);
    CHECK(g.mtime == e.mtime);
    if (e.type == EntryType::kRegular) {
      CHECK(g.size_bytes == e.size_bytes);
      CHECK(ReadAll(reader, "/" + e.path) == HostRead(host_root + "/" + e.path));
      // Holes stay holes: no more blocks than the source holds (plus
      // an extent block).
      CHECK(got.allocated_bytes <= e.data_bytes + 4096);
    }
    if (e.type == EntryType::kSymlink) CHECK(g.link_target == e.link_target);
    if (e.type == EntryType::kCharDevice || e.type == EntryType::kBlockDevice) {
      CHECK(g.dev_major == e.dev_major);
      CHECK(g.dev_minor == e.dev_minor);
    }
    CHECK(g.xattrs.size() == e.xattrs.size());
    for (size_t i = 0; i < std::min(g.xattrs.size(), e.xattrs.size()); ++i) {
      CAPTURE(g.xattrs[i].first);
      CHECK(g.xattrs[i].first == e.xattrs[i].first);
      CHECK(HexOf(g.xattrs[i].second) == HexOf(e.xattrs[i].second));
    }
  }
  CHECK(compared >= 15);
}

}  // namespace ploop::fsimage::testing
