// Snapshot operations with OpenVZ's semantics: create renames the top and
// adds an empty {5fbaabe3-...} over it, switch drops the top, merge keeps
// the child's GUID on the parent's file, delete removes a leaf or merges a
// snapshot with one child and refuses the rest. Also: lower deltas never
// change, Busy and NoSpace refusals, hostile descriptors, CheckDisk of whole
// disks and RestoreDescriptor.
#include "snapshot/snapshot.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <functional>
#include <set>

#include "ploop/delta.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "snapshot_support.h"
#include "test_support.h"

namespace ploop {
namespace {

using namespace snaptest;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * kKiB;
constexpr uint64_t kSize = 64 * kCb;

// "{ABC...}" -> "abc..." (no braces, upper case): another spelling of a GUID.
std::string Unbraced(const std::string& guid) {
  std::string out = guid.substr(1, guid.size() - 2);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

std::vector<std::string> ChainGuids(const Descriptor& dd) {
  std::vector<std::string> out;
  for (const auto& image : dd.Chain()) out.push_back(image.guid);
  return out;
}

// The file names the descriptor uses, plus the descriptor itself.
std::set<std::string> NamedFiles(const Descriptor& dd) {
  std::set<std::string> out = {std::string(kDescriptorFileName)};
  for (const auto& image : dd.images()) out.insert(image.file);
  return out;
}

std::set<std::string> FileNames(MemoryFileSystem& fs) {
  std::set<std::string> out;
  for (const auto& [name, bytes] : Files(fs)) out.insert(name);
  return out;
}

// Expects the folder to hold exactly the files the descriptor names.
void RequireNoStrayFiles(MemoryFileSystem& fs) {
  Descriptor dd = LoadDd(fs);
  INFO("files in the folder:" << Names(Files(fs)));
  REQUIRE(FileNames(fs) == NamedFiles(dd));
}

// A disk with three deltas:
//   base  root.hds          clusters 0-3 = 0xa0
//   s2    root.hds.{...}    cluster 2 = 0xb0, cluster 10 = 0xb1
//   top   root.hds.{...}    cluster 3 = 0xc0
// returning {s1, s2} (s1 names root.hds).
struct ThreeLevels {
  std::string s1;
  std::string s2;
  Bytes s1_data;
  Bytes s2_data;
  Bytes top_data;
};

ThreeLevels MakeThreeLevels(MemoryFileSystem& fs) {
  ThreeLevels t;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 0, Pattern(4 * kCb, 0xa0));
  REQUIRE_ASSIGN(t.s1, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, 2 * kCb, Pattern(kCb, 0xb0));
  WriteTop(fs, 10 * kCb, Pattern(kCb, 0xb1));
  REQUIRE_ASSIGN(t.s2, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, 3 * kCb, Pattern(kCb, 0xc0));
  t.s1_data = Filled(kSize, 0, 4 * kCb, 0xa0);
  t.s2_data = t.s1_data;
  std::memset(t.s2_data.data() + 2 * kCb, 0xb0, kCb);
  std::memset(t.s2_data.data() + 10 * kCb, 0xb1, kCb);
  t.top_data = t.s2_data;
  std::memset(t.top_data.data() + 3 * kCb, 0xc0, kCb);
  REQUIRE(ReadSnapshot(fs, t.s1) == t.s1_data);
  REQUIRE(ReadSnapshot(fs, t.s2) == t.s2_data);
  REQUIRE(ReadSnapshot(fs, "") == t.top_data);
  return t;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("snapshot create renames the top to the snapshot GUID and adds an empty top over it") {
  MemoryFileSystem fs;
  TestRng rng;
  MakeDisk(fs, kSize, kCb);
  auto data = rng.Bytes(3 * kCb + 100);
  WriteTop(fs, 5 * kCb, data);
  Bytes content = ReadSnapshot(fs, "");
  const Bytes root_before = fs.Contents(kImage);

  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  REQUIRE_ASSIGN(std::string parsed, ParseGuid(s1));
  CHECK(parsed == s1);
  CHECK(s1 != kTop);
  Descriptor dd = LoadDd(fs);
  CHECK(dd.top_guid() == kTop);
  REQUIRE(dd.images().size() == 2);
  // The old top's file now belongs to the snapshot's GUID.
  REQUIRE(dd.FindImage(s1) != nullptr);
  CHECK(dd.FindImage(s1)->file == "root.hds");
  CHECK(dd.FindShot(s1)->parent_guid == kNull);
  CHECK(dd.FindShot(kTop)->parent_guid == s1);
  CHECK(ChainGuids(dd) == std::vector<std::string>{s1, kTop});
  // The new top is "<base file>.{file guid}".
  const std::string top_file = dd.top().file;
  REQUIRE(top_file.rfind("root.hds.{", 0) == 0);
  CHECK(ParseGuid(top_file.substr(std::string("root.hds.").size())).ok());
  // Nothing was copied: the base file is byte for byte the same, the new
  // top holds no cluster.
  CHECK(fs.Contents(kImage) == root_before);
  {
    OpenOptions ro;
    REQUIRE_ASSIGN(auto top, Delta::Open(fs, dd.top().path, ro));
    REQUIRE_ASSIGN(ImageStats st, top->Stats());
    CHECK(st.allocated_clusters == 0);
    CHECK(top->size_bytes() == kSize);
    CHECK(top->cluster_bytes() == kCb);
  }
  CHECK(ReadSnapshot(fs, s1) == content);
  CHECK(ReadSnapshot(fs, "") == content);
  RequireNoStrayFiles(fs);

  // Writes to the top do not show in the snapshot.
  WriteTop(fs, 5 * kCb + 10, Pattern(20, 0x11));
  Bytes top_content = content;
  std::memset(top_content.data() + 5 * kCb + 10, 0x11, 20);
  CHECK(ReadSnapshot(fs, s1) == content);
  CHECK(ReadSnapshot(fs, "") == top_content);
  CHECK(fs.Contents(kImage) == root_before);

  // A second snapshot, named without braces in upper case: stored
  // normalised, on the first top's file.
  const std::string wanted = "{1b4e28ba-2fa1-41d2-883f-0016d3cca427}";
  REQUIRE_ASSIGN(std::string s2, CreateSnapshot(fs, kDd, Unbraced(wanted)));
  CHECK(s2 == wanted);
  dd = LoadDd(fs);
  CHECK(ChainGuids(dd) == std::vector<std::string>{s1, s2, kTop});
  CHECK(dd.FindImage(s2)->file == top_file);
  CHECK(dd.top().file != top_file);
  CHECK(ReadSnapshot(fs, s2) == top_content);
  CHECK(ReadSnapshot(fs, Unbraced(s2)) == top_content);
  CHECK(ReadSnapshot(fs, s1) == content);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);
}

TEST_CASE(
    "online snapshot steps: prepare adds an unnamed empty top, abandon removes it, commit "
    "names it while the top stays open for writing") {
  MemoryFileSystem fs;
  TestRng rng;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 2 * kCb, rng.Bytes(kCb));
  const Bytes content = ReadSnapshot(fs, "");
  const auto files_before = FileNames(fs);

