// ServedDisk: the concurrent data path of a mounted disk.
//
// Data is tagged per 512-byte sector (the sector's number and a version, then
// a pattern derived from both), so any read tells which write a sector came
// from: data of another sector (a cluster mapped twice, a reused cluster
// read too early), unwritten data (zeros where no discard was) and older
// data of a layer below all show up as a wrong tag.
//
//   - behaviour: copy-up, zero writes, discards over lower layers, space
//     given back, read-only disks, the online hooks;
//   - a multi-threaded randomized model test (seeded): writers own disjoint
//     sectors but share clusters (allocation and copy-up races), whole
//     clusters of their own get discarded and rewritten, a reader checks
//     every tag it sees while all this runs, flushes run concurrently;
//   - crash tests: a concurrent workload with flushes, cut after every
//     mutating call k, unsynced writes dropped (all or a random subset):
//     every write a successful flush acknowledged reads back, nothing reads
//     as older than that, and the image checks clean;
//   - BlockFile implementations under concurrent ReadAt/WriteAt;
//   - IoGate grace periods.
#include "ploop/served_disk.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "forwarding_file_system.h"
#include "ploop/check.h"
#include "ploop/delta.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/io/posix_file_system.h"
#include "ploop/raw_image.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::Pattern;
using testing::TempDir;
using testing::TestRng;

constexpr uint64_t kSector = 512;
// 64 KiB: the memory file system's page, so a punched cluster frees a page.
constexpr uint64_t kCb = 64 * 1024;
constexpr uint64_t kSectorsPerCluster = kCb / kSector;

// --- Tagged sectors ----------------------------------------------------

// A sector is 64 words; word j holds (sector << 32 | version) masked with a
// per-position key, so every 8 bytes on their own tell which sector they
// belong to. Version 0 is "zeros" (never written, or discarded).
uint64_t WordKey(uint64_t j) {
  uint64_t z = (j + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void FillSector(std::byte* p, uint64_t sector, uint64_t version) {
  for (uint64_t j = 0; j < kSector / 8; ++j)
    StoreLe64(p + 8 * j, (sector << 32 | version) ^ WordKey(j));
}

// The version a sector holds, or -1 when it is neither zeros nor a whole,
// valid tag of this sector.
int64_t SectorVersion(const std::byte* p, uint64_t sector) {
  if (IsZero(std::span<const std::byte>(p, kSector))) return 0;
  uint64_t first = LoadLe64(p) ^ WordKey(0);
  if (first >> 32 != sector) return -1;
  for (uint64_t j = 1; j < kSector / 8; ++j) {
    if ((LoadLe64(p + 8 * j) ^ WordKey(j)) != first) return -1;
  }
  return static_cast<int64_t>(first & 0xffffffff);
}

// What a read racing writes of the same sector may see: every word zeros or
// a word of some version of this very sector (a concurrent pread and pwrite
// of one sector interleave; data of another sector never may appear).
bool SectorPlausible(const std::byte* p, uint64_t sector) {
  for (uint64_t j = 0; j < kSector / 8; ++j) {
    uint64_t w = LoadLe64(p + 8 * j);
    if (w != 0 && (w ^ WordKey(j)) >> 32 != sector) return false;
  }
  return true;
}

std::vector<std::byte> Tagged(uint64_t first_sector, uint64_t count, uint64_t version) {
  std::vector<std::byte> out(count * kSector);
  for (uint64_t i = 0; i < count; ++i)
    FillSector(out.data() + i * kSector, first_sector + i, version);
  return out;
}

// --- Disks ----------------------------------------------------------------

enum class Setup {
  kSingle,    // one expanded delta
  kSnapshot,  // a base delta with data in every other cluster, an empty top
  kRawChain,  // a raw base full of data, a delta with some clusters, a top
};

const char* SetupName(Setup s) {
  switch (s) {
    case Setup::kSingle:
      return "single delta";
    case Setup::kSnapshot:
      return "top over a snapshot";
    case Setup::kRawChain:
      return "raw base - delta - top";
  }
  return "?";
}

// Version 1 is the data the lower layers were made with.
constexpr uint64_t kBaseVersion = 1;

struct DiskFiles {
  Setup setup;
  uint64_t clusters;
  std::vector<std::string> paths;  // base first
  std::vector<uint64_t> initial;   // per sector: the version the disk starts with

  uint64_t size_bytes() const { return clusters * kCb; }
  uint64_t sectors() const { return clusters * kSectorsPerCluster; }
};

DiskFiles MakeDisk(FileSystem& fs, const std::string& dir, Setup setup, uint64_t clusters) {
  DiskFiles d{setup, clusters, {}, std::vector<uint64_t>(clusters * kSectorsPerCluster, 0)};
  auto path = [&](const std::string& name) { return dir.empty() ? name : dir + "/" + name; };
  CreateOptions o;
  o.size_bytes = d.size_bytes();
  o.cluster_bytes = kCb;
  auto fill = [&](Image& image, uint64_t cluster) {
    REQUIRE_OK(image.Write(cluster * kCb,
                           Tagged(cluster * kSectorsPerCluster, kSectorsPerCluster, kBaseVersion)));
    for (uint64_t s = 0; s < kSectorsPerCluster; ++s) {
      d.initial[cluster * kSectorsPerCluster + s] = kBaseVersion;
    }
  };
  if (setup == Setup::kRawChain) {
    o.kind = ImageKind::kRaw;
    REQUIRE_ASSIGN(auto raw, CreateImage(fs, path("base.raw"), o));
    for (uint64_t c = 0; c < clusters; ++c) {
      if (c % 3 != 2) fill(*raw, c);
    }
    REQUIRE_OK(raw->Close());
    d.paths.push_back(path("base.raw"));
    o.kind = ImageKind::kExpanded;
    REQUIRE_ASSIGN(auto mid, CreateImage(fs, path("mid.hds"), o));
    for (uint64_t c = 0; c < clusters; c += 4) fill(*mid, c);
    REQUIRE_OK(mid->Close());
    d.paths.push_back(path("mid.hds"));
  } else if (setup == Setup::kSnapshot) {
    REQUIRE_ASSIGN(auto base, CreateImage(fs, path("base.hds"), o));
    for (uint64_t c = 0; c < clusters; c += 2) fill(*base, c);
    REQUIRE_OK(base->Close());
    d.paths.push_back(path("base.hds"));
  }
  REQUIRE_ASSIGN(auto top, CreateImage(fs, path("top.hds"), o));
  REQUIRE_OK(top->Close());
  d.paths.push_back(path("top.hds"));
  return d;
}

Result<std::unique_ptr<Chain>> OpenChain(FileSystem& fs, const DiskFiles& d, bool writable) {
  std::vector<std::unique_ptr<Image>> layers;
  for (size_t i = 0; i < d.paths.size(); ++i) {
    OpenOptions o;
    o.writable = writable && i + 1 == d.paths.size();
    o.raw = d.paths[i].ends_with(".raw");
    ASSIGN_OR_RETURN(auto image, OpenImage(fs, d.paths[i], o));
    layers.push_back(std::move(image));
  }
  return Chain::FromLayers(std::move(layers));
}

std::unique_ptr<ServedDisk> Serve(FileSystem& fs, const DiskFiles& d, bool writable = true) {
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, writable));
  REQUIRE_ASSIGN(auto disk, ServedDisk::Create(std::move(chain)));
  return disk;
}

std::vector<std::byte> ReadRange(ServedDisk& disk, uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  REQUIRE_OK(disk.Read(offset, out));
  return out;
}

