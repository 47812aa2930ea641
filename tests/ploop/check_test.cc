// CheckImage: each inconsistency is reported, repaired when safe, and the
// repaired image keeps the data that was valid.
#include "ploop/check.h"

#include <functional>

#include "ploop/delta.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::Pattern;

constexpr uint64_t kCluster = 32 * 1024;

// An image with clusters 0..3 written with bytes 0x10..0x13 (file clusters
// first_block/C + 0..3), then corrupted by `corrupt`.
struct Fixture {
  MemoryFileSystem fs;
  uint64_t first_cluster = 0;

  explicit Fixture(uint64_t size_bytes = 64 * kCluster) {
    CreateOptions o;
    o.size_bytes = size_bytes;
    o.cluster_bytes = kCluster;
    auto d = Delta::Create(fs, "img.hds", o);
    REQUIRE_OK(d);
    for (uint64_t i = 0; i < 4; ++i) {
      REQUIRE_OK((*d)->Write(i * kCluster, Pattern(kCluster, 0x10 + i)));
    }
    first_cluster = (*d)->header().first_block_bytes() / kCluster;
    REQUIRE_OK((*d)->Close());
  }

  void Put32(uint64_t offset, uint32_t value) {
    auto f = fs.Open("img.hds", OpenMode::kReadWrite).value();
    std::array<std::byte, 4> b;
    StoreLe32(b.data(), value);
    REQUIRE_OK(f->WriteAt(offset, b));
  }
  void SetEntry(uint64_t index, uint32_t value) { Put32(kHeaderBytes + 4 * index, value); }

  CheckReport Check(bool repair) {
    auto f = fs.Open("img.hds", repair ? OpenMode::kReadWrite : OpenMode::kReadOnly).value();
    auto r = CheckImage(*f, repair);
    REQUIRE_OK(r);
    return *r;
  }

  bool HasProblem(const CheckReport& r, const std::string& text) {
    for (const auto& p : r.problems) {
      if (p.message.find(text) != std::string::npos) return true;
    }
    return false;
  }

  std::vector<std::byte> ReadCluster(uint64_t index) {
    OpenOptions o;
    auto d = Delta::Open(fs, "img.hds", o);
    REQUIRE_OK(d);
    std::vector<std::byte> out(kCluster);
    REQUIRE_OK((*d)->Read(index * kCluster, out));
    return out;
  }

  // Runs check, expects `text` reported, repairs, expects a clean image.
  void ExpectRepaired(const std::string& text) {
    CheckReport before = Check(false);
    CHECK_FALSE(before.clean());
    CHECK_MESSAGE(HasProblem(before, text), "expected a problem containing '" << text << "'");
    CheckReport repaired = Check(true);
    CHECK(repaired.clean());
    CheckReport after = Check(false);
    CHECK_MESSAGE(after.clean(), after.FirstProblem());
  }
};

TEST_SUITE_BEGIN("unit");

TEST_CASE("a clean image checks clean and repair changes nothing") {
  Fixture fx;
  auto before = fx.fs.Contents("img.hds");
  CheckReport r = fx.Check(false);
  CHECK(r.clean());
  CHECK(r.problems.empty());
  CHECK(r.allocated_clusters == 4);
  CHECK(fx.Check(true).clean());
  CHECK(fx.fs.Contents("img.hds") == before);
}

TEST_CASE("BAT entry past EOF is zeroed - other data survives") {
  Fixture fx;
  fx.SetEntry(2, 1000);
  fx.ExpectRepaired("past the end of the file");
  CHECK(fx.ReadCluster(2) == Pattern(kCluster, 0));
  CHECK(fx.ReadCluster(1) == Pattern(kCluster, 0x11));
  CHECK(fx.ReadCluster(3) == Pattern(kCluster, 0x13));
}

TEST_CASE("a cluster used twice is copied so each entry owns one") {
  Fixture fx;
  fx.SetEntry(10, static_cast<uint32_t>(fx.first_cluster + 1));
  fx.ExpectRepaired("used by BAT entries");
  CHECK(fx.ReadCluster(1) == Pattern(kCluster, 0x11));
  CHECK(fx.ReadCluster(10) == Pattern(kCluster, 0x11));
  CHECK(fx.Check(false).allocated_clusters == 5);
}