  // The served top is held open for writing (its lock) all along, as the
  // mount daemon holds it.
  auto chain = OpenTop(fs);
  REQUIRE_ASSIGN(PreparedSnapshot p1, PrepareSnapshot(fs, kDd, "", kSize));
  CHECK(fs.Exists(p1.new_top_path).value());
  CHECK(p1.old_top_path == kImage);
  CHECK(LoadDd(fs).images().size() == 1);  // not named yet: an orphan at worst
  AbandonSnapshot(fs, p1);
  CHECK(FileNames(fs) == files_before);

  CHECK(PrepareSnapshot(fs, kDd, "{00000000-0000-0000-0000-000000000000}", kSize).error().code() ==
        StatusCode::kInvalidArgument);
  CHECK(FileNames(fs) == files_before);

  REQUIRE_ASSIGN(PreparedSnapshot p2, PrepareSnapshot(fs, kDd, "", kSize));
  REQUIRE_OK(CommitSnapshot(fs, p2));
  Descriptor dd = LoadDd(fs);
  CHECK(ChainGuids(dd) == std::vector<std::string>{p2.guid, kTop});
  CHECK(dd.FindImage(p2.guid)->file == "root.hds");
  CHECK(dd.top().path == p2.new_top_path);
  REQUIRE_OK(chain->Close());
  CHECK(ReadSnapshot(fs, p2.guid) == content);
  CHECK(ReadSnapshot(fs, "") == content);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot create is O(1): the new delta is the same small file for 1 GiB and 64 GiB") {
  std::map<uint64_t, uint64_t> new_delta_bytes;
  for (uint64_t size : {1ull << 30, 64ull << 30}) {
    CAPTURE(size);
    MemoryFileSystem fs;
    MakeDisk(fs, size, 1 * kMiB);
    // Data at both ends of the disk, which a copying snapshot would carry.
    WriteTop(fs, 0, Pattern(3 * kMiB, 0x21));
    WriteTop(fs, size - kMiB, Pattern(kMiB, 0x22));
    const Bytes root_before = fs.Contents(kImage);
    const uint64_t used_before = fs.used_bytes();
    REQUIRE_ASSIGN(std::string snap, CreateSnapshot(fs, kDd, ""));
    Descriptor dd = LoadDd(fs);
    const Bytes top_file = fs.Contents(dd.top().path);
    new_delta_bytes[size] = top_file.size();
    // Header and BAT: at most one cluster; the data stayed where it was.
    CHECK(top_file.size() <= kMiB);
    CHECK(fs.Contents(kImage) == root_before);
    CHECK(fs.used_bytes() - used_before <= kMiB + 64 * kKiB);
    REQUIRE_ASSIGN(auto chain, OpenDisk(fs, kDd, "", OpenOptions{}));
    CHECK(chain->size_bytes() == size);
    Bytes tail(kMiB);
    REQUIRE_OK(chain->Read(size - kMiB, tail));
    CHECK(tail == Pattern(kMiB, 0x22));
  }
  CHECK(new_delta_bytes[1ull << 30] == new_delta_bytes[64ull << 30]);
}

TEST_CASE("snapshot create refuses a taken or reserved or malformed GUID") {
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 0, Pattern(kCb, 0x31));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  const auto before = Files(fs);
  struct Case {
    std::string guid;
    StatusCode code;
  };
  for (const Case& c :
       {Case{s1, StatusCode::kAlreadyExists}, Case{Unbraced(s1), StatusCode::kAlreadyExists},
        Case{kTop, StatusCode::kInvalidArgument}, Case{kNull, StatusCode::kInvalidArgument},
        Case{"not-a-guid", StatusCode::kInvalidArgument}}) {
    CAPTURE(c.guid);
    auto r = CreateSnapshot(fs, kDd, c.guid);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == c.code);
    CHECK(Files(fs) == before);
  }
}

