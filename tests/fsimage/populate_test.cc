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
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>

#include "fs_test_support.h"
#include "fsimage/mkfs.h"
#include "fsimage/reader.h"
#include "ploop/convert.h"
#include "ploop/disk.h"
#include "ploop/io/file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop::fsimage {
namespace {

using ::ploop::testing::TempDir;
using ::ploop::testing::TestRng;
using testing::CompareTree;
using testing::HostTree;
using testing::MakeHostTree;
using testing::ReadAll;

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

// Runs `cmd` through the shell; its exit code and output.
testing::FsckResult RunShell(const std::string& cmd) {
  testing::FsckResult result;
  FILE* pipe = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
  int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST_CASE("10000 entries in one directory make an htree that e2fsck and lookups accept") {
  if (testing::FindE2fsck().empty()) ::ploop::testing::Skip("e2fsck not found");
  if (RunShell("debugfs -V").exit_code != 0) ::ploop::testing::Skip("debugfs not found");
  TempDir dir;
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 128 * kMiB);
  std::vector<std::pair<Entry, std::string>> entries{{Dir(""), ""}, {Dir("many"), ""}};
  for (int i = 0; i < 10000; ++i) {
    entries.push_back(File("many/file-" + std::to_string(i), std::to_string(i)));
    if (i % 100 == 0) entries.push_back({Dir("many/dir-" + std::to_string(i)), ""});
  }
  VectorSource src(entries);
  std::vector<PopulateProgress> seen;
  PopulateOptions po;
  po.progress = [&](const PopulateProgress& p) { seen.push_back(p); };
  REQUIRE_ASSIGN(PopulateReport r, Populate(*image, src, po));
  CHECK(r.files == 10101);  // the root is updated, not created
  REQUIRE_FALSE(seen.empty());
  CHECK(seen.back().files_done == seen.back().files_total);
  CHECK(seen.back().files_total == 10102);
  CHECK(seen.back().bytes_done == seen.back().bytes_total);
  bool monotonic = true;
  for (size_t i = 1; i < seen.size(); ++i) {
    monotonic &= seen[i].files_done >= seen[i - 1].files_done &&
                 seen[i].bytes_done >= seen[i - 1].bytes_done;
  }
  CHECK(monotonic);
  // A second add into the indexed directory: new names go through the
  // index, an existing one is replaced.
  VectorSource more({{Dir(""), ""},
                     {Dir("many"), ""},
                     File("many/file-5", "replaced"),
                     File("many/late-addition", "late")});
  REQUIRE_OK(Populate(*image, more, {}).status());

  REQUIRE_OK(ExportRaw(*image, DefaultFileSystem(), dir / "raw"));
  testing::FsckResult fsck = testing::RunE2fsck(dir / "raw");
  INFO("e2fsck -fn output:\n" << fsck.output);
  CHECK(fsck.exit_code == 0);
  testing::FsckResult htree = RunShell("debugfs -R 'htree /many' " + (dir / "raw"));
  INFO("debugfs htree output:\n" << htree.output.substr(0, 2000));
  CHECK(htree.output.find("Root node dump:") != std::string::npos);
  CHECK(htree.output.find("Number of entries (count): ") != std::string::npos);
  testing::FsckResult stat = RunShell("debugfs -R 'stat /many' " + (dir / "raw"));
  CHECK(stat.output.find("Flags: 0x81000") != std::string::npos);  // INDEX_FL | EXTENTS_FL

  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  REQUIRE_ASSIGN(auto list, reader->List("/many"));
  CHECK(list.size() == 10101);
  for (int i : {0, 1, 4999, 9999}) {
    CHECK(ReadAll(*reader, "/many/file-" + std::to_string(i)) == std::to_string(i));
  }
  CHECK(ReadAll(*reader, "/many/file-5") == "replaced");
  CHECK(ReadAll(*reader, "/many/late-addition") == "late");
  REQUIRE_ASSIGN(FileInfo sub, reader->Stat("/many/dir-9900"));
  CHECK(sub.entry.type == EntryType::kDirectory);
  REQUIRE_ASSIGN(FileInfo many, reader->Stat("/many"));
  CHECK(many.links == 2 + 100);
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