// Every sector of the disk as read through a freshly opened chain.
std::vector<int64_t> Versions(FileSystem& fs, const DiskFiles& d) {
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, /*writable=*/false));
  std::vector<std::byte> all(d.size_bytes());
  REQUIRE_OK(chain->Read(0, all));
  std::vector<int64_t> out(d.sectors());
  for (uint64_t s = 0; s < d.sectors(); ++s) out[s] = SectorVersion(all.data() + s * kSector, s);
  return out;
}

std::string TopProblems(FileSystem& fs, const DiskFiles& d) {
  auto file = fs.Open(d.paths.back(), OpenMode::kReadOnly);
  REQUIRE_OK(file);
  REQUIRE_ASSIGN(CheckReport report, CheckImage(**file, /*repair=*/false));
  std::string out;
  for (const auto& p : report.problems) out += p.message + "\n";
  return out;
}

// The lower layers' files, to prove they were never written.
std::vector<std::vector<std::byte>> LowerContents(MemoryFileSystem& fs, const DiskFiles& d) {
  std::vector<std::vector<std::byte>> out;
  for (size_t i = 0; i + 1 < d.paths.size(); ++i) out.push_back(fs.Contents(d.paths[i]));
  return out;
}

// --- A concurrent workload -----------------------------------------------
//
// Sectors are owned by threads: in most clusters the four 8 KiB quarters
// belong to four different threads (so they race to allocate and copy up
// the same cluster); every fourth cluster belongs wholly to one thread,
// which also writes and discards it as a whole. An operation touches only
// its thread's sectors, so each sector's history is that thread's program
// order and the expected content is exact.

constexpr int kThreads = 4;
constexpr uint64_t kQuarter = kSectorsPerCluster / 4;

bool WholeCluster(uint64_t cluster) { return cluster % 4 == 3; }

int OwnerOfSector(uint64_t sector) {
  uint64_t cluster = sector / kSectorsPerCluster;
  if (WholeCluster(cluster)) return static_cast<int>((cluster / 4) % kThreads);
  return static_cast<int>((sector % kSectorsPerCluster) / kQuarter);
}

struct Op {
  enum Kind { kWrite, kDiscard, kFlush, kRead } kind;
  uint64_t first_sector = 0;
  uint64_t sectors = 0;
  uint64_t version = 0;  // writes: unique, > kBaseVersion
};

// A seeded random program for thread `t`.
std::vector<Op> MakeProgram(std::mt19937_64& rng, int t, uint64_t clusters, size_t count,
                            uint64_t* next_version, bool flushes) {
  std::vector<uint64_t> own_whole;
  for (uint64_t c = 0; c < clusters; ++c) {
    if (WholeCluster(c) && OwnerOfSector(c * kSectorsPerCluster) == t) own_whole.push_back(c);
  }
  std::vector<Op> ops;
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  for (size_t i = 0; i < count; ++i) {
    Op op{};
    uint64_t r = pick(100);
    op.kind = r < 60              ? Op::kWrite
              : r < 80            ? Op::kDiscard
              : r < 90 && flushes ? Op::kFlush
                                  : Op::kRead;
    if (op.kind == Op::kFlush) {
      ops.push_back(op);
      continue;
    }
    if (!own_whole.empty() && pick(3) == 0) {
      uint64_t c = own_whole[pick(own_whole.size())];
      if (pick(2) == 0) {
        op.first_sector = c * kSectorsPerCluster;
        op.sectors = kSectorsPerCluster;
      } else {
        op.first_sector = c * kSectorsPerCluster + pick(kSectorsPerCluster);
        op.sectors = 1 + pick(kSectorsPerCluster - op.first_sector % kSectorsPerCluster);
      }
    } else {
      uint64_t c;
      do c = pick(clusters);
      while (WholeCluster(c));
      uint64_t quarter_start = c * kSectorsPerCluster + t * kQuarter;
      uint64_t from = pick(kQuarter);
      op.first_sector = quarter_start + from;
      op.sectors = 1 + pick(kQuarter - from);
    }
    if (op.kind == Op::kWrite) op.version = (*next_version)++;
    ops.push_back(op);
  }
  return ops;
}

// Per-sector history of versions in program order (0 = discarded).
using History = std::vector<std::vector<uint64_t>>;

History Histories(const std::vector<std::vector<Op>>& programs, uint64_t sectors) {
  History h(sectors);
  for (const auto& program : programs) {
    for (const Op& op : program) {
      if (op.kind != Op::kWrite && op.kind != Op::kDiscard) continue;
      for (uint64_t s = op.first_sector; s < op.first_sector + op.sectors; ++s) {
        h[s].push_back(op.kind == Op::kWrite ? op.version : 0);
      }
    }
  }
  return h;
}

// --- Behaviour ------------------------------------------------------------

TEST_SUITE_BEGIN("unit");

TEST_CASE("served disk: reads through layers - writes copy up - lower layers never change") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 8);
  auto lower = LowerContents(fs, d);
  auto disk = Serve(fs, d);
  CHECK(disk->size_bytes() == 8 * kCb);
  CHECK(disk->writable());
  // Cluster 0 is in the base: a partial write copies the rest up.
  REQUIRE_OK(disk->Write(kSector, Tagged(1, 2, 7)));
  auto got = ReadRange(*disk, 0, kCb);
  CHECK(SectorVersion(got.data(), 0) == kBaseVersion);
  CHECK(SectorVersion(got.data() + kSector, 1) == 7);
  CHECK(SectorVersion(got.data() + 2 * kSector, 2) == 7);
  CHECK(SectorVersion(got.data() + 3 * kSector, 3) == kBaseVersion);
  // Cluster 1 is nowhere: zeros around a partial write; zeros write nothing.
  REQUIRE_OK(disk->Write(kCb + 4 * kSector, Pattern(kSector, 0)));
  CHECK(disk->counters().allocations == 1);
  REQUIRE_OK(disk->Write(kCb + 4 * kSector, Tagged(kSectorsPerCluster + 4, 1, 8)));
  got = ReadRange(*disk, kCb, kCb);
  CHECK(SectorVersion(got.data(), kSectorsPerCluster) == 0);
  CHECK(SectorVersion(got.data() + 4 * kSector, kSectorsPerCluster + 4) == 8);
  // A read across clusters from different layers and none.
  got = ReadRange(*disk, 0, 4 * kCb);
  for (uint64_t s = 0; s < 4 * kSectorsPerCluster; ++s) {
    int64_t want = s == 1 || s == 2                    ? 7
                   : s == kSectorsPerCluster + 4       ? 8
                   : (s / kSectorsPerCluster) % 2 == 0 ? kBaseVersion
                                                       : 0;
    CAPTURE(s);
    CHECK(SectorVersion(got.data() + s * kSector, s) == want);
  }
  REQUIRE_OK(disk->Close());
  CHECK(LowerContents(fs, d) == lower);
  CHECK(TopProblems(fs, d) == "");
  auto v = Versions(fs, d);
  CHECK(v[1] == 7);
  CHECK(v[kSectorsPerCluster + 4] == 8);
  CHECK(v[2 * kSectorsPerCluster] == kBaseVersion);
}

