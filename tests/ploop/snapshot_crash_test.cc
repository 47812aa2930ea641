// Crash tests of the snapshot operations: each runs on a FaultFileSystem
// that cuts the power after its k-th mutating call (k = 0..N, plain and
// torn), then loses the unsynced writes (all, none, or a seeded random
// subset). On the crashed disk, as the next command would:
//   - FinishInterruptedMerges() succeeds and the descriptor loads;
//   - check --repair leaves it clean (orphan deltas removed);
//   - the disk as a whole -- the set of snapshots, their tree and what each
//     reads as -- is the state before the operation or the state after it,
//     never a mix; exactly the state after when the operation returned OK;
//   - the disk takes new writes and snapshots.
//
// The fault file system makes directory operations (create, rename,
// remove) durable at once. A real file system may lose the ones since the
// folder's last fsync; LostDirOpsFileSystem below replays that too: after
// the crash it undoes a suffix of the directory operations not yet made
// durable by SyncDir(), as a journalling file system that commits metadata
// in order would.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "forwarding_file_system.h"
#include "ploop/disk.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/lock.h"
#include "ploop/served_disk.h"
#include "snapshot/online.h"
#include "snapshot/snapshot.h"
#include "snapshot_support.h"
#include "test_support.h"

namespace ploop {
namespace {

using namespace snaptest;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * kKiB;
constexpr uint64_t kSize = 12 * kCb;
// Random-subset crashes per cut point (besides drop-all and keep-all).
constexpr int kRandomCrashes = 8;

const std::string kS1 = "{11111111-1111-4111-8111-111111111111}";
const std::string kS2 = "{22222222-2222-4222-8222-222222222222}";
const std::string kS3 = "{33333333-3333-4333-8333-333333333333}";

// --- Directory operations that a crash may lose ------------------------------

// Wraps a FileSystem and remembers the directory operations (create, rename,
// remove) done since the last SyncDir(); Undo() reverts the newest of them
// on the underlying MemoryFileSystem, as if the crash had come before they
// reached the disk. Files are in one folder here, so one list suffices.
class LostDirOpsFileSystem final : public testing::ForwardingFileSystem {
 public:
  LostDirOpsFileSystem(FileSystem& base, MemoryFileSystem& mem)
      : ForwardingFileSystem(base), mem_(mem) {}

  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override {
    ASSIGN_OR_RETURN(bool existed, base().Exists(path));
    ASSIGN_OR_RETURN(auto file, base().Create(path, exclusive));
    if (!existed) ops_.push_back({Op::kCreate, path, "", {}});
    return file;
  }
  Status Rename(const std::string& from, const std::string& to) override {
    ASSIGN_OR_RETURN(bool replaced, base().Exists(to));
    Bytes old = replaced ? mem_.Contents(to) : Bytes();
    TRY(base().Rename(from, to));
    ops_.push_back({Op::kRename, from, to, replaced ? std::optional<Bytes>(old) : std::nullopt});
    return Status::Ok();
  }
  Status Remove(const std::string& path) override {
    Bytes old = mem_.Contents(path);
    TRY(base().Remove(path));
    ops_.push_back({Op::kRemove, path, "", old});
    return Status::Ok();
  }
  Status SyncDir(const std::string& dir) override {
    TRY(base().SyncDir(dir));
    ops_.clear();
    return Status::Ok();
  }
  size_t pending() const { return ops_.size(); }

  // Reverts the newest `count` pending operations on the memory file
  // system (after the fault file system's Crash()).
  void Undo(size_t count) {
    for (size_t i = 0; i < count && !ops_.empty(); ++i) {
      const DirOp op = ops_.back();
      ops_.pop_back();
      switch (op.kind) {
        case Op::kCreate:
          mem_.Remove(op.path).IgnoreError();
          break;
        case Op::kRename:
          REQUIRE_OK(mem_.Rename(op.to, op.path));
          if (op.old) Put(op.to, *op.old);
          break;
        case Op::kRemove:
          Put(op.path, *op.old);
          break;
      }
    }
    ops_.clear();
  }

