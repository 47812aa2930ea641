// Populate and Ext4Reader: a tree written into ext4 inside an image reads
// back equal to its source (type, mode, owner (shifted), size, bytes,
// symlink target, device numbers, xattrs, hard-link groups, mtime ns),
// holes stay holes, e2fsck -fn is clean, and bad input (overflowing ids,
// a tree larger than the disk, names too long) is refused before writing.
#include "fsimage/populate.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>

#include "fs_test_support.h"
#include "fsimage/mkfs.h"
#include "fsimage/reader.h"
#include "ploop/disk.h"
#include "ploop/io/file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop::fsimage {
namespace {

using ::ploop::testing::TempDir;
using ::ploop::testing::TestRng;

constexpr uint64_t kMiB = 1024 * 1024;

// A TreeSource from a list of entries with in-memory contents.
class VectorSource final : public TreeSource {
 public:
  explicit VectorSource(std::vector<std::pair<Entry, std::string>> entries)
      : entries_(std::move(entries)) {}
  Status Rewind() override {
    next_ = 0;
    return Status::Ok();
  }
  Result<bool> Next(Entry* entry) override {
    if (next_ >= entries_.size()) return false;
    *entry = entries_[next_++].first;
    return true;
  }
  Status ReadData(const DataFn& fn) override {
    const std::string& data = entries_[next_ - 1].second;
    if (data.empty()) return Status::Ok();
    return fn(0, std::as_bytes(std::span(data.data(), data.size())));
  }
  const std::vector<std::string>& warnings() const override { return warnings_; }

 private:
  std::vector<std::pair<Entry, std::string>> entries_;
  size_t next_ = 0;
  std::vector<std::string> warnings_;
};

Entry Dir(std::string path, uint32_t mode = 0755) {
  Entry e;
  e.path = std::move(path);
  e.type = EntryType::kDirectory;
  e.mode = mode;
  return e;
}

std::pair<Entry, std::string> File(std::string path, std::string data, uint64_t uid = 0) {
  Entry e;
  e.path = std::move(path);
  e.type = EntryType::kRegular;
  e.mode = 0644;
  e.uid = uid;
  e.size_bytes = data.size();
  e.data_bytes = data.size();
  return {e, std::move(data)};
}

std::unique_ptr<Image> FreshExt4(FileSystem& fs, const std::string& path, uint64_t size,
                                 MkfsOptions mo = {}) {
  CreateOptions o;
  o.size_bytes = size;
  auto image = CreateImage(fs, path, o);
  REQUIRE_OK(image);
  REQUIRE_OK(MakeExt4(**image, mo).status());
  return std::move(image).value();
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

TEST_SUITE_BEGIN("unit");

TEST_CASE("populate from a list - files replaced and directories merged on a second add") {
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 64 * kMiB);
  {
    VectorSource src(
        {{Dir(""), ""}, {Dir("etc"), ""}, File("etc/a", "first"), File("etc/b", "keep")});
    REQUIRE_ASSIGN(PopulateReport r, Populate(*image, src, {}));
    CHECK(r.files == 3);
  }
  {
    VectorSource src({{Dir("", 0700), ""}, {Dir("etc"), ""}, File("etc/a", "second", 7)});
    PopulateOptions po;
    po.at = "/srv/x";
    REQUIRE_ASSIGN(PopulateReport r, Populate(*image, src, po));
    VectorSource again({{Dir(""), ""}, {Dir("etc"), ""}, File("etc/a", "replaced", 9)});
    REQUIRE_OK(Populate(*image, again, {}).status());
  }
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  CHECK(ReadAll(*reader, "/etc/a") == "replaced");
  CHECK(ReadAll(*reader, "/etc/b") == "keep");
  CHECK(ReadAll(*reader, "/srv/x/etc/a") == "second");
  REQUIRE_ASSIGN(FileInfo a, reader->Stat("/etc/a"));
  CHECK(a.entry.uid == 9);
  CHECK(a.links == 1);
  REQUIRE_ASSIGN(FileInfo x, reader->Stat("/srv/x"));
  CHECK(x.entry.mode == 0700);
  REQUIRE_ASSIGN(auto root, reader->List("/"));
  std::vector<std::string> names;
  for (const auto& f : root) names.push_back(f.entry.path);
  CHECK(names == std::vector<std::string>{"etc", "lost+found", "srv"});
  CHECK(reader->Stat("/nope").error().code() == StatusCode::kNotFound);
  CHECK(reader->Read("/etc", [](uint64_t, std::span<const std::byte>) { return Status::Ok(); })
            .code() == StatusCode::kInvalidArgument);
}

TEST_CASE("uid shift - an overflowing id is refused before anything is written") {
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 32 * kMiB);
  PopulateOptions po;
  po.uid_shift = 100000;
  po.gid_shift = 200000;
  {
    VectorSource src({{Dir(""), ""}, File("ok", "x", 1000), File("big", "y", 4294967295ull - 5)});
    auto r = Populate(*image, src, po);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == StatusCode::kInvalidArgument);
    CHECK(r.error().message().find("big: owned by uid 4294967290") != std::string::npos);
    REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
    CHECK(reader->Stat("/ok").error().code() == StatusCode::kNotFound);
  }
  VectorSource src({{Dir(""), ""}, File("ok", "x", 1000)});
  REQUIRE_OK(Populate(*image, src, po).status());
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  REQUIRE_ASSIGN(FileInfo ok, reader->Stat("/ok"));
  CHECK(ok.entry.uid == 101000);
  CHECK(ok.entry.gid == 200000);
  REQUIRE_ASSIGN(FileInfo root, reader->Stat("/"));
  CHECK(root.entry.uid == 100000);
}