TEST_CASE("served disk: a discard reads as zeros - never as a lower layer's older data") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 8);
  auto disk = Serve(fs, d);
  // Newer data in the top over clusters 0 and 2 (base data below), and in
  // cluster 1 (nothing below).
  for (uint64_t c : {0, 1, 2}) {
    REQUIRE_OK(disk->Write(c * kCb, Tagged(c * kSectorsPerCluster, kSectorsPerCluster, 9)));
  }
  REQUIRE_OK(disk->Flush());
  const uint64_t used_before = fs.used_bytes();
  // Whole clusters: 0 (top copy over base data), 1 (top only), 4 (base only).
  REQUIRE_OK(disk->Discard(0, 2 * kCb));
  REQUIRE_OK(disk->Discard(4 * kCb, kCb));
  // Part of cluster 2 (top copy) and of cluster 6 (base only).
  REQUIRE_OK(disk->Discard(2 * kCb + 8 * kSector, 4 * kSector));
  REQUIRE_OK(disk->Discard(6 * kCb + 8 * kSector, 4 * kSector));
  auto check = [&](auto read) {
    for (uint64_t s = 0; s < 8 * kSectorsPerCluster; ++s) {
      uint64_t c = s / kSectorsPerCluster, in = s % kSectorsPerCluster;
      int64_t want = c == 0 || c == 1 || c == 4                 ? 0
                     : (c == 2 || c == 6) && in >= 8 && in < 12 ? 0
                     : c == 2                                   ? 9
                     : c % 2 == 0                               ? kBaseVersion
                                                                : 0;
      CAPTURE(s);
      CHECK(read(s) == want);
    }
  };
  auto all = ReadRange(*disk, 0, 8 * kCb);
  check([&](uint64_t s) { return SectorVersion(all.data() + s * kSector, s); });
  REQUIRE_OK(disk->Flush());
  // Space came back: cluster 1 was unmapped and punched, cluster 0's copy
  // became a hole, and the whole-cluster discard over the base maps a hole.
  CHECK(fs.used_bytes() < used_before);
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(fs, d) == "");
  auto v = Versions(fs, d);
  check([&](uint64_t s) { return v[s]; });
}

TEST_CASE(
    "served disk: a freed cluster is reused after the flush and the new owner's data reads back") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSingle, 8);
  auto disk = Serve(fs, d);
  REQUIRE_OK(disk->Write(0, Tagged(0, 3 * kSectorsPerCluster, 5)));
  REQUIRE_OK(disk->Flush());
  const auto size_before = fs.Contents(d.paths.back()).size();
  REQUIRE_OK(disk->Discard(kCb, kCb));
  // Not reusable before the flush: a new cluster goes to the end.
  REQUIRE_OK(disk->Write(5 * kCb, Tagged(5 * kSectorsPerCluster, kSectorsPerCluster, 6)));
  REQUIRE_OK(disk->Flush());
  CHECK(fs.Contents(d.paths.back()).size() == size_before + kCb);
  // After it: the freed cluster is taken, the file does not grow.
  REQUIRE_OK(disk->Write(6 * kCb, Tagged(6 * kSectorsPerCluster, kSectorsPerCluster, 7)));
  CHECK(fs.Contents(d.paths.back()).size() == size_before + kCb);
  REQUIRE_OK(disk->Close());
  auto v = Versions(fs, d);
  CHECK(v[0] == 5);
  CHECK(v[kSectorsPerCluster] == 0);
  CHECK(v[2 * kSectorsPerCluster] == 5);
  CHECK(v[5 * kSectorsPerCluster + 3] == 6);
  CHECK(v[6 * kSectorsPerCluster + 3] == 7);
  CHECK(TopProblems(fs, d) == "");
}

TEST_CASE("served disk: read-only - range checks - closed") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 4);
  auto disk = Serve(fs, d, /*writable=*/false);
  CHECK_FALSE(disk->writable());
  CHECK(disk->Write(0, Pattern(kSector, 1)).code() == StatusCode::kFailedPrecondition);
  CHECK(disk->Discard(0, kCb).code() == StatusCode::kFailedPrecondition);
  REQUIRE_OK(disk->Flush());
  std::vector<std::byte> buf(kSector);
  CHECK(disk->Read(4 * kCb, buf).code() == StatusCode::kInvalidArgument);
  CHECK(disk->Read(4 * kCb - kSector, buf).ok());
  REQUIRE_OK(disk->Close());
  CHECK(disk->Read(0, buf).code() == StatusCode::kFailedPrecondition);
  CHECK(disk->counters().errors == 4);
}

TEST_CASE("served disk: a full host file system fails the allocating write and maps nothing") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 16);
  auto disk = Serve(fs, d);
  REQUIRE_OK(disk->Write(kCb, Tagged(kSectorsPerCluster, kSectorsPerCluster, 4)));
  REQUIRE_OK(disk->Flush());
  fs.set_capacity_bytes(fs.used_bytes());
  Status s = disk->Write(3 * kCb + kSector, Tagged(3 * kSectorsPerCluster + 1, 1, 5));
  CHECK(s.code() == StatusCode::kNoSpace);
  s = disk->Write(2 * kCb, Tagged(2 * kSectorsPerCluster, 1, 5));  // copy-up
  CHECK(s.code() == StatusCode::kNoSpace);
  // Overwrites in place still work, and so does a flush.
  REQUIRE_OK(disk->Write(kCb, Tagged(kSectorsPerCluster, 1, 6)));
  REQUIRE_OK(disk->Flush());
  auto got = ReadRange(*disk, 2 * kCb, 2 * kCb);
  CHECK(SectorVersion(got.data(), 2 * kSectorsPerCluster) == kBaseVersion);
  CHECK(SectorVersion(got.data() + kCb + kSector, 3 * kSectorsPerCluster + 1) == 0);
  // Space again: the same writes succeed.
  fs.set_capacity_bytes(0);
  REQUIRE_OK(disk->Write(3 * kCb + kSector, Tagged(3 * kSectorsPerCluster + 1, 1, 5)));
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(fs, d) == "");
  auto v = Versions(fs, d);
  CHECK(v[kSectorsPerCluster] == 6);
  CHECK(v[kSectorsPerCluster + 1] == 4);
  CHECK(v[3 * kSectorsPerCluster + 1] == 5);
}

TEST_CASE("served disk: ReplaceLayers puts a new top over the old one while writers run") {
  // The online-snapshot hook: quiesce, flush, push a new empty top (the old
  // top reopened read-only below it), go on. Every write lands in exactly
  // one of the two, and the old top holds exactly what was written before.
  TestRng rng;
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 32);
  auto disk = Serve(fs, d);
  std::atomic<bool> stop{false};
  std::atomic<bool> switched{false};
  std::atomic<uint64_t> next_version{10};
  // Per write: sector, version, and whether it landed before the switch
  // (1), after it (0), or cannot be told (2: it was issued before and
  // returned after).
  struct Done {
    uint64_t sector, version;
    int before;
  };
  std::vector<std::vector<Done>> done(kThreads);
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      uint64_t i = 0;
      while (!stop.load()) {
        // Thread t's quarter of cluster (i % 32), one sector of it.
        uint64_t s = (i % 32) * kSectorsPerCluster + t * kQuarter + (i / 32) % kQuarter;
        uint64_t v = next_version.fetch_add(1);
        bool after = switched.load();
        CHECK_OK(disk->Write(s * kSector, Tagged(s, 1, v)));
        done[t].push_back({s, v, after ? 0 : switched.load() ? 2 : 1});
        ++i;
      }
    });
  }
  while (next_version.load() < 200) std::this_thread::yield();
  uint64_t switch_version = 0;
  REQUIRE_OK(disk->ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    switched = true;  // no write is in flight now
    switch_version = next_version.load();
    TRY(layers.back()->Close());
    OpenOptions ro;
    ASSIGN_OR_RETURN(layers.back(), OpenImage(fs, d.paths.back(), ro));
    CreateOptions o;
    o.size_bytes = d.size_bytes();
    o.cluster_bytes = kCb;
    ASSIGN_OR_RETURN(auto top, CreateImage(fs, "new-top.hds", o));
    layers.push_back(std::move(top));
    return Status::Ok();
  }));
  CHECK(disk->counters().depth == 3);
  while (next_version.load() < switch_version + 200) std::this_thread::yield();
  stop = true;
  for (auto& w : writers) w.join();
  REQUIRE_OK(disk->Close());
  // The disk: every sector's last write. The snapshot (the old chain): the
  // last write that landed before the switch -- or the one write per
  // thread that cannot be told.
  std::map<uint64_t, int64_t> last, before, unsure;
  for (const auto& writes : done) {
    for (const Done& w : writes) {
      last[w.sector] = static_cast<int64_t>(w.version);  // program order per sector
      if (w.before == 1) before[w.sector] = static_cast<int64_t>(w.version);
      if (w.before == 2) unsure[w.sector] = static_cast<int64_t>(w.version);
    }
  }
  auto snapshot = Versions(fs, d);
  DiskFiles now = d;
  now.paths.push_back("new-top.hds");
  auto current = Versions(fs, now);
  for (uint64_t s = 0; s < d.sectors(); ++s) {
    CAPTURE(s);
    int64_t initial = static_cast<int64_t>(d.initial[s]);
    CHECK(current[s] == (last.count(s) ? last[s] : initial));
    int64_t want = before.count(s) ? before[s] : initial;
    if (snapshot[s] != want) CHECK(snapshot[s] == (unsure.count(s) ? unsure[s] : want));
  }
}