 private:
  enum class Op { kCreate, kRename, kRemove };
  struct DirOp {
    Op kind;
    std::string path;
    std::string to;
    std::optional<Bytes> old;  // what a removed or replaced file held
  };
  void Put(const std::string& path, const Bytes& bytes) {
    REQUIRE_ASSIGN(auto file, mem_.Create(path, /*exclusive=*/false));
    REQUIRE_OK(file->WriteAt(0, bytes));
  }

  MemoryFileSystem& mem_;
  std::vector<DirOp> ops_;
};

// --- The state of a disk -----------------------------------------------------

// Every snapshot of a disk: what it reads as and its parent.
struct DiskState {
  std::map<std::string, Bytes> content;
  std::map<std::string, std::string> parent;
  bool operator==(const DiskState&) const = default;
};

DiskState Observe(FileSystem& fs) {
  Descriptor dd = LoadDd(fs);
  DiskState s;
  for (const auto& shot : dd.shots()) {
    s.parent[shot.guid] = shot.parent_guid;
    s.content[shot.guid] = ReadSnapshot(fs, shot.guid);
  }
  return s;
}

std::string Describe(const DiskState& s) {
  std::string out;
  for (const auto& [guid, parent] : s.parent) {
    out += "\n  " + guid.substr(0, 9) + " parent " + parent.substr(0, 9) + " size " +
           std::to_string(s.content.at(guid).size());
  }
  return out;
}

std::string Joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& line : lines) out += "\n  " + line;
  return out;
}

// One operation under test.
struct CrashCase {
  // Builds the disk before the operation, durably, on `mem`.
  std::function<void(MemoryFileSystem& mem)> setup;
  std::function<Status(FileSystem& fs)> op;
  // The disk before and after the operation (what a crash may leave, once
  // interrupted merges are finished).
  DiskState before;
  DiskState after;
  // The setup reads as `before` (not so when the setup is itself a crashed
  // disk that the next command repairs first).
  bool setup_reads_as_before = true;
};

// The checks at the top of the file.
void VerifyCrashed(MemoryFileSystem& mem, const CrashCase& c, bool op_succeeded, bool exercise) {
  REQUIRE_ASSIGN(int finished, FinishInterruptedMerges(mem, kDd));
  (void)finished;
  REQUIRE_ASSIGN(DiskCheckReport repaired, CheckDisk(mem, kDd, /*repair=*/true));
  {
    INFO("check --repair left: " << repaired.FirstProblem());
    REQUIRE(repaired.clean());
  }
  RequireCleanDisk(mem);
  // No delta file is left that the descriptor does not name.
  Descriptor dd = LoadDd(mem);
  std::set<std::string> named = {std::string(kDescriptorFileName),
                                 std::string(kDescriptorFileName) + ".tmp"};
  for (const auto& image : dd.images()) named.insert(image.file);
  for (const auto& [name, bytes] : Files(mem)) {
    INFO("stray file " << name << " (" << bytes.size() << " bytes) after check --repair");
    CHECK(named.count(name) == 1);
  }
  DiskState seen = Observe(mem);
  {
    INFO("the disk after the crash:" << Describe(seen) << "\nbefore:" << Describe(c.before)
                                     << "\nafter:" << Describe(c.after));
    REQUIRE((seen == c.before || seen == c.after));
    if (op_succeeded) REQUIRE(seen == c.after);
  }
  if (!exercise) return;
  // The disk goes on working: a write, a snapshot, a merge of everything.
  WriteTop(mem, kCb, Pattern(kCb, 0x5a));
  Bytes top = seen.content.at(kTop);
  std::memset(top.data() + kCb, 0x5a, kCb);
  REQUIRE(ReadSnapshot(mem, "") == top);
  REQUIRE_OK(CreateSnapshot(mem, kDd, kS3).status());
  REQUIRE(ReadSnapshot(mem, kS3) == top);
  RequireCleanDisk(mem);
}