TEST_CASE("snapshot switch drops the top's data and puts a new empty top over the snapshot") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  Descriptor dd = LoadDd(fs);
  const std::string old_top_file = dd.top().file;
  const std::string s2_file = dd.FindImage(t.s2)->file;
  const Bytes root_before = fs.Contents(kImage);
  const Bytes s2_before = fs.Contents(JoinPath(kDir, s2_file));

  SUBCASE("refusals change nothing") {
    const auto before = Files(fs);
    Status s = SwitchSnapshot(fs, kDd, kTop);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    s = SwitchSnapshot(fs, kDd, "{11111111-2222-4333-8444-555555555555}");
    CHECK(s.code() == StatusCode::kNotFound);
    s = SwitchSnapshot(fs, kDd, "garbage");
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK(Files(fs) == before);
  }

  SUBCASE("to the snapshot below the top") {
    REQUIRE_OK(SwitchSnapshot(fs, kDd, Unbraced(t.s2)));
    dd = LoadDd(fs);
    CHECK(ChainGuids(dd) == std::vector<std::string>{t.s1, t.s2, kTop});
    CHECK(dd.top().file != old_top_file);
    CHECK_FALSE(*fs.Exists(JoinPath(kDir, old_top_file)));
    CHECK(ReadSnapshot(fs, "") == t.s2_data);
  }

  SUBCASE("to an older snapshot, which then has two children") {
    REQUIRE_OK(SwitchSnapshot(fs, kDd, t.s1));
    dd = LoadDd(fs);
    CHECK(ChainGuids(dd) == std::vector<std::string>{t.s1, kTop});
    CHECK(dd.FindShot(t.s2)->parent_guid == t.s1);
    CHECK(dd.Children(t.s1).size() == 2);
    CHECK(dd.top().file != old_top_file);
    CHECK(dd.top().file.rfind("root.hds.{", 0) == 0);
    CHECK_FALSE(*fs.Exists(JoinPath(kDir, old_top_file)));
    CHECK(ReadSnapshot(fs, "") == t.s1_data);
    CHECK(ReadSnapshot(fs, t.s2) == t.s2_data);
    // The new top is empty and takes writes; the snapshots do not change.
    WriteTop(fs, 0, Pattern(kCb, 0xd0));
    Bytes top = t.s1_data;
    std::memset(top.data(), 0xd0, kCb);
    CHECK(ReadSnapshot(fs, "") == top);
    CHECK(ReadSnapshot(fs, t.s1) == t.s1_data);
    CHECK(ReadSnapshot(fs, t.s2) == t.s2_data);
  }

  // The snapshots' files are untouched either way.
  CHECK(fs.Contents(kImage) == root_before);
  CHECK(fs.Contents(JoinPath(kDir, s2_file)) == s2_before);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot switch to a snapshot taken before a resize gives the disk that size again") {
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, kSize - kCb, Pattern(kCb, 0x41));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  REQUIRE_OK(ResizeDisk(fs, kDd, 2 * kSize));
  WriteTop(fs, 2 * kSize - kCb, Pattern(kCb, 0x42));
  CHECK(LoadDd(fs).disk_size_bytes() == 2 * kSize);
  REQUIRE_OK(SwitchSnapshot(fs, kDd, s1));
  Descriptor dd = LoadDd(fs);
  CHECK(dd.disk_size_bytes() == kSize);
  CHECK(ReadSnapshot(fs, "") == Filled(kSize, kSize - kCb, kCb, 0x41));
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot merge keeps the child GUID on the parent file and copies only its clusters") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  Descriptor dd = LoadDd(fs);
  const std::string s2_file = dd.FindImage(t.s2)->file;
  const std::string top_file = dd.top().file;
  const uint64_t root_bytes = fs.Contents(kImage).size();

  // s2 holds clusters 2 (also in s1: overwritten in place) and 10 (new to
  // s1: one cluster appended). Nothing else is copied.
  REQUIRE_OK(MergeSnapshot(fs, kDd, Unbraced(t.s2)));
  dd = LoadDd(fs);
  CHECK(dd.FindImage(t.s1) == nullptr);
  REQUIRE(dd.FindImage(t.s2) != nullptr);
  CHECK(dd.FindImage(t.s2)->file == "root.hds");
  CHECK(dd.FindShot(t.s2)->parent_guid == kNull);
  CHECK(ChainGuids(dd) == std::vector<std::string>{t.s2, kTop});
  CHECK_FALSE(*fs.Exists(JoinPath(kDir, s2_file)));
  CHECK(fs.Contents(kImage).size() == root_bytes + kCb);
  CHECK(ReadSnapshot(fs, t.s2) == t.s2_data);
  CHECK(ReadSnapshot(fs, "") == t.top_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);

  // The top (no GUID given) into what is now the base.
  REQUIRE_OK(MergeSnapshot(fs, kDd, ""));
  dd = LoadDd(fs);
  REQUIRE(dd.images().size() == 1);
  CHECK(dd.top_guid() == kTop);
  CHECK(dd.top().file == "root.hds");
  CHECK_FALSE(*fs.Exists(JoinPath(kDir, top_file)));
  CHECK(fs.Contents(kImage).size() == root_bytes + kCb);
  CHECK(ReadSnapshot(fs, "") == t.top_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);

  // Nothing is left to merge into.
  const auto before = Files(fs);
  CHECK(MergeSnapshot(fs, kDd, "").code() == StatusCode::kFailedPrecondition);
  CHECK(MergeSnapshot(fs, kDd, "{11111111-2222-4333-8444-555555555555}").code() ==
        StatusCode::kNotFound);
  CHECK(Files(fs) == before);
}

TEST_CASE("snapshot merge of a sparse child into a big parent costs what the child holds") {
  MemoryFileSystem fs;
  const uint64_t size = 4096 * kCb;  // 128 MiB
  MakeDisk(fs, size, kCb);
  WriteTop(fs, 100 * kCb, Pattern(kCb, 0x51));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, 7 * kCb, Pattern(kCb, 0x52));
  WriteTop(fs, 4000 * kCb + 5, Pattern(10, 0x53));
  const uint64_t root_bytes = fs.Contents(kImage).size();
  const uint64_t used_before = fs.used_bytes();
  REQUIRE_OK(MergeSnapshot(fs, kDd, ""));
  CHECK(fs.Contents(kImage).size() == root_bytes + 2 * kCb);
  CHECK(fs.used_bytes() <= used_before);  // the child's file is gone
  OpenOptions ro;
  REQUIRE_ASSIGN(auto chain, OpenDisk(fs, kDd, "", ro));
  Bytes got(kCb);
  REQUIRE_OK(chain->Read(7 * kCb, got));
  CHECK(got == Pattern(kCb, 0x52));
  REQUIRE_OK(chain->Read(4000 * kCb, got));
  CHECK(got == Filled(kCb, 5, 10, 0x53));
  REQUIRE_OK(chain->Read(100 * kCb, got));
  CHECK(got == Pattern(kCb, 0x51));
}