TEST_CASE("served disk: Grow while writers run - the new space reads as zeros and takes data") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 16);
  auto disk = Serve(fs, d);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0};
  std::thread writer([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      uint64_t s = (i * 7) % (16 * kSectorsPerCluster);
      CHECK_OK(disk->Write(s * kSector, Tagged(s, 1, 100 + i)));
      writes.fetch_add(1);
    }
  });
  while (writes.load() < 50) std::this_thread::yield();
  // Big enough that the BAT needs another cluster: data clusters move.
  const uint64_t grown = 16 * kCb + (kCb / 4) * kCb;
  REQUIRE_OK(disk->Grow(grown));
  CHECK(disk->size_bytes() == grown);
  CHECK(disk->Grow(kCb).code() == StatusCode::kInvalidArgument);
  auto tail = ReadRange(*disk, grown - kCb, kCb);
  CHECK(IsZero(tail));
  REQUIRE_OK(disk->Write(grown - kSector, Tagged(grown / kSector - 1, 1, 3)));
  while (writes.load() < 100) std::this_thread::yield();
  stop = true;
  writer.join();
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(fs, d) == "");
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, /*writable=*/false));
  CHECK(chain->size_bytes() == grown);
  std::vector<std::byte> head(16 * kCb), last(kSector);
  REQUIRE_OK(chain->Read(0, head));
  REQUIRE_OK(chain->Read(grown - kSector, last));
  CHECK(SectorVersion(last.data(), grown / kSector - 1) == 3);
  for (uint64_t s = 0; s < 16 * kSectorsPerCluster; ++s) {
    CAPTURE(s);
    CHECK(SectorVersion(head.data() + s * kSector, s) >= 0);
  }
}

// The NBD export closes the disk on a stop request while its clients'
// requests may still run: Close() must wait for those in flight, fail the
// later ones, and leave a clean image holding every write acknowledged
// before it.
TEST_CASE("served disk: Close while writers and readers run") {
  MemoryFileSystem fs;
  DiskFiles d = MakeDisk(fs, "", Setup::kSnapshot, 16);
  auto disk = Serve(fs, d);
  constexpr int kThreads = 4;
  const uint64_t per_thread = 16 * kSectorsPerCluster / kThreads;
  std::atomic<uint64_t> ops{0};
  // Per thread, per own sector: the last version acknowledged (0: none).
  std::vector<std::vector<uint64_t>> acked(kThreads, std::vector<uint64_t>(per_thread, 0));
  std::vector<Status> ended(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> buf(kSector);
      for (uint64_t i = 0;; ++i) {
        const uint64_t own = (i * 5) % per_thread;
        const uint64_t s = t * per_thread + own;
        Status st = i % 3 == 2 ? disk->Read(s * kSector, buf)
                               : disk->Write(s * kSector, Tagged(s, 1, 100 + i));
        if (!st.ok()) {
          ended[t] = st;
          return;
        }
        if (i % 3 != 2) acked[t][own] = 100 + i;
        ops.fetch_add(1);
      }
    });
  }
  while (ops.load() < 400) std::this_thread::yield();
  REQUIRE_OK(disk->Close());
  for (auto& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) {
    CAPTURE(t);
    CHECK(ended[t].code() == StatusCode::kFailedPrecondition);
  }
  CHECK(disk->Close().ok());  // a second close does nothing
  CHECK(TopProblems(fs, d) == "");
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, /*writable=*/false));
  std::vector<std::byte> all(16 * kCb);
  REQUIRE_OK(chain->Read(0, all));
  for (int t = 0; t < kThreads; ++t) {
    for (uint64_t own = 0; own < per_thread; ++own) {
      if (acked[t][own] == 0) continue;
      const uint64_t s = t * per_thread + own;
      CAPTURE(s);
      CHECK(SectorVersion(all.data() + s * kSector, s) == static_cast<int64_t>(acked[t][own]));
    }
  }
}

// --- Requests through plans (the daemon's asynchronous path) -------------
//
// With g_plans set, the concurrent workloads send their reads and writes
// through PlanRead()/PlanWrite(), doing each piece's I/O here with
// pread/pwrite as the daemon's io_uring queues do, and fall back to
// Read()/Write() when there is no plan or a transfer comes up short.
std::atomic<bool> g_plans{false};
std::atomic<uint64_t> g_planned{0};

bool Transfer(const ServedDisk::IoPiece& p, std::byte* buffer, bool write) {
  std::byte* at = buffer + p.buffer_offset;
  if (p.fd < 0) {
    if (write) return false;  // a write plan always names a file
    std::memset(at, 0, p.length);
    return true;
  }
  const ssize_t n = write ? ::pwrite(p.fd, at, p.length, static_cast<off_t>(p.file_offset))
                          : ::pread(p.fd, at, p.length, static_cast<off_t>(p.file_offset));
  return n == static_cast<ssize_t>(p.length);
}

Status DiskRead(ServedDisk& disk, uint64_t offset, std::span<std::byte> out) {
  if (g_plans.load()) {
    ServedDisk::Plan plan;
    if (disk.PlanRead(offset, out, &plan)) {
      bool ok = true;
      for (const auto& p : plan.pieces()) ok = Transfer(p, out.data(), false) && ok;
      disk.Finish(&plan, ok);
      if (ok) {
        g_planned.fetch_add(1);
        return Status::Ok();
      }
    }
  }
  return disk.Read(offset, out);
}

Status DiskWrite(ServedDisk& disk, uint64_t offset, std::span<const std::byte> data,
                 ServedDisk::Caching caching = ServedDisk::Caching::kDirectWhenAligned) {
  if (g_plans.load()) {
    ServedDisk::Plan plan;
    if (disk.PlanWrite(offset, data, caching, &plan)) {
      bool ok = true;
      auto* buffer = const_cast<std::byte*>(data.data());  // only written from
      for (const auto& p : plan.pieces()) ok = Transfer(p, buffer, true) && ok;
      disk.Finish(&plan, ok);
      if (ok) {
        g_planned.fetch_add(1);
        return Status::Ok();
      }
    }
  }
  return disk.Write(offset, data, caching);
}

// Sets g_plans for a scope and counts the planned requests in it.
class ThroughPlans {
 public:
  ThroughPlans() {
    g_planned = 0;
    g_plans = true;
  }
  ~ThroughPlans() { g_plans = false; }
  uint64_t planned() const { return g_planned.load(); }
};

// --- Concurrency -----------------------------------------------------------