std::string CrashModeName(CrashMode mode) {
  switch (mode) {
    case CrashMode::kDropAll:
      return "drop-all";
    case CrashMode::kKeepAll:
      return "keep-all";
    case CrashMode::kRandom:
      return "random";
  }
  return "?";
}

// Runs `c` once cleanly to count its mutating calls N and check it reaches
// c.after; then for every cut point k = 0..N, plain and torn, and every
// crash mode: fresh disk, cut, crash (losing, in some runs, directory
// operations not yet synced), verify.
void RunCrashCase(const CrashCase& c, TestRng& rng) {
  uint64_t mutations = 0;
  {
    MemoryFileSystem mem;
    c.setup(mem);
    if (c.setup_reads_as_before) REQUIRE(Observe(mem) == c.before);
    FaultFileSystem fault(mem);
    REQUIRE_OK(c.op(fault));
    mutations = fault.mutation_count();
    VerifyCrashed(mem, c, /*op_succeeded=*/true, /*exercise=*/true);
  }
  REQUIRE(mutations > 0);
  int variant = 0;
  for (bool torn : {false, true}) {
    for (uint64_t k = 0; k <= mutations; ++k) {
      for (int m = 0; m < 2 + kRandomCrashes; ++m) {
        const CrashMode mode = m == 0   ? CrashMode::kDropAll
                               : m == 1 ? CrashMode::kKeepAll
                                        : CrashMode::kRandom;
        const uint64_t seed = mode == CrashMode::kRandom ? rng.engine()() : 0;
        MemoryFileSystem mem;
        c.setup(mem);
        FaultFileSystem fault(mem);
        LostDirOpsFileSystem dirs(fault, mem);
        fault.set_logging(true);
        fault.CutAfter(k, torn);
        Status status = c.op(dirs);
        CAPTURE(k);
        CAPTURE(torn);
        REQUIRE(fault.cut() == (k < mutations));
        const auto log = fault.log();
        REQUIRE_OK(fault.Crash(mode, seed));
        // Directory operations since the last folder sync: kept (as the
        // fault file system assumes), all lost, or the newest half lost.
        const size_t pending = dirs.pending();
        const size_t lost = variant % 3 == 0 ? 0 : variant % 3 == 1 ? pending : pending / 2;
        dirs.Undo(lost);
        INFO("crash mode " << CrashModeName(mode) << " seed " << seed << "; lost " << lost << " of "
                           << pending << " unsynced directory operations");
        INFO("operation returned: " << status.ToString());
        INFO("operations before the crash:" << Joined(log));
        // An operation that returned OK made its descriptor durable; what
        // comes after (removing a file) may be lost but changes no state.
        VerifyCrashed(mem, c, status.ok(), variant % 4 == 0);
        ++variant;
      }
    }
  }
}

// --- Building disks ----------------------------------------------------------

// The base (S1 once snapshotted) holds clusters 0-5; the writes after it
// touch some of those and new ones.
void WriteBase(FileSystem& fs) {
  WriteTop(fs, 0, Pattern(6 * kCb, 0xa1));
  WriteTop(fs, 11 * kCb + 100, Pattern(300, 0xa2));
}

DiskState StateOf(std::initializer_list<std::tuple<std::string, std::string, Bytes>> shots) {
  DiskState s;
  for (const auto& [guid, parent, content] : shots) {
    s.parent[guid] = parent;
    s.content[guid] = content;
  }
  return s;
}

