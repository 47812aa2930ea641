// BlockExport and the NBD export's rules: block status (allocation
// extents), fast-zero decisions, zeroing (every flag combination) over
// chains, the Status -> errno mapping, closing, opening disks, snapshots and
// single images for serving, and many threads at once through the
// ServedDisk-backed export (checked against a per-thread model).
#include "mount-helper/block_export.h"

#include <atomic>
#include <barrier>
#include <cerrno>
#include <latch>
#include <random>
#include <thread>

#include "layer_support.h"
#include "ploop/chain.h"
#include "ploop/delta.h"
#include "ploop/disk.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/raw_image.h"
#include "ploop/served_disk.h"
#include "snapshot/snapshot.h"
#include "test_support.h"

namespace ploop::mount {
namespace {

using testing::MakeLayer;
using testing::OpenChain;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * 1024;

// Serves an open chain as the NBD export does.
std::unique_ptr<ServedDisk> Serve(std::unique_ptr<Chain> chain) {
  auto disk = ServedDisk::Create(std::move(chain));
  REQUIRE_OK(disk);
  return std::move(disk).value();
}

std::unique_ptr<BlockExport> Export(std::unique_ptr<Chain> chain) {
  return ExportServedDisk(Serve(std::move(chain)));
}

std::vector<std::byte> ReadAll(BlockExport& e, uint64_t off, uint64_t len) {
  std::vector<std::byte> out(len);
  REQUIRE_OK(e.Read(off, out));
  return out;
}

std::vector<std::byte> ReadFile(MemoryFileSystem& fs, const std::string& path) {
  auto f = fs.Open(path, OpenMode::kReadOnly);
  REQUIRE_OK(f);
  auto size = (*f)->Size();
  REQUIRE_OK(size);
  std::vector<std::byte> out(*size);
  REQUIRE_OK((*f)->ReadAt(0, out));
  return out;
}

Extent Data(uint64_t off, uint64_t len) { return Extent{off, len, true}; }
Extent Hole(uint64_t off, uint64_t len) { return Extent{off, len, false}; }

TEST_SUITE_BEGIN("unit");

TEST_CASE("extents: data and holes at cluster granularity - merged and clipped to the request") {
  MemoryFileSystem fs;
  // Clusters 0, 1 and 4 hold data; 2, 3, 5..7 are holes.
  MakeLayer(fs, "img", 8 * kCb, {{0, Pattern(2 * kCb, 0x11)}, {4 * kCb + 100, Pattern(10, 0x22)}});
  auto img = Serve(OpenChain(fs, {"img"}, false));
  REQUIRE_ASSIGN(auto all, AllocationExtents(*img, 0, 8 * kCb, false));
  CHECK(all == std::vector<Extent>{Data(0, 2 * kCb), Hole(2 * kCb, 2 * kCb), Data(4 * kCb, kCb),
                                   Hole(5 * kCb, 3 * kCb)});
  // Unaligned start and end: runs are cut at the request's bounds.
  REQUIRE_ASSIGN(auto mid, AllocationExtents(*img, kCb + 7, 3 * kCb, false));
  CHECK(mid ==
        std::vector<Extent>{Data(kCb + 7, kCb - 7), Hole(2 * kCb, 2 * kCb), Data(4 * kCb, 7)});
  // REQ_ONE: just the run holding the offset, as long as it goes.
  REQUIRE_ASSIGN(auto one, AllocationExtents(*img, 2 * kCb + 1, 6 * kCb - 1, true));
  CHECK(one == std::vector<Extent>{Hole(2 * kCb + 1, 2 * kCb - 1)});
  REQUIRE_ASSIGN(auto tail, AllocationExtents(*img, 8 * kCb - 1, 1, false));
  CHECK(tail == std::vector<Extent>{Hole(8 * kCb - 1, 1)});
}

TEST_CASE("extents: a cluster is data when any layer holds it and a raw base holds everything") {
  MemoryFileSystem fs;
  MakeLayer(fs, "base", 8 * kCb, {{kCb, Pattern(kCb, 1)}});
  MakeLayer(fs, "mid", 8 * kCb, {{3 * kCb, Pattern(kCb, 2)}});
  MakeLayer(fs, "top", 8 * kCb, {{4 * kCb, Pattern(kCb, 3)}});
  auto chain = Serve(OpenChain(fs, {"base", "mid", "top"}, false));
  REQUIRE_ASSIGN(auto e, AllocationExtents(*chain, 0, 8 * kCb, false));
  CHECK(e == std::vector<Extent>{Hole(0, kCb), Data(kCb, kCb), Hole(2 * kCb, kCb),
                                 Data(3 * kCb, 2 * kCb), Hole(5 * kCb, 3 * kCb)});

  REQUIRE_OK(RawImage::Create(fs, "base.raw", 4 * kCb).status());
  MakeLayer(fs, "over-raw", 8 * kCb, {{6 * kCb, Pattern(kCb, 4)}});
  auto layered = Serve(OpenChain(fs, {"base.raw", "over-raw"}, false));
  REQUIRE_ASSIGN(auto r, AllocationExtents(*layered, 0, 8 * kCb, false));
  CHECK(r == std::vector<Extent>{Data(0, 4 * kCb), Hole(4 * kCb, 2 * kCb), Data(6 * kCb, kCb),
                                 Hole(7 * kCb, kCb)});
}

TEST_CASE("extents: an empty range or one past the end is refused") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 4 * kCb, {});
  auto img = Serve(OpenChain(fs, {"img"}, false));
  CHECK(AllocationExtents(*img, 0, 0, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, 4 * kCb, 1, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, 1, 4 * kCb, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, ~0ull, 2, false).error().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("fast zero: nothing to do - or whole top clusters to unmap - never data to write") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 8 * kCb, {{2 * kCb, Pattern(2 * kCb, 7)}});
  auto img = Serve(OpenChain(fs, {"img"}, true));
  auto fast = [&](uint64_t off, uint64_t len, bool unmap) {
    auto r = ZeroIsFast(*img, off, len, unmap);
    REQUIRE_OK(r);
    return *r;
  };
  CHECK(fast(0, 2 * kCb, false));              // unallocated: reads as zeros already
  CHECK(fast(5 * kCb + 3, 100, false));        // part of an unallocated cluster
  CHECK(fast(2 * kCb, 2 * kCb, true));         // whole allocated clusters, unmapped
  CHECK(fast(0, 8 * kCb, true));               // the whole disk
  CHECK_FALSE(fast(2 * kCb, 2 * kCb, false));  // must stay allocated: zeros written
  CHECK_FALSE(fast(2 * kCb, kCb + 1, true));   // part of cluster 3 is written
  CHECK_FALSE(fast(2 * kCb + 1, kCb, true));