TEST_CASE("snapshot merge grows the parent to the child's size") {
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 0, Pattern(kCb, 0x61));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  REQUIRE_OK(ResizeDisk(fs, kDd, 3 * kSize));
  WriteTop(fs, 3 * kSize - 100, Pattern(100, 0x62));
  Bytes expected = Filled(3 * kSize, 0, kCb, 0x61);
  std::memset(expected.data() + 3 * kSize - 100, 0x62, 100);
  CHECK(ReadSnapshot(fs, s1).size() == kSize);
  REQUIRE_OK(MergeSnapshot(fs, kDd, ""));
  Descriptor dd = LoadDd(fs);
  CHECK(dd.images().size() == 1);
  CHECK(dd.disk_size_bytes() == 3 * kSize);
  CHECK(ReadSnapshot(fs, "") == expected);
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot merge keeps zeros the child wrote over data further down") {
  // The child holds a zero cluster (a discard or zero write over data in
  // the grandparent); the parent lacks that cluster. The merged delta must
  // keep the zeros, or the grandparent's data would show again.
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 0, Pattern(4 * kCb, 0x71));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  REQUIRE_ASSIGN(std::string s2, CreateSnapshot(fs, kDd, ""));
  {
    auto chain = OpenTop(fs);
    REQUIRE_OK(chain->Discard(kCb, kCb));
    REQUIRE_OK(chain->Write(2 * kCb, Pattern(kCb, 0)));
    REQUIRE_OK(chain->Close());
  }
  Bytes expected = Filled(kSize, 0, 4 * kCb, 0x71);
  std::memset(expected.data() + kCb, 0, 2 * kCb);
  REQUIRE(ReadSnapshot(fs, "") == expected);
  bool s1_stays = true;
  SUBCASE("merge of the top into its parent") { REQUIRE_OK(MergeSnapshot(fs, kDd, "")); }
  SUBCASE("delete of the parent") { REQUIRE_OK(DeleteSnapshot(fs, kDd, s2)); }
  SUBCASE("merge all") {
    REQUIRE_OK(MergeAll(fs, kDd));
    s1_stays = false;
  }
  CHECK(ReadSnapshot(fs, "") == expected);
  if (s1_stays) CHECK(ReadSnapshot(fs, s1) == Filled(kSize, 0, 4 * kCb, 0x71));
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot merge refuses a parent with other children and changes nothing") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  REQUIRE_OK(SwitchSnapshot(fs, kDd, t.s1));  // s1 has children s2 and the top
  const auto before = Files(fs);
  CHECK(MergeSnapshot(fs, kDd, t.s2).code() == StatusCode::kFailedPrecondition);
  CHECK(MergeSnapshot(fs, kDd, "").code() == StatusCode::kFailedPrecondition);
  CHECK(MergeSnapshot(fs, kDd, t.s1).code() == StatusCode::kFailedPrecondition);  // the base
  CHECK(MergeAll(fs, kDd).code() == StatusCode::kFailedPrecondition);
  CHECK(Files(fs) == before);
}

TEST_CASE("snapshot merge -A refuses a branch anywhere in the chain before merging anything") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  REQUIRE_ASSIGN(std::string s3, CreateSnapshot(fs, kDd, ""));
  REQUIRE_OK(SwitchSnapshot(fs, kDd, t.s2));  // s1 <- s2 <- {s3, top}
  CHECK(ChainGuids(LoadDd(fs)) == std::vector<std::string>{t.s1, t.s2, kTop});
  const auto before = Files(fs);
  // s1 <- s2 alone could be merged; the branch above s2 makes the whole
  // request impossible, so nothing is merged at all.
  CHECK(MergeAll(fs, kDd).code() == StatusCode::kFailedPrecondition);
  CHECK(Files(fs) == before);
}

TEST_CASE("snapshot delete: a leaf is removed - one child means a merge - the rest is refused") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  REQUIRE_OK(SwitchSnapshot(fs, kDd, t.s1));  // s1 <- {s2, top}; s2 is a leaf
  Descriptor dd = LoadDd(fs);
  const std::string s2_file = dd.FindImage(t.s2)->file;

  // Refused: the top, a snapshot with two children, an unknown GUID.
  {
    const auto before = Files(fs);
    Status s = DeleteSnapshot(fs, kDd, kTop);
    CHECK(s.code() == StatusCode::kFailedPrecondition);
    s = DeleteSnapshot(fs, kDd, Unbraced(kTop));
    CHECK(s.code() == StatusCode::kFailedPrecondition);
    s = DeleteSnapshot(fs, kDd, t.s1);
    CHECK(s.code() == StatusCode::kFailedPrecondition);
    s = DeleteSnapshot(fs, kDd, "{11111111-2222-4333-8444-555555555555}");
    CHECK(s.code() == StatusCode::kNotFound);
    CHECK(Files(fs) == before);
  }

  // A leaf: its file goes, nothing else changes.
  const Bytes root_before = fs.Contents(kImage);
  const Bytes top_before = fs.Contents(dd.top().path);
  REQUIRE_OK(DeleteSnapshot(fs, kDd, Unbraced(t.s2)));
  dd = LoadDd(fs);
  CHECK(dd.FindImage(t.s2) == nullptr);
  CHECK_FALSE(*fs.Exists(JoinPath(kDir, s2_file)));
  CHECK(fs.Contents(kImage) == root_before);
  CHECK(fs.Contents(dd.top().path) == top_before);
  CHECK(ReadSnapshot(fs, t.s1) == t.s1_data);
  CHECK(ReadSnapshot(fs, "") == t.s1_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);

  // One child: s3 <- top; deleting s3 merges the top into s3's file.
  WriteTop(fs, 20 * kCb, Pattern(kCb, 0xe0));
  REQUIRE_ASSIGN(std::string s3, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, 21 * kCb, Pattern(kCb, 0xe1));
  Bytes s3_data = t.s1_data;
  std::memset(s3_data.data() + 20 * kCb, 0xe0, kCb);
  Bytes top_data = s3_data;
  std::memset(top_data.data() + 21 * kCb, 0xe1, kCb);
  dd = LoadDd(fs);
  const std::string s3_file = dd.FindImage(s3)->file;
  const std::string top_file = dd.top().file;
  REQUIRE_OK(DeleteSnapshot(fs, kDd, s3));
  dd = LoadDd(fs);
  CHECK(dd.FindImage(s3) == nullptr);
  CHECK(dd.top().file == s3_file);
  CHECK(dd.FindShot(kTop)->parent_guid == t.s1);
  CHECK_FALSE(*fs.Exists(JoinPath(kDir, top_file)));
  CHECK(fs.Contents(kImage) == root_before);
  CHECK(ReadSnapshot(fs, "") == top_data);
  CHECK(ReadSnapshot(fs, t.s1) == t.s1_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);

  // The base with one child: merged the same way; the top ends on root.hds.
  REQUIRE_OK(DeleteSnapshot(fs, kDd, t.s1));
  dd = LoadDd(fs);
  REQUIRE(dd.images().size() == 1);
  CHECK(dd.top().file == "root.hds");
  CHECK(ReadSnapshot(fs, "") == top_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot merge -A folds the active chain into the base") {
  MemoryFileSystem fs;
  TestRng rng;
  MakeDisk(fs, kSize, kCb);
  Bytes model(kSize);
  std::vector<std::string> snaps;
  for (int level = 0; level < 5; ++level) {
    uint64_t off = rng.Uniform(0, kSize - 3 * kCb);
    auto data = rng.Bytes(rng.Uniform(1, 3 * kCb));
    WriteTop(fs, off, data);
    std::memcpy(model.data() + off, data.data(), data.size());
    {
      auto chain = OpenTop(fs);
      uint64_t at = rng.Uniform(0, 60) * kCb;
      REQUIRE_OK(chain->Discard(at, kCb));
      std::memset(model.data() + at, 0, kCb);
      REQUIRE_OK(chain->Close());
    }
    REQUIRE_ASSIGN(std::string s, CreateSnapshot(fs, kDd, ""));
    snaps.push_back(s);
  }
  WriteTop(fs, kSize - 10, Pattern(10, 0x99));
  std::memset(model.data() + kSize - 10, 0x99, 10);
  REQUIRE(ReadSnapshot(fs, "") == model);
  REQUIRE_OK(MergeAll(fs, kDd));
  Descriptor dd = LoadDd(fs);
  REQUIRE(dd.images().size() == 1);
  CHECK(dd.top_guid() == kTop);
  CHECK(dd.top().file == "root.hds");
  CHECK(FileNames(fs) == std::set<std::string>{"DiskDescriptor.xml", "root.hds"});
  CHECK(ReadSnapshot(fs, "") == model);
  RequireCleanDisk(fs);
  // Again: nothing to do.
  REQUIRE_OK(MergeAll(fs, kDd));
  CHECK(ReadSnapshot(fs, "") == model);
}

