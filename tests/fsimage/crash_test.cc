// Crash tests for mkfs + populate: the whole build (MakeExt4, Populate,
// Image::Close) runs on a FaultFileSystem cut after its k-th mutating call
// (every k early on, then a spread), then the unsynced writes are dropped (all, none, or a seeded
// random subset). Whatever the cut, the build must not report success,
// and the image itself (the ploop layer's guarantee, not the ext4 inside)
// must check clean after one repair and open writable. An uncut build
// makes an ext4 that e2fsck passes.
#include <algorithm>
#include <memory>

#include "fs_test_support.h"
#include "fsimage/mkfs.h"
#include "fsimage/populate.h"
#include "fsimage/reader.h"
#include "ploop/check.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop::fsimage {
namespace {

using ::ploop::testing::TempDir;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr char kImagePath[] = "img.hds";

// A small tree with data, a directory big enough to become an htree, and
// a hard link.
class SmallTree final : public TreeSource {
 public:
  SmallTree() {
    Add(Dir(""));
    Add(Dir("etc"));
    Add(File("etc/motd", std::string(10000, 'm')));
    Add(Dir("many"));
    for (int i = 0; i < 200; ++i) Add(File("many/entry-" + std::to_string(i), "x"));
    Entry link;
    link.path = "etc/link";
    link.type = EntryType::kHardLink;
    link.link_target = "etc/motd";
    Add({link, ""});
  }
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
    return fn(0, std::as_bytes(std::span(data.data(), data.size())));
  }
  const std::vector<std::string>& warnings() const override { return warnings_; }

 private:
  static std::pair<Entry, std::string> Dir(std::string path) {
    Entry e;
    e.path = std::move(path);
    e.type = EntryType::kDirectory;
    e.mode = 0755;
    return {e, ""};
  }
  static std::pair<Entry, std::string> File(std::string path, std::string data) {
    Entry e;
    e.path = std::move(path);
    e.mode = 0644;
    e.size_bytes = e.data_bytes = data.size();
    return {e, std::move(data)};
  }
  void Add(std::pair<Entry, std::string> e) { entries_.push_back(std::move(e)); }

  std::vector<std::pair<Entry, std::string>> entries_;
  size_t next_ = 0;
  std::vector<std::string> warnings_;
};

void CreateEmptyImage(FileSystem& fs) {
  CreateOptions o;
  o.size_bytes = 32 * kMiB;
  o.cluster_bytes = 64 * 1024;
  REQUIRE_ASSIGN(auto image, CreateImage(fs, kImagePath, o));
  REQUIRE_OK(image->Close());
}

// What `ploop init --from-...` does after creating the image.
Status Build(FileSystem& fs) {
  OpenOptions o;
  o.writable = true;
  ASSIGN_OR_RETURN(auto image, OpenImage(fs, kImagePath, o));
  Status s = MakeExt4(*image, {}).status();
  if (s.ok()) {
    SmallTree tree;
    s = Populate(*image, tree, {}).status();
  }
  Status closed = image->Close();
  return s.ok() ? closed : s;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("a cut anywhere in mkfs and populate never reports success and the image repairs") {
  uint64_t total = 0;
  {
    MemoryFileSystem mem;
    CreateEmptyImage(mem);
    FaultFileSystem fault(mem);
    REQUIRE_OK(Build(fault));
    total = fault.mutation_count();
    TempDir dir;
    OpenOptions o;
    REQUIRE_ASSIGN(auto image, OpenImage(mem, kImagePath, o));
    testing::RequireFsckClean(*image, dir / "raw");
  }
  MESSAGE("mutating operations in a full build: " << total);
  REQUIRE(total > 10);
  const CrashMode modes[] = {CrashMode::kDropAll, CrashMode::kKeepAll, CrashMode::kRandom};
  // Every cut point early (mkfs' metadata), then about 60 spread over the
  // rest: a full build is thousands of block writes.
  int cuts = 0, points = 0;
  const uint64_t stride = std::max<uint64_t>(1, total / 60);
  for (uint64_t k = 0; k < total; k += k < 16 ? 1 : stride) {
    ++points;
    for (CrashMode mode : modes) {
      CAPTURE(k);
      CAPTURE(static_cast<int>(mode));
      MemoryFileSystem mem;
      CreateEmptyImage(mem);
      FaultFileSystem fault(mem);
      fault.CutAfter(k, /*torn=*/k % 2 == 1);
      Status built = Build(fault);
      REQUIRE(fault.cut());
      ++cuts;
      CHECK_FALSE(built.ok());
      REQUIRE_OK(fault.Crash(mode, /*seed=*/k));
      {
        REQUIRE_ASSIGN(auto file, mem.Open(kImagePath, OpenMode::kReadWrite));
        REQUIRE_OK(CheckImage(*file, /*repair=*/true).status());
      }
      REQUIRE_ASSIGN(auto file, mem.Open(kImagePath, OpenMode::kReadOnly));
      REQUIRE_ASSIGN(CheckReport report, CheckImage(*file, /*repair=*/false));
      CHECK(report.clean());
      OpenOptions o;
      o.writable = true;
      REQUIRE_ASSIGN(auto image, OpenImage(mem, kImagePath, o));
      REQUIRE_OK(image->Close());
    }
  }
  CHECK(cuts == 3 * points);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::fsimage