  MakeLayer(fs, "pre", 4 * kCb, {}, kCb, ImageKind::kPreallocated);
  auto pre = Serve(OpenChain(fs, {"pre"}, true));
  REQUIRE_ASSIGN(bool pre_fast, ZeroIsFast(*pre, 0, 4 * kCb, true));
  CHECK_FALSE(pre_fast);  // a preallocated image writes zeros in place

  MakeLayer(fs, "base", 8 * kCb, {{6 * kCb, Pattern(kCb, 9)}});
  MakeLayer(fs, "top", 8 * kCb, {});
  auto chain = Serve(OpenChain(fs, {"base", "top"}, true));
  REQUIRE_ASSIGN(bool below, ZeroIsFast(*chain, 6 * kCb, kCb, true));
  CHECK_FALSE(below);  // a zero cluster must hide the base's data
  REQUIRE_ASSIGN(bool beside, ZeroIsFast(*chain, 0, 6 * kCb, true));
  CHECK(beside);
}

TEST_CASE("zero: fast-only refuses without changing anything - unmap frees top clusters") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 8 * kCb, {{kCb, Pattern(3 * kCb, 5)}});
  auto e = Export(OpenChain(fs, {"img"}, true));
  // Cluster 1 partly: not fast, refused, untouched.
  Status s = e->Zero(kCb + 10, 100, true, true);
  CHECK(s.code() == StatusCode::kNotSupported);
  CHECK(NbdErrno(s) == ENOTSUP);
  CHECK(ReadAll(*e, kCb, kCb) == Pattern(kCb, 5));
  // Whole clusters 2..3 with unmap, fast: gone from the allocation.
  REQUIRE_OK(e->Zero(2 * kCb, 2 * kCb, true, true));
  CHECK(ReadAll(*e, 2 * kCb, 2 * kCb) == Pattern(2 * kCb, 0));
  REQUIRE_ASSIGN(auto ext, e->Extents(0, 8 * kCb, false));
  CHECK(ext == std::vector<Extent>{Hole(0, kCb), Data(kCb, kCb), Hole(2 * kCb, 6 * kCb)});
  // Without unmap (NBD "no hole"): zeros are written, the cluster stays.
  REQUIRE_OK(e->Zero(kCb, kCb, false, false));
  CHECK(ReadAll(*e, kCb, kCb) == Pattern(kCb, 0));
  REQUIRE_ASSIGN(auto ext2, e->Extents(kCb, kCb, false));
  CHECK(ext2 == std::vector<Extent>{Data(kCb, kCb)});
  // Zeros over holes allocate nothing, with or without unmap.
  REQUIRE_OK(e->Zero(5 * kCb, 2 * kCb, false, false));
  REQUIRE_ASSIGN(auto ext3, e->Extents(4 * kCb, 4 * kCb, false));
  CHECK(ext3 == std::vector<Extent>{Hole(4 * kCb, 4 * kCb)});
  REQUIRE_OK(e->Close());
}