// Runs the programs, one thread each, plus a reader that checks every tag it
// sees until the writers are done. Returns the number of bad reads.
uint64_t RunConcurrently(ServedDisk& disk, const std::vector<std::vector<Op>>& programs,
                         uint64_t sectors, std::vector<std::string>* errors) {
  std::atomic<int> running{static_cast<int>(programs.size())};
  std::atomic<uint64_t> bad{0};
  std::mutex errors_mu;
  auto error = [&](std::string what) {
    std::lock_guard lock(errors_mu);
    if (errors->size() < 20) errors->push_back(std::move(what));
    bad.fetch_add(1);
  };
  std::vector<std::thread> threads;
  for (size_t t = 0; t < programs.size(); ++t) {
    threads.emplace_back([&, t] {
      // What this thread wrote last, per sector it owns.
      std::map<uint64_t, uint64_t> mine;
      for (const Op& op : programs[t]) {
        uint64_t off = op.first_sector * kSector, len = op.sectors * kSector;
        Status s;
        switch (op.kind) {
          case Op::kWrite:
            s = DiskWrite(disk, off, Tagged(op.first_sector, op.sectors, op.version));
            for (uint64_t i = 0; i < op.sectors; ++i) mine[op.first_sector + i] = op.version;
            break;
          case Op::kDiscard:
            s = disk.Discard(off, len);
            for (uint64_t i = 0; i < op.sectors; ++i) mine[op.first_sector + i] = 0;
            break;
          case Op::kFlush:
            s = disk.Flush();
            break;
          case Op::kRead: {
            std::vector<std::byte> buf(len);
            s = DiskRead(disk, off, buf);
            for (uint64_t i = 0; s.ok() && i < op.sectors; ++i) {
              uint64_t sector = op.first_sector + i;
              auto it = mine.find(sector);
              if (it == mine.end()) continue;
              int64_t got = SectorVersion(buf.data() + i * kSector, sector);
              if (got != static_cast<int64_t>(it->second)) {
                error("thread " + std::to_string(t) + " read sector " + std::to_string(sector) +
                      " as version " + std::to_string(got) + ", wrote " +
                      std::to_string(it->second));
              }
            }
            break;
          }
        }
        if (!s.ok()) error("thread " + std::to_string(t) + ": " + s.ToString());
      }
      running.fetch_sub(1);
    });
  }
  // The reader: any range, any time; every sector must hold only words of
  // itself (or zeros).
  threads.emplace_back([&] {
    std::mt19937_64 rng(sectors);
    std::vector<std::byte> buf(4 * kCb);
    while (running.load() > 0) {
      uint64_t first = rng() % sectors;
      uint64_t count = 1 + rng() % std::min<uint64_t>(sectors - first, 4 * kSectorsPerCluster);
      Status s = DiskRead(disk, first * kSector, std::span(buf).first(count * kSector));
      if (!s.ok()) error("reader: " + s.ToString());
      for (uint64_t i = 0; s.ok() && i < count; ++i) {
        if (!SectorPlausible(buf.data() + i * kSector, first + i)) {
          error("reader: sector " + std::to_string(first + i) + " holds foreign data");
        }
      }
    }
  });
  for (auto& t : threads) t.join();
  return bad.load();
}

// `served` is what the disk runs on (the same files as `fs`, maybe through
// a wrapper that widens race windows).
void ModelTest(FileSystem& fs, FileSystem& served, const std::string& dir, Setup setup,
               size_t ops_per_thread) {
  TestRng rng;
  CAPTURE(SetupName(setup));
  const uint64_t clusters = 48;
  DiskFiles d = MakeDisk(fs, dir, setup, clusters);
  uint64_t next_version = kBaseVersion + 1;
  std::vector<std::vector<Op>> programs;
  for (int t = 0; t < kThreads; ++t) {
    programs.push_back(MakeProgram(rng.engine(), t, clusters, ops_per_thread, &next_version,
                                   /*flushes=*/true));
  }
  {
    auto disk = Serve(served, d);
    std::vector<std::string> errors;
    uint64_t bad = RunConcurrently(*disk, programs, d.sectors(), &errors);
    CHECK(bad == 0);
    if (bad != 0) {
      for (const auto& e : errors) MESSAGE(e);
    }
    REQUIRE_OK(disk->Close());
  }
  CHECK(TopProblems(fs, d) == "");
  History h = Histories(programs, d.sectors());
  auto v = Versions(fs, d);
  uint64_t wrong = 0;
  for (uint64_t s = 0; s < d.sectors(); ++s) {
    int64_t want = h[s].empty() ? static_cast<int64_t>(d.initial[s]) : h[s].back();
    if (v[s] != want && ++wrong <= 10) {
      MESSAGE("sector " << s << ": version " << v[s] << ", expected " << want);
    }
  }
  CHECK(wrong == 0);
}

TEST_CASE("served disk: concurrent random writes - discards - flushes - reads match the model") {
  for (Setup setup : {Setup::kSingle, Setup::kSnapshot, Setup::kRawChain}) {
    MemoryFileSystem fs;
    ModelTest(fs, fs, "", setup, 2000);
    // Again through the fault file system without faults: its bookkeeping
    // around every call shifts the threads' interleavings.
    MemoryFileSystem mem;
    FaultFileSystem fault(mem);
    ModelTest(mem, fault, "", setup, 2000);
  }
}

// A file system whose reads at one file offset stop until released: holds a
// request in flight at a chosen point.
class PausingFileSystem final : public testing::ForwardingFileSystem {
 public:
  explicit PausingFileSystem(FileSystem& base) : ForwardingFileSystem(base) {}

  // The next ReadAt() starting at `offset_bytes` waits in the base call's
  // place until Release(); Paused() tells when one is waiting.
  void PauseReadsAt(uint64_t offset_bytes) {
    std::lock_guard lock(mu_);
    pause_at_ = offset_bytes;
  }
  bool Paused() {
    std::lock_guard lock(mu_);
    return paused_;
  }
  void Release() {
    std::lock_guard lock(mu_);
    pause_at_ = UINT64_MAX;
    cv_.notify_all();
  }
  // The next `n` ReadAt()s of `path` each wait until all `n` have arrived:
  // `n` requests are then at that step at the same time.
  void GatherReadsOf(const std::string& path, int n) {
    std::lock_guard lock(mu_);
    gather_path_ = path;
    gather_left_ = n;
  }
  void WaitIfPaused(const std::string& path, uint64_t offset) {
    std::unique_lock lock(mu_);
    if (gather_left_ > 0 && path == gather_path_) {
      if (--gather_left_ == 0) {
        cv_.notify_all();
      } else {
        cv_.wait(lock, [&] { return gather_left_ == 0; });
      }
      return;
    }
    if (offset != pause_at_) return;
    paused_ = true;
    cv_.wait(lock, [&] { return pause_at_ != offset; });
    paused_ = false;
  }

  Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) override {
    ASSIGN_OR_RETURN(auto file, base().Open(path, mode));
    return std::unique_ptr<BlockFile>(new File(*this, std::move(file)));
  }
  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override {
    ASSIGN_OR_RETURN(auto file, base().Create(path, exclusive));
    return std::unique_ptr<BlockFile>(new File(*this, std::move(file)));
  }

 private:
  class File final : public testing::ForwardingBlockFile {
   public:
    File(PausingFileSystem& fs, std::unique_ptr<BlockFile> base)
        : ForwardingBlockFile(std::move(base)), fs_(fs) {}
    Status ReadAt(uint64_t offset, std::span<std::byte> out) override {
      // The request has looked the cluster up; its pread has not run yet.
      fs_.WaitIfPaused(path(), offset);
      return base().ReadAt(offset, out);
    }

   private:
    PausingFileSystem& fs_;
  };

  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t pause_at_ = UINT64_MAX;
  bool paused_ = false;
  std::string gather_path_;
  int gather_left_ = 0;
};