Bytes With(Bytes b, uint64_t offset, uint64_t length, uint8_t value) {
  if (b.size() < offset + length) b.resize(offset + length);
  std::memset(b.data() + offset, value, length);
  return b;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("snapshot crash: create") {
  TestRng rng;
  const Bytes base = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes top = With(base, 2 * kCb, kCb + 10, 0xb1);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, 2 * kCb, Pattern(kCb + 10, 0xb1));
  };
  c.op = [&](FileSystem& fs) { return CreateSnapshot(fs, kDd, kS2).status(); };
  c.before = StateOf({{kS1, kNull, base}, {kTop, kS1, top}});
  c.after = StateOf({{kS1, kNull, base}, {kS2, kS1, top}, {kTop, kS2, top}});
  RunCrashCase(c, rng);
}

// A chain whose s2 grew past its parent s1: s1 has 12 clusters with data;
// s2 is resized to 20 clusters, with data over s1's and past its end and
// zeros (a discard) over s1's data; the top adds a little more.
struct GrowingParent {
  const uint64_t big = kSize + 8 * kCb;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes s2_content = [&] {
    Bytes b = s1;
    b.resize(big);
    b = With(b, 4 * kCb, 3 * kCb, 0xb2);       // over s1's clusters 4-5, and 6
    b = With(b, 15 * kCb + 7, 2 * kCb, 0xb3);  // past s1's end
    return With(b, 1 * kCb, kCb, 0x00);        // zeros over s1's data
  }();
  const Bytes top = With(s2_content, 8 * kCb, kCb, 0xc4);

  void Setup(MemoryFileSystem& mem) const {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    REQUIRE_OK(ResizeDisk(mem, kDd, big));
    WriteTop(mem, 4 * kCb, Pattern(3 * kCb, 0xb2));
    WriteTop(mem, 15 * kCb + 7, Pattern(2 * kCb, 0xb3));
    auto chain = OpenTop(mem);
    REQUIRE_OK(chain->Discard(1 * kCb, kCb));
    REQUIRE_OK(chain->Close());
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS2).status());
    WriteTop(mem, 8 * kCb, Pattern(kCb, 0xc4));
  }
  DiskState Before() const {
    return StateOf({{kS1, kNull, s1}, {kS2, kS1, s2_content}, {kTop, kS2, top}});
  }
};