TEST_CASE("zero and trim over a snapshot's data write zeros into the top - the base is untouched") {
  MemoryFileSystem fs;
  TestRng rng;
  auto base_data = rng.Bytes(4 * kCb);
  MakeLayer(fs, "base", 4 * kCb, {{0, base_data}});
  MakeLayer(fs, "top", 4 * kCb, {});
  auto base_before = ReadFile(fs, "base");
  auto e = Export(OpenChain(fs, {"base", "top"}, true));
  REQUIRE_OK(e->Zero(0, kCb, true, false));
  REQUIRE_OK(e->Trim(kCb, kCb));
  REQUIRE_OK(e->Zero(2 * kCb + 10, 20, false, false));
  CHECK(ReadAll(*e, 0, 2 * kCb) == Pattern(2 * kCb, 0));
  auto c2 = ReadAll(*e, 2 * kCb, kCb);
  std::vector<std::byte> want(base_data.begin() + 2 * kCb, base_data.begin() + 3 * kCb);
  std::fill(want.begin() + 10, want.begin() + 30, std::byte{0});
  CHECK(c2 == want);
  REQUIRE_OK(e->Close());
  CHECK(ReadFile(fs, "base") == base_before);
}

TEST_CASE(
    "zero: every flag combination over holes - top data - a snapshot's data - part of a cluster") {
  // Clusters: 0 only the base holds, 1 both, 2..3 only the top, 4..7 none.
  struct Case {
    const char* what;
    uint64_t offset, length;
    bool lower;       // a lower layer holds data there: never fast
    bool top_whole;   // whole clusters only the top holds: fast with unmap
    bool stays_data;  // allocated afterwards without unmap
  };
  const Case cases[] = {
      {"hole", 5 * kCb, 2 * kCb, false, false, false},
      {"top only, whole", 2 * kCb, 2 * kCb, false, true, true},
      {"base only", 0, kCb, true, false, true},
      {"top over base", kCb, kCb, true, false, true},
      {"part of a top cluster", 3 * kCb + 10, 100, false, false, true},
  };
  TestRng rng;
  auto base_data = rng.Bytes(2 * kCb);
  auto top_data = rng.Bytes(3 * kCb);
  for (const Case& c : cases) {
    for (int flags = 0; flags < 4; ++flags) {
      const bool may_unmap = flags & 1;
      const bool fast_only = flags & 2;
      CAPTURE(c.what);
      CAPTURE(may_unmap);
      CAPTURE(fast_only);
      MemoryFileSystem fs;
      MakeLayer(fs, "base", 8 * kCb, {{0, base_data}});
      MakeLayer(fs, "top", 8 * kCb, {{kCb, top_data}});
      auto base_before = ReadFile(fs, "base");
      auto e = Export(OpenChain(fs, {"base", "top"}, true));
      auto before = ReadAll(*e, 0, 8 * kCb);
      const bool fast = !c.lower && (c.top_whole ? may_unmap : !c.stays_data);
      Status s = e->Zero(c.offset, c.length, may_unmap, fast_only);
      auto after = ReadAll(*e, 0, 8 * kCb);
      if (fast_only && !fast) {
        CHECK(s.code() == StatusCode::kNotSupported);
        CHECK(after == before);  // refused: nothing changed
      } else {
        REQUIRE_OK(s);
        auto want = before;
        std::fill(want.begin() + c.offset, want.begin() + c.offset + c.length, std::byte{0});
        CHECK(after == want);  // zeros there, never the base's data; the rest kept
        REQUIRE_ASSIGN(auto ext, e->Extents(c.offset, c.length, true));
        const bool unmapped = may_unmap && c.top_whole;
        CHECK(ext == std::vector<Extent>{Extent{c.offset, c.length, c.stays_data && !unmapped}});
      }
      REQUIRE_OK(e->Close());
      CHECK(ReadFile(fs, "base") == base_before);
    }
  }
}