TEST_CASE("snapshot files never change when the top is written") {
  MemoryFileSystem fs;
  TestRng rng;
  MakeDisk(fs, kSize, kCb);
  Bytes model(kSize);
  std::map<std::string, Bytes> snapshot_content;
  for (int level = 0; level < 3; ++level) {
    WriteTop(fs, level * 7 * kCb, rng.Bytes(5 * kCb));
    REQUIRE_ASSIGN(std::string s, CreateSnapshot(fs, kDd, ""));
    snapshot_content[s] = ReadSnapshot(fs, s);
  }
  model = ReadSnapshot(fs, "");
  Descriptor dd = LoadDd(fs);
  std::map<std::string, Bytes> lower;
  for (const auto& image : dd.Chain()) {
    if (image.guid != kTop) lower[image.path] = fs.Contents(image.path);
  }
  REQUIRE(lower.size() == 3);
  {
    auto chain = OpenTop(fs);
    for (int step = 0; step < 150; ++step) {
      uint64_t off = rng.Uniform(0, kSize - 1);
      uint64_t len = rng.Uniform(1, std::min<uint64_t>(kSize - off, 3 * kCb));
      switch (rng.Uniform(0, 4)) {
        case 0:
        case 1: {
          auto data = rng.Bytes(len);
          REQUIRE_OK(chain->Write(off, data));
          std::memcpy(model.data() + off, data.data(), len);
          break;
        }
        case 2:
          REQUIRE_OK(chain->Write(off, Bytes(len)));
          std::memset(model.data() + off, 0, len);
          break;
        case 3:
          REQUIRE_OK(chain->Discard(off, len));
          std::memset(model.data() + off, 0, len);
          break;
        default:
          REQUIRE_OK(chain->Flush());
      }
    }
    CHECK(ReadAll(*chain) == model);
    REQUIRE_OK(chain->Close());
  }
  for (const auto& [path, bytes] : lower) {
    CAPTURE(path);
    CHECK(fs.Contents(path) == bytes);
  }
  for (const auto& [guid, content] : snapshot_content) {
    CAPTURE(guid);
    CHECK(ReadSnapshot(fs, guid) == content);
  }
  CHECK(ReadSnapshot(fs, "") == model);
  RequireCleanDisk(fs);
}

TEST_CASE("snapshot operations on a disk in use fail with Busy and change nothing") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  const auto before = Files(fs);
  {
    auto in_use = OpenTop(fs);  // as a running container would
    CHECK(CreateSnapshot(fs, kDd, "").error().code() == StatusCode::kBusy);
    CHECK(MergeSnapshot(fs, kDd, "").code() == StatusCode::kBusy);
    CHECK(MergeSnapshot(fs, kDd, t.s2).code() == StatusCode::kBusy);
    CHECK(MergeAll(fs, kDd).code() == StatusCode::kBusy);
    CHECK(SwitchSnapshot(fs, kDd, t.s1).code() == StatusCode::kBusy);
    CHECK(DeleteSnapshot(fs, kDd, t.s2).code() == StatusCode::kBusy);
    CHECK(ResizeDisk(fs, kDd, 2 * kSize).code() == StatusCode::kBusy);
    CHECK(Files(fs) == before);
    REQUIRE_OK(in_use->Close());
  }
  {
    // A read-only view of a snapshot (a backup, say) keeps it from being
    // merged away or deleted.
    OpenOptions ro;
    REQUIRE_ASSIGN(auto view, OpenDisk(fs, kDd, t.s2, ro));
    CHECK(MergeSnapshot(fs, kDd, t.s2).code() == StatusCode::kBusy);
    CHECK(MergeSnapshot(fs, kDd, "").code() == StatusCode::kBusy);
    CHECK(DeleteSnapshot(fs, kDd, t.s2).code() == StatusCode::kBusy);
    CHECK(Files(fs) == before);
  }
  CHECK(Files(fs) == before);
  // Once released, the same operations work.
  REQUIRE_ASSIGN(std::string s3, CreateSnapshot(fs, kDd, ""));
  REQUIRE_OK(MergeSnapshot(fs, kDd, t.s2));
  REQUIRE_OK(SwitchSnapshot(fs, kDd, t.s2));
  CHECK(ReadSnapshot(fs, "") == t.s2_data);
  CHECK(ReadSnapshot(fs, s3) == t.top_data);
  RequireCleanDisk(fs);
}