TEST_CASE("snapshot crash: merge of a child into a parent that grows") {
  TestRng rng;
  const GrowingParent g;
  const Bytes& s1 = g.s1;
  const Bytes& s2_content = g.s2_content;
  const Bytes& top = g.top;
  bool merge_top = false;
  SUBCASE("s2 into s1 (merge -u)") {}
  SUBCASE("the top into s2 (merge)") { merge_top = true; }
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) { g.Setup(mem); };
  c.before = g.Before();
  if (merge_top) {
    c.op = [&](FileSystem& fs) { return MergeSnapshot(fs, kDd, ""); };
    c.after = StateOf({{kS1, kNull, s1}, {kTop, kS1, top}});
  } else {
    c.op = [&](FileSystem& fs) { return MergeSnapshot(fs, kDd, kS2); };
    c.after = StateOf({{kS2, kNull, s2_content}, {kTop, kS2, top}});
  }
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: delete of a leaf") {
  TestRng rng;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes s2 = With(s1, 7 * kCb, 2 * kCb, 0xb1);
  const Bytes top = With(s1, 3 * kCb, 100, 0xc1);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, 7 * kCb, Pattern(2 * kCb, 0xb1));
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS2).status());
    REQUIRE_OK(SwitchSnapshot(mem, kDd, kS1));  // s1 <- {s2, top}
    WriteTop(mem, 3 * kCb, Pattern(100, 0xc1));
  };
  c.op = [&](FileSystem& fs) { return DeleteSnapshot(fs, kDd, kS2); };
  c.before = StateOf({{kS1, kNull, s1}, {kS2, kS1, s2}, {kTop, kS1, top}});
  c.after = StateOf({{kS1, kNull, s1}, {kTop, kS1, top}});
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: delete of a snapshot with one child") {
  TestRng rng;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes s2 = With(With(s1, 5 * kCb, 2 * kCb, 0xb1), 0, kCb, 0x00);
  const Bytes top = With(With(s2, 6 * kCb + 5, 10, 0xc1), 9 * kCb, kCb, 0xc2);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, 5 * kCb, Pattern(2 * kCb, 0xb1));
    WriteTop(mem, 0, Pattern(kCb, 0x00));
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS2).status());
    WriteTop(mem, 6 * kCb + 5, Pattern(10, 0xc1));
    WriteTop(mem, 9 * kCb, Pattern(kCb, 0xc2));
  };
  // s2 has one child, the top: the top is merged into s2's file.
  c.op = [&](FileSystem& fs) { return DeleteSnapshot(fs, kDd, kS2); };
  c.before = StateOf({{kS1, kNull, s1}, {kS2, kS1, s2}, {kTop, kS2, top}});
  c.after = StateOf({{kS1, kNull, s1}, {kTop, kS1, top}});
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: switch") {
  TestRng rng;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes s2 = With(s1, 7 * kCb, 2 * kCb, 0xb1);
  const Bytes top = With(s2, 3 * kCb, 100, 0xc1);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, 7 * kCb, Pattern(2 * kCb, 0xb1));
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS2).status());
    WriteTop(mem, 3 * kCb, Pattern(100, 0xc1));
  };
  c.op = [&](FileSystem& fs) { return SwitchSnapshot(fs, kDd, kS1); };
  c.before = StateOf({{kS1, kNull, s1}, {kS2, kS1, s2}, {kTop, kS2, top}});
  c.after = StateOf({{kS1, kNull, s1}, {kS2, kS1, s2}, {kTop, kS1, s1}});
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: finishing an interrupted merge") {
  TestRng rng;
  const uint64_t big = kSize + 8 * kCb;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  Bytes s2 = s1;
  s2.resize(big);
  s2 = With(s2, 3 * kCb, 5 * kCb, 0xb2);
  s2 = With(s2, 14 * kCb, 3 * kCb, 0xb3);
  const Bytes top = With(s2, 0, 10, 0xc1);
  auto build = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    REQUIRE_OK(ResizeDisk(mem, kDd, big));
    WriteTop(mem, 3 * kCb, Pattern(5 * kCb, 0xb2));
    WriteTop(mem, 14 * kCb, Pattern(3 * kCb, 0xb3));
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS2).status());
    WriteTop(mem, 0, Pattern(10, 0xc1));
  };
  // How many writes a whole merge of s2 into s1 makes.
  uint64_t merge_writes = 0;
  {
    MemoryFileSystem mem;
    build(mem);
    FaultFileSystem fault(mem);
    fault.set_logging(true);
    REQUIRE_OK(MergeSnapshot(fault, kDd, kS2));
    for (const auto& line : fault.log()) merge_writes += line.rfind("write ", 0) == 0;
  }
  REQUIRE(merge_writes > 4);
  uint64_t fail_at = 0;
  SUBCASE("interrupted early in the copy") { fail_at = 3; }
  SUBCASE("interrupted halfway") { fail_at = merge_writes / 2; }
  SUBCASE("interrupted at the descriptor's final save") { fail_at = merge_writes; }
  CAPTURE(fail_at);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    build(mem);
    FaultFileSystem fault(mem);
    fault.FailFrom(FaultOp::kWrite, fail_at, EIO);
    REQUIRE_FALSE(MergeSnapshot(fault, kDd, kS2).ok());
    // What the crash left: s1 marked as being merged into.
    Descriptor dd = LoadDd(mem);
    REQUIRE(dd.FindShot(kS1) != nullptr);
    REQUIRE(dd.FindShot(kS1)->temporary);
  };
  c.op = [&](FileSystem& fs) { return FinishInterruptedMerges(fs, kDd).status(); };
  // s1 is half merged and is never seen again: the next command finishes
  // the merge whatever the crash left.
  c.after = StateOf({{kS2, kNull, s2}, {kTop, kS2, top}});
  c.before = c.after;
  {
    // The setup's state, once finished, is the state after.
    MemoryFileSystem mem;
    c.setup(mem);
    REQUIRE_OK(FinishInterruptedMerges(mem, kDd).status());
    REQUIRE(Observe(mem) == c.after);
  }
  c.setup_reads_as_before = false;
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: resize") {
  TestRng rng;
  const Bytes s1 = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes top = With(s1, kSize - 10, 10, 0xc1);
  Bytes grown = top;
  grown.resize(4 * kSize);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, kSize - 10, Pattern(10, 0xc1));
  };
  c.op = [&](FileSystem& fs) { return ResizeDisk(fs, kDd, 4 * kSize); };
  c.before = StateOf({{kS1, kNull, s1}, {kTop, kS1, top}});
  c.after = StateOf({{kS1, kNull, s1}, {kTop, kS1, grown}});
  RunCrashCase(c, rng);
}

