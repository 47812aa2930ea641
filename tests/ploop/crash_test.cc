// Crash tests: each image operation runs on a FaultFileSystem that cuts the
// power after its k-th mutating call (k = 0..N, plain and torn), then drops
// the unsynced writes (all of them, none, or a seeded random subset, which
// is what exposes metadata written before the data it points at). The
// crashed image is then reopened on a fault-free file system and must
//   - give check nothing worse than leaks and the dirty marker,
//   - read, unit by unit, as the disk before the operation or after it
//     (untouched data exactly as before), and exactly as after when the
//     operation returned OK,
//   - read the same after the repair a writable open runs,
//   - take new writes, close clean and read them back.
#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "ploop/check.h"
#include "ploop/convert.h"
#include "ploop/delta.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
// Random-subset crashes per cut point (besides drop-all and keep-all).
constexpr int kRandomCrashes = 16;
// Disks up to this size are read whole; bigger ones cluster by cluster.
constexpr uint64_t kFullReadBytes = 16 * kMiB;
constexpr char kImagePath[] = "img.hds";

// The content of a virtual disk: its size and the clusters that hold
// anything but zeros. Copies share cluster storage until they are written,
// which keeps the thousands of models a crash test builds cheap.
class DiskModel {
 public:
  DiskModel(uint64_t size_bytes, uint64_t cluster_bytes)
      : size_bytes_(size_bytes),
        cluster_bytes_(cluster_bytes),
        zeros_(std::make_shared<const Bytes>(cluster_bytes)) {}

  uint64_t size_bytes() const { return size_bytes_; }
  uint64_t cluster_bytes() const { return cluster_bytes_; }
  uint64_t cluster_count() const { return size_bytes_ / cluster_bytes_; }

  void Write(uint64_t offset, std::span<const std::byte> data) {
    REQUIRE(offset + data.size() <= size_bytes_);
    const uint64_t cb = cluster_bytes_;
    for (uint64_t pos = 0; pos < data.size();) {
      uint64_t index = (offset + pos) / cb;
      uint64_t in = (offset + pos) % cb;
      uint64_t n = std::min<uint64_t>(cb - in, data.size() - pos);
      auto piece = data.subspan(pos, n);
      pos += n;
      auto it = clusters_.find(index);
      if (it == clusters_.end() && IsZero(piece)) continue;
      auto cluster = std::make_shared<Bytes>(Cluster(index).begin(), Cluster(index).end());
      std::memcpy(cluster->data() + in, piece.data(), n);
      if (IsZero(*cluster)) {
        clusters_.erase(index);
      } else {
        clusters_[index] = std::move(cluster);
      }
    }
  }
  void Zero(uint64_t offset, uint64_t length) { Write(offset, Bytes(length)); }
  void Resize(uint64_t size_bytes) {
    size_bytes_ = size_bytes;
    clusters_.erase(clusters_.lower_bound(cluster_count()), clusters_.end());
  }
  // Makes cluster `index` of this model the same as that of `other`,
  // sharing its storage.
  void CopyCluster(const DiskModel& other, uint64_t index) {
    auto it = other.clusters_.find(index);
    if (it == other.clusters_.end()) {
      clusters_.erase(index);
    } else {
      clusters_[index] = it->second;
    }
  }

  // The bytes of cluster `index`.
  std::span<const std::byte> Cluster(uint64_t index) const {
    auto it = clusters_.find(index);
    return it == clusters_.end() ? *zeros_ : *it->second;
  }
  std::set<uint64_t> Indices() const {
    std::set<uint64_t> out;
    for (const auto& [index, bytes] : clusters_) out.insert(index);
    return out;
  }
  bool operator==(const DiskModel& other) const {
    if (size_bytes_ != other.size_bytes_ || cluster_bytes_ != other.cluster_bytes_ ||
        clusters_.size() != other.clusters_.size()) {
      return false;
    }
    for (auto a = clusters_.begin(), b = other.clusters_.begin(); a != clusters_.end(); ++a, ++b) {
      if (a->first != b->first ||
          (a->second != b->second &&
           std::memcmp(a->second->data(), b->second->data(), cluster_bytes_) != 0)) {
        return false;
      }
    }
    return true;
  }

 private:
  using Bytes = std::vector<std::byte>;
  uint64_t size_bytes_;
  uint64_t cluster_bytes_;
  std::map<uint64_t, std::shared_ptr<const Bytes>> clusters_;
  std::shared_ptr<const Bytes> zeros_;
};