TEST_CASE("a non-zero BAT slot past the disk size is cleared") {
  Fixture fx;
  fx.SetEntry(100, 7);  // 64 entries; slot 100 is padding in the BAT cluster
  fx.ExpectRepaired("past the disk size");
}

TEST_CASE("an entry pointing into the BAT area is cleared") {
  // 9000 clusters of 32K need two BAT clusters; point an entry at cluster 1.
  Fixture fx(9000 * kCluster);
  REQUIRE(fx.first_cluster == 2);
  fx.SetEntry(3, 1);
  fx.ExpectRepaired("into the BAT area");
  CHECK(fx.ReadCluster(3) == Pattern(kCluster, 0));
  CHECK(fx.ReadCluster(2) == Pattern(kCluster, 0x12));
}

TEST_CASE("leaked clusters and a partial cluster at the end are trimmed") {
  Fixture fx;
  {
    auto f = fx.fs.Open("img.hds", OpenMode::kReadWrite).value();
    REQUIRE_OK(f->WriteAt(f->Size().value() + kCluster, Pattern(1000, 0x99)));
  }
  CheckReport r = fx.Check(false);
  CHECK(r.leaked_clusters == 1);
  fx.ExpectRepaired("not a multiple of the cluster size");
  CHECK(fx.fs.Contents("img.hds").size() == (fx.first_cluster + 4) * kCluster);
  CHECK(fx.ReadCluster(3) == Pattern(kCluster, 0x13));
}

TEST_CASE("the dirty flag is reported and cleared") {
  Fixture fx;
  fx.Put32(44, kInUseDirty);
  CheckReport r = fx.Check(false);
  CHECK(r.was_dirty);
  fx.ExpectRepaired("not closed cleanly");
  CHECK(LoadLe32(fx.fs.Contents("img.hds").data() + 44) == kInUseClean);
}

TEST_CASE("a first-block offset that is too large is reset to the exact value") {
  Fixture fx;
  fx.Put32(48, static_cast<uint32_t>(3 * kCluster / kSectorBytes));
  fx.ExpectRepaired("first block offset");
  CHECK(LoadLe32(fx.fs.Contents("img.hds").data() + 48) == kCluster / kSectorBytes);
  CHECK(fx.ReadCluster(0) == Pattern(kCluster, 0x10));
}

TEST_CASE("fatal header problems are reported and not touched") {
  struct Case {
    const char* what;
    std::function<void(Fixture&)> corrupt;
  };
  std::vector<Case> cases = {
      {"signature", [](Fixture& f) { f.Put32(0, 0x58585858); }},
      {"type", [](Fixture& f) { f.Put32(16, 7); }},
      {"cluster size", [](Fixture& f) { f.Put32(28, 3); }},
      {"entries", [](Fixture& f) { f.Put32(32, 65); }},
      {"first block", [](Fixture& f) { f.Put32(48, 0); }},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    Fixture fx;
    c.corrupt(fx);
    auto before = fx.fs.Contents("img.hds");
    CheckReport r = fx.Check(true);
    CHECK_FALSE(r.clean());
    REQUIRE_FALSE(r.problems.empty());
    CHECK(r.problems[0].severity == CheckProblem::Severity::kFatal);
    CHECK(fx.fs.Contents("img.hds") == before);
  }
  Fixture fx;
  {
    auto f = fx.fs.Open("img.hds", OpenMode::kReadWrite).value();
    REQUIRE_OK(f->Truncate(kCluster / 2));
  }
  CheckReport r = fx.Check(true);
  CHECK_FALSE(r.clean());
  CHECK(fx.HasProblem(r, "truncated"));
}

TEST_CASE("a flood of bad entries is counted without listing each one") {
  Fixture fx(4000 * kCluster);
  for (uint64_t i = 100; i < 300; ++i) fx.SetEntry(i, 50000);
  CheckReport r = fx.Check(false);
  CHECK(r.problems.size() == CheckReport::kMaxListed);
  CHECK(r.unlisted_problems == 200 - CheckReport::kMaxListed);
  CHECK_FALSE(r.clean());
  CHECK(fx.Check(true).clean());
  CHECK(fx.Check(false).clean());
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