// Serves the disk (as the mount daemon does: the top writable, marked in
// use) while `fn` runs an online operation on it, then closes it.
Status Served(FileSystem& fs, const std::function<Status(ServedDisk&)>& fn) {
  OpenOptions o;
  o.writable = true;
  ASSIGN_OR_RETURN(auto chain, OpenDisk(fs, kDd, "", o));
  ASSIGN_OR_RETURN(auto disk, ServedDisk::Create(std::move(chain)));
  Status s = fn(*disk);
  Status closed = disk->Close();
  return s.ok() ? closed : s;
}

TEST_CASE("snapshot crash: online create on a served disk") {
  TestRng rng;
  const Bytes base = With(With(Bytes(kSize), 0, 6 * kCb, 0xa1), 11 * kCb + 100, 300, 0xa2);
  const Bytes top = With(base, 2 * kCb, kCb + 10, 0xb1);
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) {
    MakeDisk(mem, kSize, kCb);
    WriteBase(mem);
    REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
    WriteTop(mem, 2 * kCb, Pattern(kCb + 10, 0xb1));
  };
  c.op = [&](FileSystem& fs) {
    return Served(fs, [&](ServedDisk& disk) -> Status {
      ASSIGN_OR_RETURN(PreparedSnapshot p, PrepareSnapshot(fs, kDd, kS2, disk.size_bytes()));
      ASSIGN_OR_RETURN(auto images, SwitchToSnapshot(fs, disk, p));
      if (images.size() != 3) return Status::Corruption("served layers after the switch");
      return Status::Ok();
    });
  };
  c.before = StateOf({{kS1, kNull, base}, {kTop, kS1, top}});
  c.after = StateOf({{kS1, kNull, base}, {kS2, kS1, top}, {kTop, kS2, top}});
  RunCrashCase(c, rng);
}

TEST_CASE("snapshot crash: online merge below the top of a served disk, the parent growing") {
  TestRng rng;
  const GrowingParent g;
  const Bytes& s2_content = g.s2_content;
  const Bytes& top = g.top;
  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem) { g.Setup(mem); };
  c.before = g.Before();
  c.after = StateOf({{kS2, kNull, s2_content}, {kTop, kS2, top}});
  c.op = [&](FileSystem& fs) {
    return Served(fs, [&](ServedDisk& disk) -> Status {
      ASSIGN_OR_RETURN(auto images, MergeServedSnapshot(fs, kDd, disk, kS2));
      if (images.size() != 2) return Status::Corruption("served layers after the merge");
      // The served disk reads the same after the merge.
      Bytes now(disk.size_bytes());
      TRY(disk.Read(0, now));
      if (now != top) return Status::Corruption("the served disk changed in the merge");
      return Status::Ok();
    });
  };
  RunCrashCase(c, rng);
}