std::set<uint64_t> Union(const std::set<uint64_t>& a, const std::set<uint64_t>& b) {
  std::set<uint64_t> out = a;
  out.insert(b.begin(), b.end());
  return out;
}

// What `image` reads as: every cluster of a small disk; of a big one the
// clusters that are allocated or hold data in one of `known` (an
// unallocated cluster reads as zeros by the IsAllocated() contract). A
// cluster that reads as in one of `known` shares its storage.
DiskModel ReadDisk(Image& image, std::initializer_list<const DiskModel*> known) {
  const uint64_t cb = image.cluster_bytes();
  const bool whole = image.size_bytes() <= kFullReadBytes;
  std::set<uint64_t> named;
  for (const DiskModel* model : known) named = Union(named, model->Indices());
  DiskModel seen(image.size_bytes(), cb);
  std::vector<std::byte> buf(cb);
  for (uint64_t c = 0; c < seen.cluster_count(); ++c) {
    if (!whole && !named.count(c)) {
      REQUIRE_ASSIGN(bool allocated, image.IsAllocated(c));
      if (!allocated) continue;
    }
    REQUIRE_OK(image.Read(c * cb, buf));
    auto same = std::find_if(known.begin(), known.end(), [&](const DiskModel* model) {
      return c < model->cluster_count() &&
             std::memcmp(model->Cluster(c).data(), buf.data(), cb) == 0;
    });
    if (same != known.end()) {
      seen.CopyCluster(**same, c);
    } else {
      seen.Write(c * cb, buf);
    }
  }
  return seen;
}

// Each `unit_bytes` piece of `seen` reads wholly as `before` or wholly as
// `after`; the clusters in `atomic_clusters` as a whole.
void RequireBeforeOrAfter(const DiskModel& seen, const DiskModel& before, const DiskModel& after,
                          uint64_t unit_bytes, const std::set<uint64_t>& atomic_clusters) {
  REQUIRE((seen.size_bytes() == before.size_bytes() || seen.size_bytes() == after.size_bytes()));
  const uint64_t cb = seen.cluster_bytes();
  for (uint64_t index : Union(seen.Indices(), Union(before.Indices(), after.Indices()))) {
    if (index >= seen.cluster_count()) continue;
    auto got = seen.Cluster(index);
    auto old_bytes = before.Cluster(index);
    auto new_bytes = after.Cluster(index);
    const uint64_t unit = atomic_clusters.count(index) ? cb : unit_bytes;
    for (uint64_t u = 0; u < cb; u += unit) {
      bool is_old = std::memcmp(got.data() + u, old_bytes.data() + u, unit) == 0;
      bool is_new = std::memcmp(got.data() + u, new_bytes.data() + u, unit) == 0;
      INFO("disk offset " << index * cb + u << " (cluster " << index << ") reads as neither "
                          << "the state before the operation nor the state after it");
      REQUIRE((is_old || is_new));
    }
  }
}

// What a crashed image may read as.
struct Outcome {
  const DiskModel* before;
  const DiskModel* after;
  uint64_t unit_bytes;
  std::set<uint64_t> atomic_clusters;
  // False when the image before the operation itself needs a repair to
  // open (the operation is the repair).
  bool opens_unrepaired = true;
};

std::unique_ptr<Image> OpenOrFail(FileSystem& fs, const std::string& path, bool writable) {
  OpenOptions options;
  options.writable = writable;
  auto image = OpenImage(fs, path, options);
  REQUIRE_OK(image);
  return std::move(image).value();
}

CheckReport CheckFile(FileSystem& fs, const std::string& path, bool repair) {
  auto file = fs.Open(path, repair ? OpenMode::kReadWrite : OpenMode::kReadOnly);
  REQUIRE_OK(file);
  auto report = CheckImage(**file, repair);
  REQUIRE_OK(report);
  return std::move(report).value();
}

std::string ProblemList(const CheckReport& report) {
  std::string out;
  for (const auto& p : report.problems) out += "\n  " + p.message;
  return out;
}

// Writes a few things a user would write next and records them in `model`.
void WriteAfterCrash(Image& image, DiskModel& model) {
  const uint64_t cb = image.cluster_bytes();
  const uint64_t middle = image.size_bytes() / cb / 2 * cb;
  auto crossing = Pattern(3000, 0x5a);
  REQUIRE_OK(image.Write(middle - 1000, crossing));
  model.Write(middle - 1000, crossing);
  auto tail = Pattern(512, 0xa5);
  REQUIRE_OK(image.Write(image.size_bytes() - 512, tail));
  model.Write(image.size_bytes() - 512, tail);
  auto whole = Pattern(cb, 0x3c);
  REQUIRE_OK(image.Write(cb, whole));
  model.Write(cb, whole);
}