TEST_CASE("trim over a snapshot: whole and partial clusters read zeros - never the base's data") {
  MemoryFileSystem fs;
  TestRng rng;
  auto base_data = rng.Bytes(4 * kCb);
  MakeLayer(fs, "base", 4 * kCb, {{0, base_data}});
  MakeLayer(fs, "top", 4 * kCb, {{2 * kCb, Pattern(kCb, 0x33)}});
  auto base_before = ReadFile(fs, "base");
  auto e = Export(OpenChain(fs, {"base", "top"}, true));
  REQUIRE_OK(e->Trim(0, kCb));          // only the base holds it: a zero cluster
  REQUIRE_OK(e->Trim(kCb + 100, 200));  // part of it: copied up with zeros
  REQUIRE_OK(e->Trim(2 * kCb, kCb));    // the top's copy over the base: zeros
  REQUIRE_OK(e->Trim(3 * kCb + kCb / 2, kCb / 2));
  REQUIRE_OK(e->Flush());
  auto want = base_data;
  std::fill(want.begin(), want.begin() + kCb, std::byte{0});
  std::fill(want.begin() + kCb + 100, want.begin() + kCb + 300, std::byte{0});
  std::fill(want.begin() + 2 * kCb, want.begin() + 3 * kCb, std::byte{0});
  std::fill(want.begin() + 3 * kCb + kCb / 2, want.end(), std::byte{0});
  CHECK(ReadAll(*e, 0, 4 * kCb) == want);
  // Every cluster hides base data, so all stay allocated (data).
  REQUIRE_ASSIGN(auto ext, e->Extents(0, 4 * kCb, false));
  CHECK(ext == std::vector<Extent>{Data(0, 4 * kCb)});
  REQUIRE_OK(e->Close());
  CHECK(ReadFile(fs, "base") == base_before);
  auto reopened = Export(OpenChain(fs, {"base", "top"}, false));
  CHECK(ReadAll(*reopened, 0, 4 * kCb) == want);
}

TEST_CASE("close flushes and marks the image clean - later calls fail") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 4 * kCb, {});
  auto e = Export(OpenChain(fs, {"img"}, true));
  REQUIRE_OK(e->Write(100, Pattern(5000, 0x42)));
  {
    // Written and not closed: the image is marked in use.
    OpenOptions peek;
    peek.lock = false;
    REQUIRE_ASSIGN(auto d, Delta::Open(fs, "img", peek));
    CHECK(d->header().dirty());
  }
  REQUIRE_OK(e->Close());
  std::vector<std::byte> buf(10);
  CHECK(e->Read(0, buf).code() == StatusCode::kFailedPrecondition);
  CHECK(e->Flush().code() == StatusCode::kFailedPrecondition);
  CHECK(e->Close().code() == StatusCode::kFailedPrecondition);
  OpenOptions ro;
  REQUIRE_ASSIGN(auto d, Delta::Open(fs, "img", ro));
  CHECK_FALSE(d->header().dirty());
  std::vector<std::byte> back(5000);
  REQUIRE_OK(d->Read(100, back));
  CHECK(back == Pattern(5000, 0x42));
}

TEST_CASE("a read-only export refuses writes - zeros and trims") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 4 * kCb, {{0, Pattern(kCb, 1)}});
  auto e = Export(OpenChain(fs, {"img"}, false));
  CHECK_FALSE(e->writable());
  Status w = e->Write(0, Pattern(10, 2));
  CHECK(w.code() == StatusCode::kFailedPrecondition);
  CHECK(NbdErrno(w) == EPERM);
  CHECK(e->Zero(0, kCb, true, false).code() == StatusCode::kFailedPrecondition);
  CHECK(e->Trim(0, kCb).code() == StatusCode::kFailedPrecondition);
  CHECK(ReadAll(*e, 0, kCb) == Pattern(kCb, 1));
}