TEST_CASE("online merge refuses the top - a base - an unknown snapshot - and the disk serves on") {
  MemoryFileSystem mem;
  MakeDisk(mem, kSize, kCb);
  WriteBase(mem);
  REQUIRE_OK(CreateSnapshot(mem, kDd, kS1).status());
  WriteTop(mem, 2 * kCb, Pattern(kCb, 0xb1));
  const Bytes top = ReadSnapshot(mem, "");
  REQUIRE_OK(Served(mem, [&](ServedDisk& disk) -> Status {
    auto r = MergeServedSnapshot(mem, kDd, disk, kTop);
    CHECK(r.error().code() == StatusCode::kFailedPrecondition);
    r = MergeServedSnapshot(mem, kDd, disk, kS1);
    CHECK(r.error().code() == StatusCode::kFailedPrecondition);  // the base
    r = MergeServedSnapshot(mem, kDd, disk, kS3);
    CHECK(r.error().code() == StatusCode::kNotFound);
    Bytes now(disk.size_bytes());
    TRY(disk.Read(0, now));
    CHECK(now == top);
    return disk.Write(0, Pattern(100, 0x77));
  }));
  CHECK(ReadSnapshot(mem, "") == With(top, 0, 100, 0x77));
  RequireCleanDisk(mem);
}

// Passes everything to `base`; when a file is renamed over the descriptor
// (its atomic save), first runs `on_save` -- a moment in the middle of an
// online snapshot or merge.
class SaveHookFileSystem final : public testing::ForwardingFileSystem {
 public:
  SaveHookFileSystem(FileSystem& base, std::function<void()> on_save)
      : ForwardingFileSystem(base), on_save_(std::move(on_save)) {}
  Status Rename(const std::string& from, const std::string& to) override {
    if (to == kDd) on_save_();
    return base().Rename(from, to);
  }

 private:
  std::function<void()> on_save_;
};

// What another program gets when it tries to open `path` for writing now.
StatusCode WriterLockOn(FileSystem& fs, const std::string& path) {
  auto file = fs.Open(path, OpenMode::kReadWrite);
  REQUIRE_OK(file.status());
  return LockImage(**file, /*writable=*/true).code();
}

// The layer that turns read-only (the old top of an online snapshot, the
// parent of an online merge) stays locked against writers while the
// descriptor is saved: its writable open is closed by then, its read-only
// one not yet made.
TEST_CASE("online snapshot and merge: the layer turning read-only is never open to writers") {
  MemoryFileSystem mem;
  const GrowingParent g;
  g.Setup(mem);
  {
    const std::string old_top = LoadDd(mem, kDd).top().path;
    std::vector<StatusCode> seen;
    SaveHookFileSystem fs(mem, [&] { seen.push_back(WriterLockOn(mem, old_top)); });
    REQUIRE_OK(Served(fs, [&](ServedDisk& disk) -> Status {
      ASSIGN_OR_RETURN(PreparedSnapshot p, PrepareSnapshot(fs, kDd, kS3, disk.size_bytes()));
      return SwitchToSnapshot(fs, disk, p).status();
    }));
    REQUIRE(!seen.empty());
    for (StatusCode code : seen) CHECK(code == StatusCode::kBusy);
  }
  {
    const std::string parent = LoadDd(mem, kDd).FindImage(kS1)->path;
    std::vector<StatusCode> seen;
    SaveHookFileSystem fs(mem, [&] { seen.push_back(WriterLockOn(mem, parent)); });
    REQUIRE_OK(Served(fs, [&](ServedDisk& disk) -> Status {
      return MergeServedSnapshot(fs, kDd, disk, kS2).status();
    }));
    REQUIRE(!seen.empty());
    for (StatusCode code : seen) CHECK(code == StatusCode::kBusy);
  }
  RequireCleanDisk(mem);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