// The checks listed at the top of the file, on the crashed `path`.
void VerifyCrashedImage(MemoryFileSystem& fs, const std::string& path, const Outcome& outcome,
                        bool op_succeeded, bool explicit_repair) {
  CheckReport report = CheckFile(fs, path, /*repair=*/false);
  {
    INFO("check of the crashed image:" << ProblemList(report));
    REQUIRE(report.header_valid);
    // The clean marker promises a closed, consistent image: not even a leak.
    if (!report.was_dirty) REQUIRE(report.problems.empty());
  }
  std::optional<DiskModel> unrepaired;
  if (outcome.opens_unrepaired) {
    INFO("check of the crashed image:" << ProblemList(report));
    REQUIRE(report.unlisted_problems == 0);
    for (const auto& p : report.problems) {
      bool dirty_marker = p.message.find("not closed cleanly") != std::string::npos;
      REQUIRE((p.severity == CheckProblem::Severity::kLeak || dirty_marker));
    }
    auto image = OpenOrFail(fs, path, /*writable=*/false);
    unrepaired = ReadDisk(*image, {outcome.before, outcome.after});
    RequireBeforeOrAfter(*unrepaired, *outcome.before, *outcome.after, outcome.unit_bytes,
                         outcome.atomic_clusters);
    if (op_succeeded) REQUIRE(*unrepaired == *outcome.after);
  }
  if (explicit_repair) {
    report = CheckFile(fs, path, /*repair=*/true);
    INFO("check --repair of the crashed image:" << ProblemList(report));
    REQUIRE(report.clean());
  }
  // A writable open repairs a dirty image itself.
  auto image = OpenOrFail(fs, path, /*writable=*/true);
  DiskModel seen = ReadDisk(*image, {outcome.before, outcome.after});
  if (unrepaired) {
    INFO("the repair changed what the disk reads");
    REQUIRE(seen == *unrepaired);
  } else {
    RequireBeforeOrAfter(seen, *outcome.before, *outcome.after, outcome.unit_bytes,
                         outcome.atomic_clusters);
    if (op_succeeded) REQUIRE(seen == *outcome.after);
  }
  WriteAfterCrash(*image, seen);
  REQUIRE_OK(image->Close());
  image.reset();
  report = CheckFile(fs, path, /*repair=*/false);
  INFO("check after writing to the repaired image:" << ProblemList(report));
  REQUIRE(report.problems.empty());
  image = OpenOrFail(fs, path, /*writable=*/false);
  REQUIRE(ReadDisk(*image, {&seen}) == seen);
}

// One operation under test.
struct CrashCase {
  // Builds the state before the operation, as a rule directly on `mem` so
  // that it is all durable, and returns the image the operation works on,
  // opened through `fault`, or null for operations that open files
  // themselves.
  std::function<std::unique_ptr<Image>(MemoryFileSystem& mem, FileSystem& fault)> setup;
  // The operation; fails once the power is cut.
  std::function<Status(FileSystem& fault, Image* image)> op;
  // Checks the state after a crash (or, for the first run, after the
  // operation and a clean close). `variant` varies incidental choices.
  std::function<void(MemoryFileSystem& mem, bool op_succeeded, int variant)> verify;
};

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

std::string Joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& line : lines) out += "\n  " + line;
  return out;
}

// Runs `c` once to count its mutating calls N, then for every cut point
// k = 0..N, plain and torn, and every crash mode: fresh state, cut, crash,
// verify.
void RunCrashCase(const CrashCase& c, TestRng& rng) {
  uint64_t mutations = 0;
  {
    MemoryFileSystem mem;
    FaultFileSystem fault(mem);
    auto image = c.setup(mem, fault);
    const uint64_t start = fault.mutation_count();
    REQUIRE_OK(c.op(fault, image.get()));
    mutations = fault.mutation_count() - start;
    if (image) REQUIRE_OK(image->Close());
    image.reset();
    c.verify(mem, /*op_succeeded=*/true, 0);
  }
  REQUIRE(mutations > 0);
  int variant = 0;
  for (bool torn : {false, true}) {
    for (uint64_t k = 0; k <= mutations; ++k) {
      for (int m = 0; m < 2 + kRandomCrashes; ++m) {
        CrashMode mode = m == 0   ? CrashMode::kDropAll
                         : m == 1 ? CrashMode::kKeepAll
                                  : CrashMode::kRandom;
        uint64_t seed = mode == CrashMode::kRandom ? rng.engine()() : 0;
        MemoryFileSystem mem;
        FaultFileSystem fault(mem);
        auto image = c.setup(mem, fault);
        fault.set_logging(true);
        fault.CutAfter(k, torn);
        Status status = c.op(fault, image.get());
        CAPTURE(k);
        CAPTURE(torn);
        // The operation repeats the counted run's calls up to the cut, so
        // the cut is reached exactly when k < N.
        REQUIRE(fault.cut() == (k < mutations));
        // Closing after the cut fails, so nothing more reaches the file.
        image.reset();
        auto log = fault.log();
        REQUIRE_OK(fault.Crash(mode, seed));
        INFO("crash mode " << CrashModeName(mode) << " seed " << seed);
        INFO("operation returned: " << status.ToString());
        INFO("operations before the crash:" << Joined(log));
        c.verify(mem, status.ok(), variant++);
      }
    }
  }
}

