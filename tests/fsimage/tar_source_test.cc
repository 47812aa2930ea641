// TarSource: a tarball made by GNU tar from a host tree (plain, gzip, xz,
// zstd) populates a file system that reads back equal to the tree and is
// e2fsck -fn clean; hostile members (absolute paths, "..", writing through
// a symlink or a file, hard links out of the tree) are skipped with one
// warning each and never reach the file system.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include "fs_test_support.h"
#include "fsimage/mkfs.h"
#include "fsimage/populate.h"
#include "fsimage/reader.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop::fsimage {
namespace {

using ::ploop::testing::TempDir;
using ::ploop::testing::TestRng;

constexpr uint64_t kMiB = 1024 * 1024;

std::unique_ptr<Image> FreshExt4(FileSystem& fs, const std::string& path, uint64_t size) {
  CreateOptions o;
  o.size_bytes = size;
  auto image = CreateImage(fs, path, o);
  REQUIRE_OK(image);
  REQUIRE_OK(MakeExt4(**image, {}).status());
  return std::move(image).value();
}

bool HaveTool(const std::string& name) {
  return std::system(("command -v " + name + " >/dev/null 2>&1").c_str()) == 0;
}

// Runs a shell command; fails the test with the command when it fails.
void Shell(const std::string& cmd) {
  INFO("command: " << cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
}

TEST_SUITE_BEGIN("posix");

TEST_CASE("a GNU tar of a host tree reads back equal for each compression") {
  if (!HaveTool("tar")) ::ploop::testing::Skip("tar not found");
  TempDir dir;
  TestRng rng;
  std::string src = dir / "src";
  REQUIRE(::mkdir(src.c_str(), 0755) == 0);
  testing::HostTree t = testing::MakeHostTree(src, rng, /*with_socket=*/false);
  MESSAGE("devices " << t.devices << " user xattrs " << t.user_xattrs << " acls " << t.acls
                     << " caps " << t.caps);
  struct Kind {
    const char* flag;
    const char* tool;
    const char* name;
  };
  const Kind kinds[] = {{"", "tar", "t.tar"},
                        {"-z", "gzip", "t.tar.gz"},
                        {"-J", "xz", "t.tar.xz"},
                        {"--zstd", "zstd", "t.tar.zst"}};
  int tested = 0;
  for (const Kind& k : kinds) {
    std::string kind_name = k.name;
    CAPTURE(kind_name);
    if (!HaveTool(k.tool)) {
      MESSAGE(k.tool << " not found: " << k.name << " not tested");
      continue;
    }
    std::string tar = dir / k.name;
    Shell(
        "tar --format=posix --sort=name --sparse --xattrs --xattrs-include='*' --acls "
        "--numeric-owner " +
        std::string(k.flag) + " -C " + src + " -cf " + tar + " .");
    MemoryFileSystem mfs;
    auto image = FreshExt4(mfs, "img", 256 * kMiB);
    REQUIRE_ASSIGN(auto source, OpenTarSource(tar));
    PopulateOptions po;
    po.uid_shift = 100000;
    po.gid_shift = 200000;
    REQUIRE_ASSIGN(PopulateReport report, Populate(*image, *source, po));
    for (const auto& w : report.warnings) MESSAGE("warning: " << w);
    CHECK(report.warnings.empty());
    CHECK(report.hard_links == 2);
    testing::RequireFsckClean(*image, dir / "raw");
    REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
    testing::CompareTree(src, *reader, 100000, 200000);
    REQUIRE_ASSIGN(FileInfo sparse, reader->Stat("/sparse"));
    CHECK(sparse.allocated_bytes < 2 * kMiB);
    ++tested;
  }
  CHECK(tested >= 1);
}

TEST_CASE("hostile tar members are skipped with a warning each and e2fsck is clean") {
  if (std::system("python3 -c 'import tarfile' >/dev/null 2>&1") != 0) {
    ::ploop::testing::Skip("python3 not found");
  }
  TempDir dir;
  std::string tar = dir / "evil.tar";
  std::string script = dir / "make.py";
  std::ofstream(script) << R"(import io, sys, tarfile
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b"", link=""):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.linkname = link
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    i.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
add("ok", data=b"fine")
add("/abs", data=b"absolute")
add("../escape", data=b"up")
add("a/../../b", data=b"up2")
add("lnk", tarfile.SYMTYPE, link="/etc")
add("lnk/passwd", data=b"through a symlink")
add("up", tarfile.SYMTYPE, link="../../..")
add("up/x", tarfile.DIRTYPE)
add("f", data=b"file")
add("f/inner", data=b"through a file")
add("hl", tarfile.LNKTYPE, link="../../etc/shadow")
add("hl2", tarfile.LNKTYPE, link="/etc/passwd")
add("hl3", tarfile.LNKTYPE, link="missing")
add("hl4", tarfile.LNKTYPE, link="lnk")
add("good", tarfile.LNKTYPE, link="ok")
add("deep/er/file", data=b"parents made up")
t.close()
)";
  Shell("python3 " + script + " " + tar);
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 32 * kMiB);
  REQUIRE_ASSIGN(auto source, OpenTarSource(tar));
  REQUIRE_ASSIGN(PopulateReport report, Populate(*image, *source, {}));
  for (const auto& w : report.warnings) MESSAGE("warning: " << w);
  // One warning per hostile member, naming it.
  const char* hostile[] = {"/abs",    "../escape", "a/../../b", "lnk/passwd", "up/x/",
                           "f/inner", "hl",        "hl2",       "hl3",        "hl4"};
  CHECK(report.warnings.size() == std::size(hostile));
  for (std::string name : hostile) {
    CAPTURE(name);
    CHECK(std::any_of(report.warnings.begin(), report.warnings.end(), [&](const std::string& w) {
      return w.find(std::string("member ") + name + ":") != std::string::npos;
    }));
  }
  testing::RequireFsckClean(*image, dir / "raw");
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  REQUIRE_ASSIGN(auto root, reader->List("/"));
  std::vector<std::string> names;
  for (const auto& f : root) names.push_back(f.entry.path);
  CHECK(names == std::vector<std::string>{"deep", "f", "good", "lnk", "lost+found", "ok", "up"});
  CHECK(testing::ReadAll(*reader, "/ok") == "fine");
  CHECK(testing::ReadAll(*reader, "/f") == "file");
  CHECK(testing::ReadAll(*reader, "/deep/er/file") == "parents made up");
  REQUIRE_ASSIGN(FileInfo ok, reader->Stat("/ok"));
  REQUIRE_ASSIGN(FileInfo good, reader->Stat("/good"));
  CHECK(good.inode == ok.inode);
  CHECK(ok.links == 2);
  // Symlinks are kept as they are; nothing was written through them.
  REQUIRE_ASSIGN(FileInfo lnk, reader->Stat("/lnk"));
  CHECK(lnk.entry.type == EntryType::kSymlink);
  CHECK(lnk.entry.link_target == "/etc");
  CHECK(reader->Stat("/etc").error().code() == StatusCode::kNotFound);
  REQUIRE_ASSIGN(FileInfo deep, reader->Stat("/deep"));
  CHECK(deep.entry.mode == 0755);
}