TEST_CASE("NbdErrno maps every status to an errno NBD can carry") {
  CHECK(NbdErrno(Status::Ok()) == 0);
  CHECK(NbdErrno(Status::InvalidArgument("x")) == EINVAL);
  CHECK(NbdErrno(Status::NoSpace("x")) == ENOSPC);
  CHECK(NbdErrno(Status::FromErrno(ENOSPC, "x")) == ENOSPC);
  CHECK(NbdErrno(Status::NotSupported("x")) == ENOTSUP);
  CHECK(NbdErrno(Status::FailedPrecondition("x")) == EPERM);
  CHECK(NbdErrno(Status::Corruption("x")) == EIO);
  CHECK(NbdErrno(Status::FromErrno(EBADF, "x")) == EIO);
  CHECK(NbdErrno(Status::Busy("x")) == EIO);
  CHECK(NbdErrno(Status::NotFound("x")) == EIO);
}

TEST_CASE("many threads reading - writing - zeroing and asking for extents at once") {
  // Every thread owns its clusters, but they share the image's allocator,
  // BAT and free lists: whole-cluster writes allocate, unmapping zeros free,
  // flushes make freed clusters reusable. Without serialisation two threads
  // get the same file cluster (a read-back mismatch) or corrupt the lists.
  MemoryFileSystem fs;
  constexpr int kThreads = 8;
  constexpr uint64_t kClustersEach = 4;
  constexpr uint64_t kRegion = kClustersEach * kCb;
  TestRng rng;
  auto base_data = rng.Bytes(kThreads * kRegion);
  MakeLayer(fs, "base", 2 * kThreads * kRegion, {{0, base_data}});
  MakeLayer(fs, "top", 2 * kThreads * kRegion, {});
  auto e = Export(OpenChain(fs, {"base", "top"}, true));
  std::atomic<int> failures{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int round = 0; round < 300; ++round) {
        const auto value = static_cast<uint8_t>(t * 16 + round % 16);
        // A fresh cluster in the half without base data: allocates.
        const uint64_t fresh =
            (kThreads * kClustersEach + t * kClustersEach + round % kClustersEach) * kCb;
        auto data = Pattern(kCb, value);
        if (!e->Write(fresh, data).ok()) ++failures;
        // A partial write over base data: copy-up.
        const uint64_t over = t * kRegion + (round * 4099) % (kRegion - 1000);
        auto small = Pattern(1000, value);
        if (!e->Write(over, small).ok()) ++failures;
        std::vector<std::byte> back(kCb);
        if (!e->Read(fresh, back).ok() || back != data) ++failures;
        std::vector<std::byte> back_small(1000);
        if (!e->Read(over, back_small).ok() || back_small != small) ++failures;
        if (!e->Extents(t * kRegion, kRegion, false).ok()) ++failures;
        // Unmap the fresh cluster again: freed, reusable after a flush.
        if (!e->Zero(fresh, kCb, true, round % 2 == 0).ok()) ++failures;
        if (!e->Read(fresh, back).ok() || back != Pattern(kCb, 0)) ++failures;
        if (round % 7 == 0 && !e->Flush().ok()) ++failures;
      }
      // Finally one known pattern over the whole region.
      if (!e->Write(t * kRegion, Pattern(kRegion, static_cast<uint8_t>(0x80 + t))).ok()) {
        ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  for (int t = 0; t < kThreads; ++t) {
    CHECK(ReadAll(*e, t * kRegion, kRegion) == Pattern(kRegion, static_cast<uint8_t>(0x80 + t)));
  }
  REQUIRE_OK(e->Close());
}

TEST_CASE(
    "many threads: random writes - zeros - trims - flushes and reads on disjoint ranges match a "
    "model") {
  // Each thread owns a range of 2.5 clusters over a base full of data, so
  // neighbours share clusters: allocations, copy-ups and partial trims of
  // one cluster race under its lock, whole-cluster trims free clusters that
  // flushes make reusable while others allocate. Every thread keeps what
  // its range must read as; a mismatch is a cluster mapped twice, data of
  // a neighbour, or the base's older data showing through.
  MemoryFileSystem fs;
  constexpr int kThreads = 6;
  constexpr uint64_t kRange = 5 * kCb / 2;
  constexpr uint64_t kDisk = kThreads * kRange + kCb;
  TestRng rng;  // its seed (printed) also seeds every thread
  const uint64_t seed = rng.seed();
  auto base_data = rng.Bytes(kDisk);
  MakeLayer(fs, "base", kDisk, {{0, base_data}});
  MakeLayer(fs, "top", kDisk, {});
  auto e = Export(OpenChain(fs, {"base", "top"}, true));
  std::vector<std::vector<std::byte>> model(kThreads);
  std::atomic<int> failures{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const uint64_t first = t * kRange;
      auto& mine = model[t];
      mine.assign(base_data.begin() + first, base_data.begin() + first + kRange);
      std::mt19937_64 gen(seed + t);
      auto pick = [&](uint64_t n) {
        return std::uniform_int_distribution<uint64_t>(0, n - 1)(gen);
      };
      start.arrive_and_wait();
      for (int op = 0; op < 400; ++op) {
        // A random piece of the range, often a whole aligned cluster.
        uint64_t off, len;
        if (pick(3) == 0) {
          const uint64_t c = (first + kCb - 1) / kCb + pick(2);  // a cluster inside the range
          off = c * kCb - first;
          len = std::min<uint64_t>(kCb, kRange - off);
        } else {
          off = pick(kRange);
          len = 1 + pick(std::min<uint64_t>(kRange - off, 2 * kCb));
        }
        switch (pick(6)) {
          case 0:
          case 1: {
            std::vector<std::byte> data(len);
            for (auto& b : data) b = static_cast<std::byte>(gen());
            if (!e->Write(first + off, data).ok()) ++failures;
            std::copy(data.begin(), data.end(), mine.begin() + off);
            break;
          }
          case 2: {
            const bool unmap = pick(2), fast = pick(2);
            Status s = e->Zero(first + off, len, unmap, fast);
            if (s.ok()) {
              std::fill(mine.begin() + off, mine.begin() + off + len, std::byte{0});
            } else if (!(fast && s.code() == StatusCode::kNotSupported)) {
              ++failures;
            }
            break;
          }
          case 3:
            if (!e->Trim(first + off, len).ok()) ++failures;
            std::fill(mine.begin() + off, mine.begin() + off + len, std::byte{0});
            break;
          case 4:
            if (!e->Flush().ok()) ++failures;
            if (!e->Extents(first, kRange, pick(2)).ok()) ++failures;
            break;
          default: {
            std::vector<std::byte> back(len);
            if (!e->Read(first + off, back).ok() ||
                !std::equal(back.begin(), back.end(), mine.begin() + off)) {
              ++failures;
            }
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  for (int t = 0; t < kThreads; ++t) CHECK(ReadAll(*e, t * kRange, kRange) == model[t]);
  REQUIRE_OK(e->Close());
  // After closing, the files hold the same disk.
  auto reopened = Export(OpenChain(fs, {"base", "top"}, false));
  for (int t = 0; t < kThreads; ++t) CHECK(ReadAll(*reopened, t * kRange, kRange) == model[t]);
  CHECK(ReadAll(*reopened, kThreads * kRange, kCb) ==
        std::vector<std::byte>(base_data.end() - kCb, base_data.end()));
}

TEST_CASE(
    "many threads: first writes to the halves of one fresh cluster race - both halves survive") {
  // In every round, pairs of threads write the two halves of a cluster the
  // top does not hold yet, all starting together: each write allocates
  // (zero-filled where nothing is below, copied up over the base's data in
  // odd rounds). Two allocations of one cluster would publish one half and
  // lose the other, or show the base's data through a half.
  MemoryFileSystem fs;
  constexpr int kPairs = 3;
  constexpr int kRounds = 300;
  constexpr uint64_t kDisk = 2 * kRounds * kPairs * kCb;
  // The base holds every even cluster: even rounds use even clusters
  // (copy-up), odd rounds odd ones (zero-filled).
  TestRng rng;
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> base_writes;
  for (uint64_t c = 0; c < kDisk / kCb; c += 2) base_writes.push_back({c * kCb, rng.Bytes(kCb)});
  MakeLayer(fs, "base", kDisk, base_writes);
  MakeLayer(fs, "top", kDisk, {});
  auto e = Export(OpenChain(fs, {"base", "top"}, true));
  auto cluster_of = [&](int round, int pair) -> uint64_t {
    return static_cast<uint64_t>(round) * 2 * kPairs + 2 * pair + round % 2;
  };
  std::barrier sync(2 * kPairs);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2 * kPairs; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < kRounds; ++round) {
        const uint64_t at = cluster_of(round, t / 2) * kCb + (t % 2) * (kCb / 2);
        auto data = Pattern(kCb / 2, static_cast<uint8_t>(1 + t + round));
        sync.arrive_and_wait();
        if (!e->Write(at, data).ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  for (int round = 0; round < kRounds; ++round) {
    for (int pair = 0; pair < kPairs; ++pair) {
      const uint64_t c = cluster_of(round, pair);
      std::vector<std::byte> want;
      for (int half = 0; half < 2; ++half) {
        auto p = Pattern(kCb / 2, static_cast<uint8_t>(1 + 2 * pair + half + round));
        want.insert(want.end(), p.begin(), p.end());
      }
      CAPTURE(round);
      CAPTURE(pair);
      CHECK(ReadAll(*e, c * kCb, kCb) == want);
    }
  }
  REQUIRE_OK(e->Close());
}

TEST_CASE("OpenExport: a disk - a snapshot (read-only) and a single image") {
  MemoryFileSystem fs;
  CreateOptions o;
  o.size_bytes = 8 * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(fs, "ct/root.hds", o));
  const std::string dd = "ct/DiskDescriptor.xml";
  {
    REQUIRE_ASSIGN(auto e, OpenExport(fs, ExportTarget{dd, "", true, {}}));
    REQUIRE_OK(e->Write(0, Pattern(kCb, 0xa1)));
    REQUIRE_OK(e->Close());
  }
  REQUIRE_ASSIGN(std::string snap, CreateSnapshot(fs, dd, ""));
  {
    REQUIRE_ASSIGN(auto e, OpenExport(fs, ExportTarget{dd, "", true, {}}));
    REQUIRE_OK(e->Write(0, Pattern(kCb, 0xb2)));
    REQUIRE_OK(e->Close());
  }
  REQUIRE_ASSIGN(auto s, OpenExport(fs, ExportTarget{dd, snap, false, {}}));
  CHECK_FALSE(s->writable());
  CHECK(ReadAll(*s, 0, kCb) == Pattern(kCb, 0xa1));
  REQUIRE_OK(s->Close());
  auto w = OpenExport(fs, ExportTarget{dd, snap, true, {}});
  CHECK(w.error().code() == StatusCode::kFailedPrecondition);
  auto missing =
      OpenExport(fs, ExportTarget{dd, "{11111111-2222-3333-4444-555555555555}", false, {}});
  CHECK(missing.error().code() == StatusCode::kNotFound);
  auto bare = OpenExport(fs, ExportTarget{"ct/root.hds", snap, false, {}});
  CHECK(bare.error().code() == StatusCode::kInvalidArgument);
  // A single image file: served as a chain of one layer.
  MakeLayer(fs, "single.hdd", 4 * kCb, {{kCb, Pattern(kCb, 0xc3)}});
  {
    REQUIRE_ASSIGN(auto e, OpenExport(fs, ExportTarget{"single.hdd", "", true, {}}));
    CHECK(e->writable());
    CHECK(ReadAll(*e, kCb, kCb) == Pattern(kCb, 0xc3));
    REQUIRE_OK(e->Write(3 * kCb, Pattern(kCb, 0xd4)));
    REQUIRE_ASSIGN(auto ext, e->Extents(0, 4 * kCb, false));
    CHECK(ext == std::vector<Extent>{Hole(0, kCb), Data(kCb, kCb), Hole(2 * kCb, kCb),
                                     Data(3 * kCb, kCb)});
    REQUIRE_OK(e->Close());
  }
  REQUIRE_ASSIGN(auto single, OpenExport(fs, ExportTarget{"single.hdd", "", false, {}}));
  CHECK_FALSE(single->writable());
  CHECK(ReadAll(*single, 3 * kCb, kCb) == Pattern(kCb, 0xd4));
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