// Creates an image on `fs`.
std::unique_ptr<Image> CreateOn(FileSystem& fs, uint64_t size, uint64_t cluster, ImageKind kind,
                                const std::string& path = kImagePath) {
  CreateOptions options;
  options.size_bytes = size;
  options.cluster_bytes = cluster;
  options.kind = kind;
  auto image = CreateImage(fs, path, options);
  REQUIRE_OK(image);
  return std::move(image).value();
}

// Fills file cluster `file_cluster` of `path` with stale bytes, as a file
// system without hole punching would leave a freed cluster.
void Scribble(MemoryFileSystem& mem, uint64_t file_cluster, uint64_t cluster_bytes,
              const std::string& path = kImagePath) {
  auto file = mem.Open(path, OpenMode::kReadWrite);
  REQUIRE_OK(file);
  REQUIRE_OK((*file)->WriteAt(file_cluster * cluster_bytes, Pattern(cluster_bytes, 0xee)));
}

// A write of `data` at `offset_bytes`.
struct Piece {
  uint64_t offset_bytes;
  std::vector<std::byte> data;
};

TEST_SUITE_BEGIN("unit");
TEST_CASE("crash during writes that allocate new clusters - then flush") {
  TestRng rng;
  uint64_t cb = 0;
  bool same_session = false;
  SUBCASE("32K clusters, fresh session") { cb = 32 * kKiB; }
  SUBCASE("64K clusters, fresh session") { cb = 64 * kKiB; }
  SUBCASE("32K clusters, the setup's session continues") {
    cb = 32 * kKiB;
    same_session = true;
  }
  CAPTURE(cb);
  CAPTURE(same_session);
  const uint64_t size = 64 * cb;

  // Before: clusters 0-3, a partial cluster 10, a write across 20-21;
  // cluster 2 is discarded again, so its file cluster (3) is free and is
  // the first the operation reuses -- holding stale bytes.
  std::vector<Piece> setup_writes = {
      {0, rng.Bytes(4 * cb)}, {10 * cb + 100, rng.Bytes(5000)}, {20 * cb + 1000, rng.Bytes(cb)}};
  // The operation: a partial cluster (into the reused one, so the rest of
  // it must be zeroed), a whole one, a write across two new clusters, a
  // four-cluster write whose third cluster is zeros, zeros alone, the last
  // cluster; flush; one more write; flush.
  auto four = rng.Bytes(4 * cb);
  std::memset(four.data() + 2 * cb, 0, cb);
  std::vector<Piece> first_writes = {{31 * cb + 512, rng.Bytes(1000)}, {30 * cb, rng.Bytes(cb)},
                                     {40 * cb - 700, rng.Bytes(1400)}, {44 * cb, four},
                                     {50 * cb, Pattern(cb, 0)},        {63 * cb, rng.Bytes(cb)}};
  std::vector<Piece> second_writes = {{55 * cb + 3000, rng.Bytes(2000)}};

  DiskModel before(size, cb);
  for (const auto& w : setup_writes) before.Write(w.offset_bytes, w.data);
  before.Zero(2 * cb, cb);
  DiskModel after = before;
  for (const auto& w : first_writes) after.Write(w.offset_bytes, w.data);
  for (const auto& w : second_writes) after.Write(w.offset_bytes, w.data);

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    auto image = CreateOn(same_session ? static_cast<FileSystem&>(fault) : mem, size, cb,
                          ImageKind::kExpanded);
    for (const auto& w : setup_writes) REQUIRE_OK(image->Write(w.offset_bytes, w.data));
    REQUIRE_OK(image->Discard(2 * cb, cb));
    REQUIRE_OK(image->Flush());
    // In the same session the hole punched into the freed cluster is not
    // yet durable, so a crash brings cluster 2's old bytes back into it.
    if (same_session) return image;
    REQUIRE_OK(image->Close());
    Scribble(mem, 3, cb);
    return OpenOrFail(fault, kImagePath, /*writable=*/true);
  };
  c.op = [&](FileSystem&, Image* image) -> Status {
    for (const auto& w : first_writes) TRY(image->Write(w.offset_bytes, w.data));
    TRY(image->Flush());
    for (const auto& w : second_writes) TRY(image->Write(w.offset_bytes, w.data));
    return image->Flush();
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    // A new cluster appears whole or not at all.
    Outcome outcome{&before, &after, cb, {}};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during overwrites and discards - then flush") {
  TestRng rng;
  uint64_t cb = 0;
  ImageKind kind = ImageKind::kExpanded;
  SUBCASE("expanded, 32K clusters") { cb = 32 * kKiB; }
  SUBCASE("expanded, 64K clusters") { cb = 64 * kKiB; }
  SUBCASE("preallocated, 32K clusters") {
    cb = 32 * kKiB;
    kind = ImageKind::kPreallocated;
  }
  CAPTURE(cb);
  CAPTURE(ImageKindName(kind));
  const uint64_t size = 32 * cb;
  // Cluster 30 stays a hole: an expanded image with every cluster in order
  // has an identity BAT and reopens as preallocated.
  auto initial = rng.Bytes(size);
  std::memset(initial.data() + 30 * cb, 0, cb);

  // Overwrites in place (sector-aligned, one across five clusters), whole
  // and partial discards, zeros written over data, and last a write to the
  // one unallocated cluster, which must not reuse a cluster discarded in
  // the same flush. No two touch the same bytes, so each sector has one
  // old and one new value.
  std::vector<Piece> writes = {{cb + 512, rng.Bytes(4096)},
                               {4 * cb - 1024, rng.Bytes(3 * cb + 2048)},
                               {21 * cb + 4096, Pattern(4096, 0)},
                               {24 * cb + 1536, rng.Bytes(cb)},
                               {30 * cb, rng.Bytes(cb)}};
  std::vector<std::pair<uint64_t, uint64_t>> discards = {
      {10 * cb, cb}, {12 * cb, 2 * cb}, {15 * cb + 1024, 8192}, {17 * cb + cb / 2, 2 * cb}};

  DiskModel before(size, cb);
  before.Write(0, initial);
  DiskModel after = before;
  for (const auto& w : writes) after.Write(w.offset_bytes, w.data);
  for (auto [offset, length] : discards) after.Zero(offset, length);
  // An expanded image unmaps wholly discarded clusters: one BAT entry each,
  // so they read all old or all zeros. Everything else changes in place,
  // sector by sector.
  std::set<uint64_t> atomic;
  if (kind == ImageKind::kExpanded) atomic = {10, 12, 13, 18, 30};

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    auto image = CreateOn(mem, size, cb, kind);
    REQUIRE_OK(image->Write(0, initial));
    REQUIRE_OK(image->Close());
    auto reopened = OpenOrFail(fault, kImagePath, /*writable=*/true);
    REQUIRE(reopened->kind() == kind);
    return reopened;
  };
  c.op = [&](FileSystem&, Image* image) -> Status {
    TRY(image->Write(writes[0].offset_bytes, writes[0].data));
    TRY(image->Discard(discards[0].first, discards[0].second));
    TRY(image->Write(writes[1].offset_bytes, writes[1].data));
    TRY(image->Discard(discards[1].first, discards[1].second));
    TRY(image->Discard(discards[2].first, discards[2].second));
    TRY(image->Write(writes[2].offset_bytes, writes[2].data));
    TRY(image->Discard(discards[3].first, discards[3].second));
    TRY(image->Write(writes[3].offset_bytes, writes[3].data));
    TRY(image->Write(writes[4].offset_bytes, writes[4].data));
    return image->Flush();
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    Outcome outcome{&before, &after, kSectorBytes, atomic};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash while closing: flush - trim of discarded clusters at the end - clean marker") {
  TestRng rng;
  const uint64_t cb = 32 * kKiB;
  const uint64_t size = 32 * cb;
  // Clusters 0-9 in file clusters 1-10. The operation discards cluster 8
  // and flushes, so file cluster 9 is free; then writes cluster 20 (into
  // file cluster 9), discards cluster 9 (the last in the file), overwrites
  // part of cluster 3 and closes: the close must make the BAT durable
  // before it trims file cluster 10 and before it marks the image clean.
  auto initial = rng.Bytes(10 * cb);
  auto overwrite = rng.Bytes(4096);
  auto fresh = rng.Bytes(cb);
  DiskModel before(size, cb);
  before.Write(0, initial);
  DiskModel after = before;
  after.Zero(8 * cb, 2 * cb);
  after.Write(3 * cb + 1024, overwrite);
  after.Write(20 * cb, fresh);

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    auto image = CreateOn(mem, size, cb, ImageKind::kExpanded);
    REQUIRE_OK(image->Write(0, initial));
    REQUIRE_OK(image->Close());
    return OpenOrFail(fault, kImagePath, /*writable=*/true);
  };
  c.op = [&](FileSystem&, Image* image) -> Status {
    TRY(image->Discard(8 * cb, cb));
    TRY(image->Flush());
    TRY(image->Write(20 * cb, fresh));
    TRY(image->Discard(9 * cb, cb));
    TRY(image->Write(3 * cb + 1024, overwrite));
    return image->Close();
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    if (op_succeeded) {
      CheckReport report = CheckFile(mem, kImagePath, /*repair=*/false);
      INFO("check after a successful close:" << ProblemList(report));
      REQUIRE(report.problems.empty());
      REQUIRE(mem.Contents(kImagePath).size() == 10 * cb);
    }
    Outcome outcome{&before, &after, kSectorBytes, {8, 9, 20}};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during import of a raw file") {
  TestRng rng;
  ImageKind kind = ImageKind::kExpanded;
  SUBCASE("expanded") {}
  SUBCASE("preallocated") { kind = ImageKind::kPreallocated; }
  CAPTURE(ImageKindName(kind));
  const uint64_t cb = 32 * kKiB;
  // A sparse source whose size is not a whole number of clusters: data,
  // explicitly written zeros, holes, a partial cluster, data at the tail.
  const uint64_t source_bytes = 32 * cb + 5 * kKiB;
  std::vector<Piece> source = {{0, rng.Bytes(4 * cb)},
                               {4 * cb, Pattern(cb, 0)},
                               {10 * cb + 100, rng.Bytes(300)},
                               {11 * cb, rng.Bytes(10 * cb)},
                               {32 * cb, rng.Bytes(5 * kKiB)}};
  DiskModel expected(33 * cb, cb);
  for (const auto& p : source) expected.Write(p.offset_bytes, p.data);
  const DiskModel empty(33 * cb, cb);
  CreateOptions options;
  options.cluster_bytes = cb;
  options.kind = kind;

  auto require_imported = [&](MemoryFileSystem& mem) {
    CheckReport report = CheckFile(mem, "dst.hds", /*repair=*/true);
    INFO("check --repair of the imported image:" << ProblemList(report));
    REQUIRE(report.clean());
    auto image = OpenOrFail(mem, "dst.hds", /*writable=*/false);
    REQUIRE(ReadDisk(*image, {&expected}) == expected);
  };

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem&) -> std::unique_ptr<Image> {
    auto file = mem.Create("src.raw", /*exclusive=*/true);
    REQUIRE_OK(file);
    for (const auto& p : source) REQUIRE_OK((*file)->WriteAt(p.offset_bytes, p.data));
    REQUIRE_ASSIGN(uint64_t size, (*file)->Size());
    REQUIRE(size == source_bytes);
    return nullptr;
  };
  c.op = [&](FileSystem& fault, Image*) -> Status {
    return ImportRaw(fault, "src.raw", "dst.hds", options);
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int) {
    // The destination is absent or unusable, or it is the whole source;
    // never a disk that reads as half of it.
    REQUIRE_ASSIGN(bool exists, mem.Exists("dst.hds"));
    if (op_succeeded) REQUIRE(exists);
    bool usable = false;
    if (exists) {
      OpenOptions read_only;
      auto image = OpenImage(mem, "dst.hds", read_only);
      if (image.ok()) {
        INFO("the imported image opens but does not read as the source");
        REQUIRE(ReadDisk(**image, {&expected}) == expected);
        usable = true;
      }
    }
    if (usable) {
      require_imported(mem);
      return;
    }
    // Whatever the crash left behind, importing again works.
    REQUIRE_FALSE(op_succeeded);
    if (exists) REQUIRE_OK(mem.Remove("dst.hds"));
    REQUIRE_OK(ImportRaw(mem, "src.raw", "dst.hds", options));
    require_imported(mem);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during grow that relocates data clusters for a bigger BAT") {
  TestRng rng;
  // One 32K BAT cluster holds (32768 - 64) / 4 = 8176 entries: 8100
  // clusters fit in it, 20000 need three, so the data in file clusters 1
  // and 2 must move first -- into clusters freed by discards, which hold
  // stale bytes.
  const uint64_t cb = 32 * kKiB;
  const uint64_t old_size = 8100 * cb;
  const uint64_t new_size = 20000 * cb;
  REQUIRE_ASSIGN(Header old_header, MakeHeader(old_size, cb));
  REQUIRE_ASSIGN(Header new_header, MakeHeader(new_size, cb));
  REQUIRE(old_header.first_block_bytes() == cb);
  REQUIRE(new_header.first_block_bytes() == 3 * cb);

  // Written in this order, virtual cluster i lands in file cluster
  // 1, 2, 3, ...; 3 and 5 are then discarded, freeing file clusters 3 and 5.
  const std::vector<uint64_t> order = {0, 1, 3, 7, 5, 500, 4000, 8099};
  std::vector<Piece> writes;
  for (uint64_t index : order) writes.push_back({index * cb, rng.Bytes(cb)});
  writes.push_back({7 * cb + 100, rng.Bytes(cb)});  // across 7 and 8: file cluster 9

  DiskModel before(old_size, cb);
  for (const auto& w : writes) before.Write(w.offset_bytes, w.data);
  before.Zero(3 * cb, cb);
  before.Zero(5 * cb, cb);
  DiskModel after = before;
  after.Resize(new_size);

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    auto image = CreateOn(mem, old_size, cb, ImageKind::kExpanded);
    for (const auto& w : writes) REQUIRE_OK(image->Write(w.offset_bytes, w.data));
    REQUIRE_OK(image->Discard(3 * cb, cb));
    REQUIRE_OK(image->Discard(5 * cb, cb));
    REQUIRE_OK(image->Close());
    Scribble(mem, 3, cb);
    Scribble(mem, 5, cb);
    return OpenOrFail(fault, kImagePath, /*writable=*/true);
  };
  c.op = [&](FileSystem&, Image* image) -> Status { return image->Grow(new_size); };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    Outcome outcome{&before, &after, cb, {}};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during compact: clusters move from the file's end into holes - the file is cut") {
  TestRng rng;
  const uint64_t cb = 32 * kKiB;
  const uint64_t size = 64 * cb;
  bool drop_zero = false;
  SUBCASE("moving only") {}
  SUBCASE("dropping zero clusters too") { drop_zero = true; }
  CAPTURE(drop_zero);
  // Clusters 0..19 land in file clusters 1..20; discarding 2, 5, 6 and 11
  // leaves holes there (with stale bytes, as without hole punching), so the
  // last four data clusters move down, in two batches of three and one.
  // Cluster 15 is all zeros (allocated by WriteCluster).
  std::vector<Piece> writes;
  for (uint64_t i = 0; i < 20; ++i) writes.push_back({i * cb, rng.Bytes(cb)});
  const std::vector<uint64_t> discarded = {2, 5, 6, 11};
  DiskModel model(size, cb);
  for (const auto& w : writes) model.Write(w.offset_bytes, w.data);
  for (uint64_t i : discarded) model.Zero(i * cb, cb);
  model.Zero(15 * cb, cb);

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    REQUIRE_ASSIGN(auto delta, Delta::Create(mem, kImagePath, {size, cb, ImageKind::kExpanded}));
    for (const auto& w : writes) REQUIRE_OK(delta->Write(w.offset_bytes, w.data));
    REQUIRE_OK(delta->WriteCluster(15, std::vector<std::byte>(cb)));
    for (uint64_t i : discarded) REQUIRE_OK(delta->Discard(i * cb, cb));
    REQUIRE_OK(delta->Close());
    for (uint64_t fc : {3, 6, 7, 12}) Scribble(mem, fc, cb);
    OpenOptions o;
    o.writable = true;
    REQUIRE_ASSIGN(auto reopened, Delta::Open(fault, kImagePath, o));
    return std::unique_ptr<Image>(std::move(reopened));
  };
  c.op = [&](FileSystem&, Image* image) -> Status {
    auto* delta = dynamic_cast<Delta*>(image);
    ASSIGN_OR_RETURN(Delta::CompactReport report, delta->Compact(drop_zero, 3));
    if (report.file_bytes_after >= report.file_bytes_before) {
      return Status::Corruption("compact did not shrink the file");
    }
    return Status::Ok();
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    if (op_succeeded) {
      // The header cluster and 20 data clusters, less the 4 discarded and,
      // when dropped, the zero cluster.
      REQUIRE_ASSIGN(auto file, mem.Open(kImagePath, OpenMode::kReadOnly));
      REQUIRE_ASSIGN(uint64_t bytes, file->Size());
      CHECK(bytes == (drop_zero ? 16u : 17u) * cb);
    }
    Outcome outcome{&model, &model, cb, {}};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during grow of a preallocated image") {
  TestRng rng;
  const uint64_t cb = 32 * kKiB;
  const uint64_t old_size = 32 * cb;
  const uint64_t new_size = 80 * cb;
  auto initial = rng.Bytes(old_size);
  DiskModel before(old_size, cb);
  before.Write(0, initial);
  DiskModel after = before;
  after.Resize(new_size);

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem& fault) {
    auto image = CreateOn(mem, old_size, cb, ImageKind::kPreallocated);
    REQUIRE_OK(image->Write(0, initial));
    REQUIRE_OK(image->Close());
    return OpenOrFail(fault, kImagePath, /*writable=*/true);
  };
  c.op = [&](FileSystem&, Image* image) -> Status { return image->Grow(new_size); };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    Outcome outcome{&before, &after, cb, {}};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
    if (!op_succeeded) return;
    auto image = OpenOrFail(mem, kImagePath, /*writable=*/false);
    CHECK(image->kind() == ImageKind::kPreallocated);
  };
  RunCrashCase(c, rng);
}