TEST_CASE("served disk: concurrent copy-ups reuse their cluster buffers once the pool has filled") {
  // Many copy-ups at once, twice: the first round makes a buffer for each
  // (a slab's worth at a time), the second finds them all kept.
  constexpr int kCallers = 8;
  MemoryFileSystem mem;
  DiskFiles d = MakeDisk(mem, "", Setup::kSnapshot, 4 * kCallers);
  PausingFileSystem fs(mem);
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, /*writable=*/true));
  REQUIRE_ASSIGN(auto disk, ServedDisk::Create(std::move(chain), ServedDiskOptions{}));
  auto round = [&](int first) {
    // Every copy-up holds its buffer while it reads the base: all of them
    // hold one at once.
    fs.GatherReadsOf(d.paths.front(), kCallers);
    std::vector<std::thread> writers;
    for (int i = 0; i < kCallers; ++i) {
      // An even cluster: the base holds it; one sector written.
      const uint64_t sector = (2 * static_cast<uint64_t>(first + i)) * kSectorsPerCluster + 3;
      writers.emplace_back(
          [&, sector] { CHECK_OK(disk->Write(sector * kSector, Tagged(sector, 1, 7))); });
    }
    for (auto& w : writers) w.join();
  };
  round(0);
  const uint64_t made = disk->counters().copy_buffers_allocated;
  CHECK(made >= kCallers);
  // A slab is 2 MiB: no more than one slab beyond what the callers needed.
  CHECK(made * kCb <= kCallers * kCb + (uint64_t{2} << 20));
  round(kCallers);
  CHECK(disk->counters().copy_buffers_allocated == made);
  // The copy-ups kept the base's data around the written sector.
  for (int i = 0; i < 2 * kCallers; ++i) {
    const uint64_t cluster = 2 * static_cast<uint64_t>(i);
    auto got = ReadRange(*disk, cluster * kCb, kCb);
    for (uint64_t s = 0; s < kSectorsPerCluster; ++s) {
      CAPTURE(cluster);
      CAPTURE(s);
      CHECK(SectorVersion(got.data() + s * kSector, cluster * kSectorsPerCluster + s) ==
            (s == 3 ? 7 : static_cast<int64_t>(kBaseVersion)));
    }
  }
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(mem, d) == "");
}

TEST_CASE("served disk: a discarded cluster is not reused while a request that looked it up runs") {
  // A write in place to cluster A is in flight (its pwrite has not landed;
  // here: a read of A, paused). A is discarded and flushed, and cluster B is
  // written. B must not get A's old file cluster before the request on A is
  // done -- otherwise a late write to A would land in B's data, and a late
  // read of A would return B's data. With the grace period the flush waits
  // for the request, so B goes elsewhere (or waits) and the read returns A.
  MemoryFileSystem mem;
  DiskFiles d = MakeDisk(mem, "", Setup::kSingle, 8);
  PausingFileSystem fs(mem);
  auto disk = Serve(fs, d);
  REQUIRE_OK(disk->Write(0, Tagged(0, kSectorsPerCluster, 5)));  // cluster A = 0
  REQUIRE_OK(disk->Flush());
  OpenOptions peek;
  peek.lock = false;  // the disk holds the lock
  REQUIRE_ASSIGN(auto top, Delta::Open(mem, d.paths.back(), peek));
  const uint64_t a_file_offset = top->ClusterFileOffset(0);
  top.reset();
  REQUIRE(a_file_offset != 0);

  fs.PauseReadsAt(a_file_offset);
  std::vector<std::byte> got(kCb);
  std::thread reader([&] { CHECK_OK(disk->Read(0, got)); });
  while (!fs.Paused()) std::this_thread::yield();
  REQUIRE_OK(disk->Discard(0, kCb));
  std::atomic<bool> flushed{false};
  std::thread flusher([&] {
    CHECK_OK(disk->Flush());
    flushed = true;
  });
  // Give a flush that does not wait for the reader the chance to finish, so
  // that B would reuse A's cluster (the yields only make a bug show; nothing
  // depends on them when the disk is right).
  for (int i = 0; i < 10000 && !flushed.load(); ++i) std::this_thread::yield();
  REQUIRE_OK(disk->Write(kCb, Tagged(kSectorsPerCluster, kSectorsPerCluster, 6)));  // B
  fs.Release();
  reader.join();
  flusher.join();
  for (uint64_t s = 0; s < kSectorsPerCluster; ++s) {
    CAPTURE(s);
    CHECK(SectorVersion(got.data() + s * kSector, s) == 5);
  }
  auto b = ReadRange(*disk, kCb, kCb);
  CHECK(SectorVersion(b.data(), kSectorsPerCluster) == 6);
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(mem, d) == "");
}

// --- Crash tests ---------------------------------------------------------------

// A concurrent workload in two phases with flushes: the threads' programs,
// then a flush; then more programs with flushes among them, then a flush.
// `fs` may cut the power at any point. Records which operations completed
// and which flushes succeeded, on one sequence of events.
struct CrashRun {
  // Per op (by thread and index): the event number at which it completed
  // OK, or 0 when it failed.
  std::vector<std::vector<uint64_t>> done;
  // Event numbers at which successful flushes started.
  std::vector<uint64_t> flush_starts;
};

CrashRun RunCrashWorkload(ServedDisk& disk, const std::vector<std::vector<Op>>& phase1,
                          const std::vector<std::vector<Op>>& phase2) {
  CrashRun r;
  std::atomic<uint64_t> events{1};
  std::mutex mu;
  const size_t n1 = phase1[0].size();
  r.done.assign(phase1.size(), std::vector<uint64_t>(n1 + phase2[0].size(), 0));
  auto flush = [&] {
    uint64_t start = events.fetch_add(1);
    if (disk.Flush().ok()) {
      std::lock_guard lock(mu);
      r.flush_starts.push_back(start);
    }
  };
  for (int phase = 0; phase < 2; ++phase) {
    const auto& programs = phase == 0 ? phase1 : phase2;
    std::vector<std::thread> threads;
    for (size_t t = 0; t < programs.size(); ++t) {
      threads.emplace_back([&, t] {
        for (size_t i = 0; i < programs[t].size(); ++i) {
          const Op& op = programs[t][i];
          Status s;
          if (op.kind == Op::kWrite) {
            s = disk.Write(op.first_sector * kSector,
                           Tagged(op.first_sector, op.sectors, op.version));
          } else if (op.kind == Op::kDiscard) {
            s = disk.Discard(op.first_sector * kSector, op.sectors * kSector);
          } else if (op.kind == Op::kFlush) {
            flush();
            continue;
          } else {
            continue;
          }
          uint64_t at = events.fetch_add(1);
          if (s.ok()) r.done[t][(phase == 0 ? 0 : n1) + i] = at;
        }
      });
    }
    for (auto& t : threads) t.join();
    flush();
  }
  return r;
}