TEST_CASE("compact moves clusters into holes and cuts files - every snapshot reads the same") {
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  // Base: clusters 0..11, then 3 overwritten with zeros (still allocated),
  // 1, 4 and 9 discarded (holes).
  WriteTop(fs, 0, Pattern(12 * kCb, 0x21));
  WriteTop(fs, 3 * kCb, Bytes(kCb));
  {
    auto chain = OpenTop(fs);
    for (uint64_t i : {1, 4, 9}) REQUIRE_OK(chain->Discard(i * kCb, kCb));
    REQUIRE_OK(chain->Close());
  }
  REQUIRE_ASSIGN(std::string snap, CreateSnapshot(fs, kDd, ""));
  // Top: zeros over base data in cluster 5 (must stay: they hide it), data
  // in 20..29, then 21..24 discarded.
  WriteTop(fs, 5 * kCb, Bytes(kCb));
  WriteTop(fs, 20 * kCb, Pattern(10 * kCb, 0x42));
  {
    auto chain = OpenTop(fs);
    REQUIRE_OK(chain->Discard(21 * kCb, 4 * kCb));
    REQUIRE_OK(chain->Close());
  }
  const Bytes snap_before = ReadSnapshot(fs, snap);
  const Bytes top_before = ReadSnapshot(fs, "");
  const Descriptor dd = LoadDd(fs);
  const std::string base_path = dd.FindImage(snap)->path;
  const std::string top_path = dd.top().path;
  const uint64_t base_bytes = fs.Contents(base_path).size();
  const uint64_t top_bytes = fs.Contents(top_path).size();

  REQUIRE_ASSIGN(CompactResult result, CompactDisk(fs, kDd));
  REQUIRE(result.deltas.size() == 2);
  CHECK(ReadSnapshot(fs, snap) == snap_before);
  CHECK(ReadSnapshot(fs, "") == top_before);
  RequireCleanDisk(fs);
  // The base keeps 12 - 3 discarded - the zero cluster 3 = 8 clusters; the
  // top keeps 1 + 10 - 4 = 7, its zero cluster included.
  CHECK(fs.Contents(base_path).size() == (1 + 8) * kCb);
  CHECK(fs.Contents(top_path).size() == (1 + 7) * kCb);
  CHECK(fs.Contents(base_path).size() < base_bytes);
  CHECK(fs.Contents(top_path).size() < top_bytes);
  for (const auto& d : result.deltas) {
    CHECK(d.bytes_after == fs.Contents(JoinPath(kDir, d.file)).size());
    CHECK(d.dropped_zero_clusters == (d.guid == snap ? 1u : 0u));
  }
  // A second run finds nothing to do.
  REQUIRE_ASSIGN(CompactResult again, CompactDisk(fs, kDd));
  for (const auto& d : again.deltas) {
    CHECK(d.moved_clusters == 0);
    CHECK(d.bytes_after == d.bytes_before);
  }
  // In use: Busy, nothing changed.
  const auto files = Files(fs);
  {
    auto in_use = OpenTop(fs);
    CHECK(CompactDisk(fs, kDd).error().code() == StatusCode::kBusy);
    REQUIRE_OK(in_use->Close());
  }
  CHECK(Files(fs) == files);
}

TEST_CASE("snapshot merge refuses with NoSpace before changing anything") {
  MemoryFileSystem fs;
  MakeDisk(fs, kSize, kCb);
  WriteTop(fs, 0, Pattern(2 * kCb, 0x81));
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, 10 * kCb, Pattern(8 * kCb, 0x82));  // 8 clusters the parent lacks
  const Bytes content = ReadSnapshot(fs, "");
  const auto before = Files(fs);
  // Room for a few clusters, not eight.
  fs.set_capacity_bytes(fs.used_bytes() + 3 * kCb);
  Status s = MergeSnapshot(fs, kDd, "");
  CHECK(s.code() == StatusCode::kNoSpace);
  CHECK(Files(fs) == before);
  s = DeleteSnapshot(fs, kDd, s1);
  CHECK(s.code() == StatusCode::kNoSpace);
  CHECK(MergeAll(fs, kDd).code() == StatusCode::kNoSpace);
  CHECK(Files(fs) == before);
  CHECK(ReadSnapshot(fs, "") == content);
  RequireCleanDisk(fs);
  // With the room back it works.
  fs.set_capacity_bytes(0);
  REQUIRE_OK(MergeSnapshot(fs, kDd, ""));
  CHECK(ReadSnapshot(fs, "") == content);
}

// --- Hostile or broken descriptors ----------------------------------------

void Put(MemoryFileSystem& fs, const std::string& path, const std::string& text) {
  REQUIRE_ASSIGN(auto file, fs.Create(path, /*exclusive=*/false));
  REQUIRE_OK(file->WriteAt(0, std::as_bytes(std::span(text))));
}

