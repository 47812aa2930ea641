// BlockExport and the NBD export's rules: block status (allocation
// extents), fast-zero decisions, zeroing over chains, the Status -> errno
// mapping, closing, opening disks and snapshots for serving, and many
// threads at once through the serialising layer.
#include "mount-helper/block_export.h"

#include <atomic>
#include <cerrno>
#include <latch>
#include <thread>

#include "layer_support.h"
#include "ploop/chain.h"
#include "ploop/delta.h"
#include "ploop/disk.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/raw_image.h"
#include "snapshot/snapshot.h"
#include "test_support.h"

namespace ploop::mount {
namespace {

using testing::MakeLayer;
using testing::OpenChain;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * 1024;

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
  auto img = OpenChain(fs, {"img"}, false);
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
  auto chain = OpenChain(fs, {"base", "mid", "top"}, false);
  REQUIRE_ASSIGN(auto e, AllocationExtents(*chain, 0, 8 * kCb, false));
  CHECK(e == std::vector<Extent>{Hole(0, kCb), Data(kCb, kCb), Hole(2 * kCb, kCb),
                                 Data(3 * kCb, 2 * kCb), Hole(5 * kCb, 3 * kCb)});

  REQUIRE_OK(RawImage::Create(fs, "base.raw", 4 * kCb).status());
  MakeLayer(fs, "over-raw", 8 * kCb, {{6 * kCb, Pattern(kCb, 4)}});
  auto layered = OpenChain(fs, {"base.raw", "over-raw"}, false);
  REQUIRE_ASSIGN(auto r, AllocationExtents(*layered, 0, 8 * kCb, false));
  CHECK(r == std::vector<Extent>{Data(0, 4 * kCb), Hole(4 * kCb, 2 * kCb), Data(6 * kCb, kCb),
                                 Hole(7 * kCb, kCb)});
}

TEST_CASE("extents: an empty range or one past the end is refused") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 4 * kCb, {});
  auto img = OpenChain(fs, {"img"}, false);
  CHECK(AllocationExtents(*img, 0, 0, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, 4 * kCb, 1, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, 1, 4 * kCb, false).error().code() == StatusCode::kInvalidArgument);
  CHECK(AllocationExtents(*img, ~0ull, 2, false).error().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("fast zero: nothing to do - or whole top clusters to unmap - never data to write") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 8 * kCb, {{2 * kCb, Pattern(2 * kCb, 7)}});
  auto img = OpenChain(fs, {"img"}, true);
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
  auto pre = OpenChain(fs, {"pre"}, true);
  REQUIRE_ASSIGN(bool pre_fast, ZeroIsFast(*pre, 0, 4 * kCb, true));
  CHECK_FALSE(pre_fast);  // a preallocated image writes zeros in place

  MakeLayer(fs, "base", 8 * kCb, {{6 * kCb, Pattern(kCb, 9)}});
  MakeLayer(fs, "top", 8 * kCb, {});
  auto chain = OpenChain(fs, {"base", "top"}, true);
  REQUIRE_ASSIGN(bool below, ZeroIsFast(*chain, 6 * kCb, kCb, true));
  CHECK_FALSE(below);  // a zero cluster must hide the base's data
  REQUIRE_ASSIGN(bool beside, ZeroIsFast(*chain, 0, 6 * kCb, true));
  CHECK(beside);
}

TEST_CASE("zero: fast-only refuses without changing anything - unmap frees top clusters") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 8 * kCb, {{kCb, Pattern(3 * kCb, 5)}});
  auto e = SerializeImage(OpenChain(fs, {"img"}, true));
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
  auto e = SerializeImage(OpenChain(fs, {"base", "top"}, true));
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

TEST_CASE("close flushes and marks the image clean - later calls fail") {
  MemoryFileSystem fs;
  MakeLayer(fs, "img", 4 * kCb, {});
  auto e = SerializeImage(OpenChain(fs, {"img"}, true));
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
  auto e = SerializeImage(OpenChain(fs, {"img"}, false));
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
  auto e = SerializeImage(OpenChain(fs, {"base", "top"}, true));
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
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