TEST_CASE(
    "served disk crash: cut after every write of a concurrent workload - flushed data survives") {
  TestRng rng;
  const uint64_t clusters = 16;
  const size_t ops = 12;
  for (Setup setup : {Setup::kSingle, Setup::kSnapshot}) {
    CAPTURE(SetupName(setup));
    uint64_t next_version = kBaseVersion + 1;
    std::vector<std::vector<Op>> phase1, phase2;
    for (int t = 0; t < kThreads; ++t) {
      phase1.push_back(MakeProgram(rng.engine(), t, clusters, ops, &next_version, false));
    }
    for (int t = 0; t < kThreads; ++t) {
      phase2.push_back(MakeProgram(rng.engine(), t, clusters, ops, &next_version, true));
    }
    std::vector<std::vector<Op>> programs(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      programs[t] = phase1[t];
      programs[t].insert(programs[t].end(), phase2[t].begin(), phase2[t].end());
    }
    // How many mutating calls a run makes (it varies a little with the
    // interleaving; cut points past the end are crashes after a clean run).
    uint64_t total = 0;
    {
      MemoryFileSystem mem;
      DiskFiles d = MakeDisk(mem, "", setup, clusters);
      FaultFileSystem fs(mem);
      auto disk = Serve(fs, d);
      RunCrashWorkload(*disk, phase1, phase2);
      total = fs.mutation_count();
    }
    REQUIRE(total > 50);
    for (uint64_t k = 1; k <= total + 2; ++k) {
      CAPTURE(k);
      MemoryFileSystem mem;
      DiskFiles d = MakeDisk(mem, "", setup, clusters);
      auto lower = LowerContents(mem, d);
      FaultFileSystem fs(mem);
      const CrashMode mode = k % 3 == 0   ? CrashMode::kKeepAll
                             : k % 3 == 1 ? CrashMode::kDropAll
                                          : CrashMode::kRandom;
      CrashRun r;
      {
        auto chain = OpenChain(fs, d, true);
        REQUIRE_OK(chain);
        fs.CutAfter(k, /*torn=*/k % 2 == 0);
        auto disk = ServedDisk::Create(std::move(chain).value());
        if (disk.ok()) {
          r = RunCrashWorkload(**disk, phase1, phase2);
          // The power is gone before the disk closes: whatever Close() tries
          // after the cut fails.
        } else {
          r.done.assign(kThreads, std::vector<uint64_t>(2 * ops, 0));
        }
      }
      REQUIRE_OK(fs.Crash(mode, rng.seed() + k));
      CHECK(LowerContents(mem, d) == lower);
      // Every sector: the version of its last write or discard that a
      // successful flush covered (or the initial content), or of a later one.
      History h(d.sectors());
      std::vector<size_t> durable(d.sectors(), 0);  // how many of h[s] are covered
      for (int t = 0; t < kThreads; ++t) {
        for (size_t i = 0; i < programs[t].size(); ++i) {
          const Op& op = programs[t][i];
          if (op.kind != Op::kWrite && op.kind != Op::kDiscard) continue;
          uint64_t at = r.done[t][i];
          bool flushed = at != 0 && std::any_of(r.flush_starts.begin(), r.flush_starts.end(),
                                                [&](uint64_t f) { return f > at; });
          for (uint64_t s = op.first_sector; s < op.first_sector + op.sectors; ++s) {
            h[s].push_back(op.kind == Op::kWrite ? op.version : 0);
            if (flushed) durable[s] = h[s].size();
          }
        }
      }
      auto check_versions = [&](const std::vector<int64_t>& v, const char* when) {
        uint64_t wrong = 0;
        for (uint64_t s = 0; s < d.sectors(); ++s) {
          std::vector<int64_t> ok;
          if (durable[s] == 0) ok.push_back(static_cast<int64_t>(d.initial[s]));
          for (size_t i = durable[s] == 0 ? 0 : durable[s] - 1; i < h[s].size(); ++i) {
            ok.push_back(static_cast<int64_t>(h[s][i]));
          }
          if (std::find(ok.begin(), ok.end(), v[s]) == ok.end() && ++wrong <= 5) {
            MESSAGE(std::string(when)
                    << ": sector " << s << " reads as version " << v[s] << "; durable writes "
                    << durable[s] << " of " << h[s].size());
          }
        }
        CHECK(wrong == 0);
      };
      check_versions(Versions(mem, d), "after the crash");
      // A writable open checks and repairs; the content stays.
      {
        auto repaired = OpenChain(mem, d, true);
        REQUIRE_OK(repaired);
        REQUIRE_OK((*repaired)->Close());
      }
      CHECK(TopProblems(mem, d) == "");
      check_versions(Versions(mem, d), "after the repair");
    }
  }
}

// --- BlockFile under concurrency, IoGate ---------------------------------------

void ConcurrentFileIo(FileSystem& fs, const std::string& path) {
  REQUIRE_ASSIGN(auto file, fs.Create(path, /*exclusive=*/true));
  constexpr int kWriters = 4;
  constexpr uint64_t kSlot = 4096;
  constexpr uint64_t kSlots = 64;  // per thread, interleaved with the others
  std::vector<std::thread> threads;
  std::atomic<uint64_t> bad{0};
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t round = 1; round <= 20; ++round) {
        for (uint64_t i = 0; i < kSlots; ++i) {
          uint64_t slot = i * kWriters + t;
          std::vector<std::byte> data(kSlot, std::byte(round * 16 + t));
          if (!file->WriteAt(slot * kSlot, data).ok()) bad.fetch_add(1);
        }
        for (uint64_t i = 0; i < kSlots; ++i) {
          uint64_t slot = i * kWriters + t;
          std::vector<std::byte> got(kSlot);
          if (!file->ReadAt(slot * kSlot, got).ok() ||
              got != std::vector<std::byte>(kSlot, std::byte(round * 16 + t))) {
            bad.fetch_add(1);
          }
        }
        if (t == 0 && !file->Sync().ok()) bad.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(bad.load() == 0);
  REQUIRE_ASSIGN(uint64_t size, file->Size());
  CHECK(size == kWriters * kSlots * kSlot);
}

TEST_CASE("block files: concurrent ReadAt/WriteAt/Sync on disjoint ranges (memory - fault)") {
  MemoryFileSystem mem;
  ConcurrentFileIo(mem, "a");
  FaultFileSystem fault(mem);
  ConcurrentFileIo(fault, "b");
  // The fault file system's journal saw every write: keep-all replays them.
  REQUIRE_OK(fault.Crash(CrashMode::kKeepAll));
  CHECK(mem.Contents("b").size() == 4 * 64 * 4096);
}

TEST_CASE("io gate: Synchronize waits for requests that entered before it - Close for all") {
  IoGate gate;
  std::atomic<int> step{0};
  std::optional<IoGate::Pass> held(gate.Enter());
  std::thread sync([&] {
    gate.Synchronize();
    step = 1;
  });
  // A request entering now does not hold the grace period up.
  { IoGate::Pass later = gate.Enter(); }
  for (int i = 0; i < 100 && step.load() == 0; ++i) std::this_thread::yield();
  CHECK(step.load() == 0);
  CHECK(gate.in_flight() == 1);
  held.reset();
  sync.join();
  CHECK(step.load() == 1);

  gate.Close();
  std::atomic<bool> entered{false};
  std::thread blocked([&] {
    IoGate::Pass p = gate.Enter();
    entered = true;
  });
  for (int i = 0; i < 100; ++i) std::this_thread::yield();
  CHECK_FALSE(entered.load());
  gate.Open();
  blocked.join();
  CHECK(entered.load());
  CHECK(gate.in_flight() == 0);
}

TEST_SUITE_END();

TEST_SUITE_BEGIN("posix");