// `text` with every `from` replaced by `to`; `from` must occur.
std::string ReplaceAll(std::string text, const std::string& from, const std::string& to) {
  size_t at = text.find(from);
  REQUIRE_MESSAGE(at != std::string::npos, "no '" << from << "' in the text");
  for (; at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// `text` with the `n`-th (0-based) `from` replaced by `to`.
std::string ReplaceNth(std::string text, const std::string& from, const std::string& to, int n) {
  size_t at = text.find(from);
  for (int i = 0; i < n && at != std::string::npos; ++i) at = text.find(from, at + 1);
  REQUIRE_MESSAGE(at != std::string::npos, "no '" << from << "' #" << n << " in the text");
  text.replace(at, from.size(), to);
  return text;
}

TEST_CASE("snapshot operations on a broken disk fail with a clear error and change nothing") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  Descriptor dd = LoadDd(fs);
  const std::string xml = AsText(fs.Contents(kDd));
  const std::string s2_file = dd.FindImage(t.s2)->file;
  const std::string top_file = dd.top().file;
  auto replace_with_64k_delta = [&](const std::string& file) {
    REQUIRE_OK(fs.Remove(JoinPath(kDir, file)));
    CreateOptions o;
    o.size_bytes = kSize;
    o.cluster_bytes = 2 * kCb;
    REQUIRE_ASSIGN(auto other, Delta::Create(fs, JoinPath(kDir, file), o));
    REQUIRE_OK(other->Close());
  };

  // Each operation runs on its own copy of the broken disk. An operation
  // listed in `refused` must fail with `code`, naming `needle`, and leave
  // every byte as it was. The others do not touch the broken part and go
  // ahead (a merge of two sound deltas, a switch away from a missing one).
  const std::vector<std::pair<std::string, std::function<Status(FileSystem&)>>> ops = {
      {"open", [](FileSystem& f) { return OpenDisk(f, kDd, "", OpenOptions{}).error(); }},
      {"snapshot", [](FileSystem& f) { return CreateSnapshot(f, kDd, "").error(); }},
      {"switch to s1", [&](FileSystem& f) { return SwitchSnapshot(f, kDd, t.s1); }},
      {"switch to s2", [&](FileSystem& f) { return SwitchSnapshot(f, kDd, t.s2); }},
      {"merge of the top", [](FileSystem& f) { return MergeSnapshot(f, kDd, ""); }},
      {"merge of s2", [&](FileSystem& f) { return MergeSnapshot(f, kDd, t.s2); }},
      {"merge -A", [](FileSystem& f) { return MergeAll(f, kDd); }},
      {"delete of s2", [&](FileSystem& f) { return DeleteSnapshot(f, kDd, t.s2); }},
      {"resize", [](FileSystem& f) { return ResizeDisk(f, kDd, 2 * kSize); }},
      {"finish merges", [](FileSystem& f) { return FinishInterruptedMerges(f, kDd).error(); }},
  };
  std::set<std::string> all;
  for (const auto& [name, op] : ops) all.insert(name);
  std::set<std::string> refused;
  StatusCode code = StatusCode::kOk;
  std::string needle;
  bool descriptor_broken = false;

  SUBCASE("a ParentGUID cycle") {
    // s1's parent becomes s2, whose parent is s1.
    Put(fs, kDd, ReplaceNth(xml, "<ParentGUID>" + kNull, "<ParentGUID>" + t.s2, 0));
    descriptor_broken = true;
    code = StatusCode::kCorruption;
    needle = "cycle";
  }
  SUBCASE("duplicate GUIDs") {
    // s2's image carries the top's GUID as well.
    Put(fs, kDd, ReplaceNth(xml, "<GUID>" + t.s2 + "</GUID>", "<GUID>" + kTop + "</GUID>", 0));
    descriptor_broken = true;
    code = StatusCode::kCorruption;
    needle = kTop;
  }
  SUBCASE("a File outside the folder") {
    Put(fs, kDd, ReplaceAll(xml, "<File>" + s2_file, "<File>../" + s2_file));
    descriptor_broken = true;
    code = StatusCode::kInvalidArgument;
    needle = "../";
  }
  SUBCASE("a missing middle delta") {
    REQUIRE_OK(fs.Remove(JoinPath(kDir, s2_file)));
    refused = all;
    refused.erase("switch to s1");
    refused.erase("finish merges");
    code = StatusCode::kNotFound;
    needle = t.s2;
  }
  SUBCASE("a missing base") {
    REQUIRE_OK(fs.Remove(kImage));
    refused = {"open",        "snapshot", "switch to s1", "switch to s2",
               "merge of s2", "merge -A", "resize"};
    code = StatusCode::kNotFound;
    needle = t.s1;
  }
  SUBCASE("a middle delta with another cluster size") {
    replace_with_64k_delta(s2_file);
    refused = all;
    refused.erase("switch to s1");
    refused.erase("finish merges");
    code = StatusCode::kCorruption;
    needle = "cluster size";
  }
  SUBCASE("a top with another cluster size") {
    replace_with_64k_delta(top_file);
    refused = all;
    refused.erase("merge of s2");
    refused.erase("finish merges");
    code = StatusCode::kCorruption;
    needle = "cluster size";
  }
  if (descriptor_broken) refused = all;
  const auto before = Files(fs);
  for (const auto& [name, op] : ops) {
    MemoryFileSystem copy;
    PutFiles(copy, before);
    Status s = op(copy);
    INFO(name << " returned " << s.ToString());
    if (refused.count(name)) {
      CHECK_FALSE(s.ok());
      CHECK(s.code() == code);
      CHECK(s.message().find(needle) != std::string::npos);
      CHECK(Files(copy) == before);
    } else {
      CHECK(s.ok());
    }
  }
  // check reports the damage (or cannot read the descriptor at all).
  auto report = CheckDisk(fs, kDd, /*repair=*/true);
  if (descriptor_broken) {
    REQUIRE_FALSE(report.ok());
    CHECK(report.error().code() == code);
  } else {
    REQUIRE_OK(report);
    CHECK_FALSE(report->clean());
    CHECK(report->FirstProblem().find(needle) != std::string::npos);
  }
}

// --- CheckDisk -------------------------------------------------------------

TEST_CASE("snapshot check of a disk: clean - orphan delta files - missing deltas") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  {
    REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(fs, kDd, /*repair=*/false));
    CHECK(report.clean());
    CHECK(report.problems.empty());
    CHECK(report.deltas.size() == 3);
  }

  SUBCASE("an orphan left by an interrupted snapshot operation is removed by repair") {
    const std::string orphan = "root.hds.{0f0e0d0c-0b0a-4908-8706-050403020100}";
    CreateOptions o;
    o.size_bytes = kSize;
    o.cluster_bytes = kCb;
    {
      REQUIRE_ASSIGN(auto delta, Delta::Create(fs, JoinPath(kDir, orphan), o));
      REQUIRE_OK(delta->Close());
    }
    // A delta file a crash left empty (created, never written).
    const std::string empty = "root.hds.{1f0e0d0c-0b0a-4908-8706-050403020100}";
    Put(fs, JoinPath(kDir, empty), "");
    // A file that is not a delta is none of check's business, even empty.
    Put(fs, JoinPath(kDir, "notes.txt"), "not a delta");
    Put(fs, JoinPath(kDir, "empty.txt"), "");
    REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(fs, kDd, /*repair=*/false));
    CHECK_FALSE(report.clean());
    CHECK(report.FirstProblem().find(orphan) != std::string::npos);
    CHECK(*fs.Exists(JoinPath(kDir, orphan)));
    CHECK(report.problems.size() == 2);
    REQUIRE_ASSIGN(report, CheckDisk(fs, kDd, /*repair=*/true));
    CHECK(report.clean());
    REQUIRE(report.problems.size() == 2);
    CHECK(report.problems[0].repaired);
    CHECK(report.problems[1].repaired);
    CHECK_FALSE(*fs.Exists(JoinPath(kDir, orphan)));
    CHECK_FALSE(*fs.Exists(JoinPath(kDir, empty)));
    CHECK(*fs.Exists(JoinPath(kDir, "notes.txt")));
    CHECK(*fs.Exists(JoinPath(kDir, "empty.txt")));
    RequireCleanDisk(fs);
  }

  SUBCASE("an orphan without the snapshot naming pattern is reported, not removed") {
    CreateOptions o;
    o.size_bytes = kSize;
    o.cluster_bytes = kCb;
    {
      REQUIRE_ASSIGN(auto delta, Delta::Create(fs, JoinPath(kDir, "mine.hds"), o));
      REQUIRE_OK(delta->Close());
    }
    REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(fs, kDd, /*repair=*/true));
    CHECK_FALSE(report.clean());
    CHECK(report.FirstProblem().find("mine.hds") != std::string::npos);
    CHECK(*fs.Exists(JoinPath(kDir, "mine.hds")));
  }

  SUBCASE("a missing delta file") {
    Descriptor dd = LoadDd(fs);
    REQUIRE_OK(fs.Remove(dd.FindImage(t.s2)->path));
    REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(fs, kDd, /*repair=*/true));
    CHECK_FALSE(report.clean());
    CHECK(report.FirstProblem().find(t.s2) != std::string::npos);
    CHECK(report.FirstProblem().find("missing") != std::string::npos);
    int missing = 0;
    for (const auto& d : report.deltas) missing += d.missing;
    CHECK(missing == 1);
  }
}