TEST_CASE("a tree larger than the disk fails with needs N more bytes and writes nothing") {
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 16 * kMiB);
  std::vector<std::pair<Entry, std::string>> entries{{Dir(""), ""}};
  entries.push_back(File("small", "abc"));
  auto big = File("big", "");
  big.first.size_bytes = big.first.data_bytes = 64 * kMiB;
  entries.push_back(big);
  VectorSource src(entries);
  REQUIRE_ASSIGN(ImageStats before, image->Stats());
  auto r = Populate(*image, src, {});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == StatusCode::kNoSpace);
  CHECK(r.error().message().find("needs ") != std::string::npos);
  CHECK(r.error().message().find(" more bytes") != std::string::npos);
  REQUIRE_ASSIGN(ImageStats after, image->Stats());
  CHECK(after.allocated_clusters == before.allocated_clusters);
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  CHECK(reader->Stat("/small").error().code() == StatusCode::kNotFound);
}

TEST_CASE("names longer than 255 bytes are skipped with a warning with their subtree") {
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 16 * kMiB);
  std::string long_name(256, 'n');
  VectorSource src({{Dir(""), ""},
                    {Dir(long_name), ""},
                    File(long_name + "/f", "x"),
                    File("fine", "y"),
                    File(std::string(255, 'm'), "z")});
  REQUIRE_ASSIGN(PopulateReport r, Populate(*image, src, {}));
  REQUIRE(r.warnings.size() == 1);
  CHECK(r.warnings[0].find("too long") != std::string::npos);
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  CHECK(ReadAll(*reader, "/fine") == "y");
  CHECK(ReadAll(*reader, "/" + std::string(255, 'm')) == "z");
}

TEST_CASE("a directory of 3000 files grows past one block and lists back") {
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 64 * kMiB);
  std::vector<std::pair<Entry, std::string>> entries{{Dir(""), ""}, {Dir("many"), ""}};
  for (int i = 0; i < 3000; ++i) {
    entries.push_back(File("many/file-with-a-longish-name-" + std::to_string(i), ""));
  }
  VectorSource src(entries);
  REQUIRE_OK(Populate(*image, src, {}).status());
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  REQUIRE_ASSIGN(auto list, reader->List("/many"));
  CHECK(list.size() == 3000);
  REQUIRE_ASSIGN(FileInfo f, reader->Stat("/many/file-with-a-longish-name-2999"));
  CHECK(f.entry.type == EntryType::kRegular);
}

TEST_SUITE_END();

TEST_SUITE_BEGIN("posix");

// Builds a tree with every file type and metadata kind the host allows.
struct HostTree {
  bool devices = false;
  bool user_xattrs = false;
  bool acls = false;
  bool caps = false;
};

HostTree MakeHostTree(const std::string& root, TestRng& rng) {
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
    if (sp.size() < sizeof(addr.sun_path)) {
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
  CHECK(compared > 15);
}

TEST_CASE("a host tree with every file type reads back equal and e2fsck is clean") {
  TempDir dir;
  TestRng rng;
  std::string src = dir / "src";
  REQUIRE(::mkdir(src.c_str(), 0755) == 0);
  HostTree t = MakeHostTree(src, rng);
  MESSAGE("devices " << t.devices << " user xattrs " << t.user_xattrs << " acls " << t.acls
                     << " caps " << t.caps);
  FileSystem& fs = DefaultFileSystem();
  REQUIRE(::mkdir((dir / "disk").c_str(), 0755) == 0);
  CreateOptions co;
  co.size_bytes = 256 * kMiB;
  REQUIRE_OK(CreateDisk(fs, dir / "disk/root.hds", co));
  OpenOptions oo;
  oo.writable = true;
  REQUIRE_ASSIGN(auto chain, OpenDisk(fs, dir / "disk/DiskDescriptor.xml", "", oo));
  REQUIRE_OK(MakeExt4(*chain, {}).status());
  REQUIRE_ASSIGN(auto source, OpenDirSource(src));
  PopulateOptions po;
  po.uid_shift = 100000;
  po.gid_shift = 100000;
  REQUIRE_ASSIGN(PopulateReport report, Populate(*chain, *source, po));
  for (const auto& w : report.warnings) MESSAGE("warning: " << w);
  CHECK(report.hard_links == 2);
  testing::RequireFsckClean(*chain, dir / "raw");
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*chain));
  CompareTree(src, *reader, 100000, 100000);
  REQUIRE_ASSIGN(FileInfo sparse, reader->Stat("/sparse"));
  CHECK(sparse.allocated_bytes < 2 * kMiB);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::fsimage