void DirectIoMix() {
  // Aligned requests take the O_DIRECT descriptor, those asked to go
  // buffered (and unaligned ones) the buffered one; both must see each
  // other's data, from many threads at once.
  TempDir dir;
  PosixFileSystem fs;
  DiskFiles d = MakeDisk(fs, dir.path(), Setup::kSnapshot, 32);
  REQUIRE_ASSIGN(auto chain, OpenChain(fs, d, /*writable=*/true));
  ServedDiskOptions options;
  options.direct_io = true;
  REQUIRE_ASSIGN(auto disk, ServedDisk::Create(std::move(chain), options));
  if (disk->io_alignment() == 1) testing::Skip("the temp dir's file system has no direct I/O");
  const uint64_t align = disk->io_alignment();
  auto aligned_copy = [&](const std::vector<std::byte>& data) {
    auto* p = static_cast<std::byte*>(std::aligned_alloc(align, data.size()));
    std::memcpy(p, data.data(), data.size());
    return std::unique_ptr<std::byte, decltype(&std::free)>(p, &std::free);
  };
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t round = 1; round <= 6; ++round) {
        for (uint64_t c = t; c < 32; c += kThreads) {
          // A whole cluster aligned, then a 4 KiB piece aligned but asked
          // to go buffered, then a 4 KiB piece aligned (direct): each must
          // read back either way.
          const uint64_t s0 = c * kSectorsPerCluster;
          auto whole = Tagged(s0, kSectorsPerCluster, 100 * round + t);
          auto a = aligned_copy(whole);
          if (!DiskWrite(*disk, c * kCb, std::span<const std::byte>(a.get(), kCb)).ok()) ++bad;
          auto piece = aligned_copy(Tagged(s0 + 8, 8, 100 * round + t + 50));
          if (!DiskWrite(*disk, (s0 + 8) * kSector, std::span<const std::byte>(piece.get(), 4096),
                         ServedDisk::Caching::kBuffered)
                   .ok())
            ++bad;
          auto b = aligned_copy(Tagged(s0 + 16, 8, 100 * round + t + 60));
          if (!DiskWrite(*disk, (s0 + 16) * kSector, std::span<const std::byte>(b.get(), 4096))
                   .ok())
            ++bad;
          auto out = aligned_copy(std::vector<std::byte>(kCb));
          if (!DiskRead(*disk, c * kCb, std::span<std::byte>(out.get(), kCb)).ok()) ++bad;
          for (uint64_t i = 0; i < kSectorsPerCluster; ++i) {
            int64_t want = i >= 8 && i < 16    ? 100 * round + t + 50
                           : i >= 16 && i < 24 ? 100 * round + t + 60
                                               : 100 * round + t;
            if (SectorVersion(out.get() + i * kSector, s0 + i) != want) ++bad;
          }
        }
        if (t == 0 && !disk->Flush().ok()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(bad.load() == 0);
  REQUIRE_OK(disk->Close());
  CHECK(TopProblems(fs, d) == "");
  auto v = Versions(fs, d);
  for (uint64_t c = 0; c < 32; ++c) {
    int t = static_cast<int>(c % kThreads);
    CHECK(v[c * kSectorsPerCluster] == 600 + t);
    CHECK(v[c * kSectorsPerCluster + 8] == 650 + t);
    CHECK(v[c * kSectorsPerCluster + 16] == 660 + t);
  }
}

TEST_CASE("served disk with direct I/O on real files: aligned and unaligned requests mix") {
  DirectIoMix();
}

TEST_CASE("served disk on real files: concurrent random workload matches the model") {
  TempDir dir;
  PosixFileSystem fs;
  ModelTest(fs, fs, dir.path(), Setup::kSnapshot, 300);
  ConcurrentFileIo(fs, dir / "io");
}

TEST_CASE("served disk: plans cover reads and in-place writes - the rest goes the usual way") {
  TempDir dir;
  PosixFileSystem fs;
  DiskFiles d = MakeDisk(fs, dir.path(), Setup::kSnapshot, 8);  // the base holds even clusters
  auto disk = Serve(fs, d);
  ServedDisk::Plan plan;
  // A write into a cluster the top lacks allocates: no plan.
  auto data = Tagged(kSectorsPerCluster, 2, 7);
  CHECK_FALSE(disk->PlanWrite(kCb, data, ServedDisk::Caching::kDirectWhenAligned, &plan));
  CHECK_FALSE(plan.active());
  CHECK(disk->counters().in_flight == 0);
  REQUIRE_OK(disk->Write(kCb, data));
  // Now the top holds cluster 1: a plan of one piece in the top's file.
  auto data2 = Tagged(kSectorsPerCluster + 4, 2, 8);
  REQUIRE(disk->PlanWrite(kCb + 4 * kSector, data2, ServedDisk::Caching::kBuffered, &plan));
  CHECK(plan.active());
  CHECK(disk->counters().in_flight == 1);  // the plan holds the gate
  REQUIRE(plan.pieces().size() == 1);
  CHECK(plan.pieces()[0].fd >= 0);
  CHECK(plan.pieces()[0].length == 2 * kSector);
  CHECK(plan.pieces()[0].buffer_offset == 0);
  const uint64_t writes = disk->counters().writes;
  for (const auto& p : plan.pieces()) REQUIRE(Transfer(p, data2.data(), true));
  disk->Finish(&plan, true);
  CHECK_FALSE(plan.active());
  CHECK(disk->counters().in_flight == 0);
  CHECK(disk->counters().writes == writes + 1);
  // A read over clusters 0 (the base), 1 (the top), 3 (nowhere: zeros).
  std::vector<std::byte> got(4 * kCb, std::byte{0x5a});
  REQUIRE(disk->PlanRead(0, got, &plan));
  bool zeros = false;
  uint64_t covered = 0;
  for (const auto& p : plan.pieces()) {
    CHECK(p.buffer_offset == covered);  // in buffer order, each byte once
    covered += p.length;
    zeros = zeros || p.fd < 0;
    REQUIRE(Transfer(p, got.data(), false));
  }
  CHECK(covered == got.size());
  CHECK(zeros);
  disk->Finish(&plan, true);
  CHECK(got == ReadRange(*disk, 0, 4 * kCb));
  CHECK(SectorVersion(got.data() + (kSectorsPerCluster + 4) * kSector, kSectorsPerCluster + 4) ==
        8);
  CHECK(SectorVersion(got.data() + 3 * kCb, 3 * kSectorsPerCluster) == 0);
  // A failed transfer counts nothing; the caller redoes it with Read().
  const uint64_t reads = disk->counters().reads;
  REQUIRE(disk->PlanRead(0, std::span(got).first(kCb), &plan));
  disk->Finish(&plan, false);
  CHECK(disk->counters().reads == reads);
  // Range errors and a disk being quiesced: no plan (Read() reports the
  // error, or waits).
  CHECK_FALSE(disk->PlanRead(8 * kCb - kSector, std::span(got).first(2 * kSector), &plan));
  bool planned_while_quiesced = true;
  REQUIRE_OK(disk->ReplaceLayers([&](std::vector<std::unique_ptr<Image>>&) -> Status {
    planned_while_quiesced = disk->PlanRead(0, std::span(got).first(kCb), &plan);
    return Status::Ok();
  }));
  CHECK_FALSE(planned_while_quiesced);
  REQUIRE_OK(disk->Close());
  CHECK_FALSE(disk->PlanRead(0, std::span(got).first(kCb), &plan));
  CHECK(disk->counters().in_flight == 0);
  // Read-only: reads are planned, writes are not.
  auto ro = Serve(fs, d, /*writable=*/false);
  CHECK_FALSE(ro->PlanWrite(kCb, data2, ServedDisk::Caching::kBuffered, &plan));
  REQUIRE(ro->PlanRead(0, std::span(got).first(kCb), &plan));
  ro->Finish(&plan, true);
  // Files without kernel descriptors (in memory): no plans at all.
  MemoryFileSystem mem;
  DiskFiles m = MakeDisk(mem, "", Setup::kSnapshot, 8);
  auto in_memory = Serve(mem, m);
  CHECK_FALSE(in_memory->PlanRead(0, std::span(got).first(kCb), &plan));
  CHECK(in_memory->counters().in_flight == 0);
}

TEST_CASE("served disk on real files: requests through plans match the model") {
  for (Setup setup : {Setup::kSnapshot, Setup::kRawChain, Setup::kSingle}) {
    TempDir dir;
    PosixFileSystem fs;
    ThroughPlans plans;
    ModelTest(fs, fs, dir.path(), setup, 300);
    CHECK(plans.planned() > 100);
  }
  ThroughPlans plans;
  DirectIoMix();
  CHECK(plans.planned() > 100);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