TEST_CASE("snapshot check reports an interrupted merge and FinishInterruptedMerges completes it") {
  MemoryFileSystem mem;
  ThreeLevels t = MakeThreeLevels(mem);
  // Interrupt a real merge of s2 into s1 at its first write after the
  // descriptor marks s1 <Temporary/> (write 1 is the descriptor's .tmp).
  {
    FaultFileSystem fault(mem);
    fault.FailFrom(FaultOp::kWrite, 2, EIO);
    Status s = MergeSnapshot(fault, kDd, t.s2);
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == StatusCode::kIOError);
  }
  Descriptor dd = LoadDd(mem);
  REQUIRE(dd.FindShot(t.s1) != nullptr);
  REQUIRE(dd.FindShot(t.s1)->temporary);
  // The merge only makes s1 go away; the child and the top read the same.
  CHECK(ReadSnapshot(mem, t.s2) == t.s2_data);
  CHECK(ReadSnapshot(mem, "") == t.top_data);
  {
    REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(mem, kDd, /*repair=*/true));
    CHECK_FALSE(report.clean());
    CHECK(report.FirstProblem().find("interrupted") != std::string::npos);
    CHECK(report.FirstProblem().find(t.s1) != std::string::npos);
  }
  REQUIRE_ASSIGN(int finished, FinishInterruptedMerges(mem, kDd));
  CHECK(finished == 1);
  dd = LoadDd(mem);
  CHECK(dd.FindImage(t.s1) == nullptr);
  CHECK(dd.FindImage(t.s2)->file == "root.hds");
  CHECK(ReadSnapshot(mem, t.s2) == t.s2_data);
  CHECK(ReadSnapshot(mem, "") == t.top_data);
  RequireNoStrayFiles(mem);
  RequireCleanDisk(mem);
  REQUIRE_ASSIGN(finished, FinishInterruptedMerges(mem, kDd));
  CHECK(finished == 0);
}

TEST_CASE("every snapshot operation first finishes an interrupted merge") {
  MemoryFileSystem fs;
  ThreeLevels t = MakeThreeLevels(fs);
  Descriptor dd = LoadDd(fs);
  REQUIRE_OK(dd.SetTemporary(t.s1, true));
  REQUIRE_OK(dd.Save(fs));
  REQUIRE_ASSIGN(std::string s3, CreateSnapshot(fs, kDd, ""));
  dd = LoadDd(fs);
  CHECK(dd.FindImage(t.s1) == nullptr);
  CHECK(ChainGuids(dd) == std::vector<std::string>{t.s2, s3, kTop});
  CHECK(ReadSnapshot(fs, t.s2) == t.s2_data);
  CHECK(ReadSnapshot(fs, s3) == t.top_data);
  RequireNoStrayFiles(fs);
  RequireCleanDisk(fs);
}

// --- RestoreDescriptor -----------------------------------------------------

TEST_CASE("snapshot restore-descriptor rebuilds a lost descriptor that opens the same disk") {
  MemoryFileSystem fs;
  TestRng rng;
  bool raw = false;
  uint64_t size = 0;
  uint64_t cluster = 0;
  SUBCASE("ploop image, 64K clusters") {
    size = 100 * 64 * kKiB;
    cluster = 64 * kKiB;
  }
  SUBCASE("raw image whose size only 32K divides") {
    raw = true;
    size = 3 * kMiB + 32 * kKiB;
    cluster = 32 * kKiB;
  }
  CAPTURE(raw);
  MakeDisk(fs, size, raw ? kMiB : cluster, raw ? ImageKind::kRaw : ImageKind::kExpanded);
  WriteTop(fs, 0, rng.Bytes(3 * cluster + 7));
  WriteTop(fs, size - 1000, rng.Bytes(1000));
  const Bytes content = ReadSnapshot(fs, "");
  const Descriptor original = LoadDd(fs);
  REQUIRE_OK(fs.Remove(kDd));
  CHECK(OpenDisk(fs, kDd, "", OpenOptions{}).error().code() == StatusCode::kNotFound);

  REQUIRE_OK(RestoreDescriptor(fs, kDir, kImage, raw));
  Descriptor restored = LoadDd(fs);
  CHECK(restored.top_guid() == kTop);
  REQUIRE(restored.images().size() == 1);
  CHECK(restored.top().file == "root.hds");
  CHECK(restored.top().kind == (raw ? ImageKind::kRaw : ImageKind::kExpanded));
  CHECK(restored.disk_size_bytes() == size);
  CHECK(restored.cluster_bytes() == cluster);
  if (!raw) CHECK(restored == original);
  CHECK(ReadSnapshot(fs, "") == content);
  RequireCleanDisk(fs);
  // A second restore refuses to overwrite it.
  CHECK(RestoreDescriptor(fs, kDir, kImage, raw).code() == StatusCode::kAlreadyExists);
  // The restored disk takes snapshots like any other.
  REQUIRE_ASSIGN(std::string s1, CreateSnapshot(fs, kDd, ""));
  WriteTop(fs, cluster, Pattern(100, 0x77));
  CHECK(ReadSnapshot(fs, s1) == content);
  REQUIRE_OK(MergeAll(fs, kDd));
  Bytes after = content;
  std::memset(after.data() + cluster, 0x77, 100);
  CHECK(ReadSnapshot(fs, "") == after);
  RequireCleanDisk(fs);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