TEST_CASE("crash during check --repair of a dirty image") {
  TestRng rng;
  const uint64_t cb = 32 * kKiB;
  const uint64_t size = 32 * cb;
  // Clusters 0-5 in file clusters 1-6. Then the damage: the dirty marker,
  // entry 10 sharing file cluster 3 with entry 2, and
  bool leaked_tail = false;
  SUBCASE("entry 11 pointing just past EOF, where the repair appends, after a partial cluster") {}
  SUBCASE("entry 11 past EOF, behind two leaked clusters") { leaked_tail = true; }
  CAPTURE(leaked_tail);
  auto initial = rng.Bytes(6 * cb);
  // The repair gives entry 10 its own copy and drops entry 11.
  DiskModel expected(size, cb);
  expected.Write(0, initial);
  expected.Write(10 * cb, std::span(initial).subspan(2 * cb, cb));

  CrashCase c;
  c.setup = [&](MemoryFileSystem& mem, FileSystem&) -> std::unique_ptr<Image> {
    auto image = CreateOn(mem, size, cb, ImageKind::kExpanded);
    REQUIRE_OK(image->Write(0, initial));
    REQUIRE_OK(image->Close());
    auto file = mem.Open(kImagePath, OpenMode::kReadWrite);
    REQUIRE_OK(file);
    auto put32 = [&](uint64_t offset, uint32_t value) {
      std::byte raw[4];
      StoreLe32(raw, value);
      REQUIRE_OK((*file)->WriteAt(offset, raw));
    };
    put32(44, kInUseDirty);
    put32(kHeaderBytes + 4 * 10, 3);
    if (leaked_tail) {
      REQUIRE_OK((*file)->WriteAt(7 * cb, Pattern(2 * cb, 0xee)));
      put32(kHeaderBytes + 4 * 11, 9);
    } else {
      REQUIRE_OK((*file)->WriteAt(7 * cb, Pattern(1000, 0xee)));
      put32(kHeaderBytes + 4 * 11, 7);
    }
    return nullptr;
  };
  c.op = [&](FileSystem& fault, Image*) -> Status {
    ASSIGN_OR_RETURN(auto file, fault.Open(kImagePath, OpenMode::kReadWrite));
    ASSIGN_OR_RETURN(CheckReport report, CheckImage(*file, /*repair=*/true));
    if (!report.clean()) return Status::Corruption("not repaired: " + report.FirstProblem());
    return Status::Ok();
  };
  c.verify = [&](MemoryFileSystem& mem, bool op_succeeded, int variant) {
    // The damaged image does not open before a repair (the shared cluster),
    // so the outcome is checked after the repair that reopening runs.
    Outcome outcome{&expected, &expected, cb, {}, /*opens_unrepaired=*/false};
    VerifyCrashedImage(mem, kImagePath, outcome, op_succeeded, variant % 2 == 1);
  };
  RunCrashCase(c, rng);
}

TEST_SUITE_END();
}  // namespace
}  // namespace ploop