TEST_CASE("a tar member replaces an earlier one and fs-add keeps existing directory metadata") {
  if (std::system("python3 -c 'import tarfile' >/dev/null 2>&1") != 0) {
    ::ploop::testing::Skip("python3 not found");
  }
  TempDir dir;
  std::string tar = dir / "dup.tar";
  std::string script = dir / "make.py";
  std::ofstream(script) << R"(import io, sys, tarfile
t = tarfile.open(sys.argv[1], "w:gz", format=tarfile.PAX_FORMAT)
def add(name, data):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    i.mode = 0o600
    i.uid = 7
    t.addfile(i, io.BytesIO(data))
add("etc/conf", b"first")
add("etc/conf", b"second")
t.close()
)";
  Shell("python3 " + script + " " + tar);
  MemoryFileSystem mfs;
  auto image = FreshExt4(mfs, "img", 32 * kMiB);
  REQUIRE_ASSIGN(FileInfo root_before, [&]() -> Result<FileInfo> {
    ASSIGN_OR_RETURN(auto reader, Ext4Reader::Open(*image));
    return reader->Stat("/");
  }());
  REQUIRE_ASSIGN(auto source, OpenTarSource(tar));
  REQUIRE_ASSIGN(PopulateReport report, Populate(*image, *source, {}));
  CHECK(report.warnings.empty());
  testing::RequireFsckClean(*image, dir / "raw");
  REQUIRE_ASSIGN(auto reader, Ext4Reader::Open(*image));
  CHECK(testing::ReadAll(*reader, "/etc/conf") == "second");
  REQUIRE_ASSIGN(FileInfo conf, reader->Stat("/etc/conf"));
  CHECK(conf.links == 1);
  CHECK(conf.entry.uid == 7);
  // The root had no member: its made-up entry leaves it as mkfs made it.
  REQUIRE_ASSIGN(FileInfo root, reader->Stat("/"));
  CHECK(root.entry.mode == root_before.entry.mode);
  CHECK(root.entry.mtime == root_before.entry.mtime);
}

TEST_CASE("a file that is not a tarball is refused before anything is written") {
  TempDir dir;
  std::ofstream(dir / "text") << "this is not a tar archive, just some words\n";
  auto r = OpenTarSource(dir / "text");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == StatusCode::kInvalidArgument);
  CHECK(r.error().message().find("not a tar archive") != std::string::npos);
  CHECK(OpenTarSource(dir / "missing.tar").status().code() == StatusCode::kNotFound);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::fsimage
