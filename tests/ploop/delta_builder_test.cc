// DeltaBuilder, the receiver's delta writer (label unit):
//   - a write-back error that a background SyncData() saw fails the next
//     Checkpoint(), whose own sync would not see it again (the kernel
//     reports it once per open file), so a checkpoint never covers data
//     the disk lost;
//   - appends through a WriteBehind land in space reserved ahead of them,
//     never more than the delta can hold; Finish() and Resume() cut the
//     reserve off, and the files end byte-identical to ones built without
//     a writer;
//   - a file system that is full or cannot reserve still gets every
//     cluster; one whose reservation fails otherwise fails the append.
#include "snapshot/delta_builder.h"

#include <cerrno>
#include <optional>
#include <vector>

#include "ploop/format.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "snapshot/write_behind.h"
#include "test_support.h"

namespace ploop {
namespace {

using stream::DeltaBuilder;
using stream::WriteBehind;

constexpr uint64_t kCb = 64 * 1024;
constexpr uint64_t kDiskBytes = 64 * kCb;

std::vector<std::byte> ClusterOf(uint64_t index) {
  return std::vector<std::byte>(kCb, static_cast<std::byte>(index + 1));
}

// Appends clusters `indices` (each filled with its index + 1), one at a
// time, through a WriteBehind of four threads when `queued`; then a
// checkpoint.
void AppendAll(DeltaBuilder& b, const std::vector<uint64_t>& indices, bool queued) {
  std::optional<WriteBehind> writer;
  if (queued) writer.emplace(/*max_queued_bytes=*/4 * kCb, /*threads=*/4);
  b.UseWriteBehind(queued ? &*writer : nullptr);
  std::vector<std::vector<std::byte>> data;  // alive until the writer is drained
  data.reserve(indices.size());
  for (uint64_t index : indices) {
    data.push_back(ClusterOf(index));
    REQUIRE_OK(b.Append(std::span(&index, 1), data.back()));
  }
  REQUIRE_OK(b.Checkpoint());  // drains the writer
  b.UseWriteBehind(nullptr);
}

// The delta a builder without a writer makes of `indices`.
std::vector<std::byte> Plain(const std::vector<uint64_t>& indices) {
  MemoryFileSystem mem;
  REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(mem, "d.hds", kDiskBytes, kCb));
  AppendAll(*b, indices, /*queued=*/false);
  REQUIRE_OK(b->Finish());
  return mem.Contents("d.hds");
}

uint64_t FirstDataByte() {
  REQUIRE_ASSIGN(Header h, MakeHeader(kDiskBytes, kCb));
  return h.first_block_bytes();
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("delta builder: a failed background sync fails the next checkpoint") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  REQUIRE_ASSIGN(auto builder, DeltaBuilder::Create(fs, "d.hds", 16 * kCb, kCb));
  const std::vector<std::byte> data(kCb, std::byte{7});
  const uint64_t index = 3;
  REQUIRE_OK(builder->Append(std::span(&index, 1), data));
  fs.FailNth(FaultOp::kSync, 1, EIO);
  CHECK(builder->SyncData().code() == StatusCode::kIOError);
  // The checkpoint's own sync succeeds; the error must still stop it.
  CHECK(builder->Checkpoint().code() == StatusCode::kIOError);
  CHECK(builder->Finish().code() == StatusCode::kIOError);
}

TEST_CASE(
    "delta builder: syncs that succeed leave checkpoints alone - zero clusters read as zeros") {
  MemoryFileSystem mem;
  REQUIRE_ASSIGN(auto builder, DeltaBuilder::Create(mem, "d.hds", 16 * kCb, kCb));
  const std::vector<std::byte> data(kCb, std::byte{7});
  const uint64_t index = 3;
  REQUIRE_OK(builder->Append(std::span(&index, 1), data));
  REQUIRE_OK(builder->SyncData());
  REQUIRE_OK(builder->AppendZero(5));
  REQUIRE_OK(builder->Checkpoint());
  CHECK(builder->Holds(3));
  CHECK(builder->Holds(5));
  CHECK(builder->data_clusters() == 2);
  REQUIRE_OK(builder->Finish());
  // The zero cluster went in after the data cluster.
  const std::vector<std::byte> file = mem.Contents("d.hds");
  REQUIRE(file.size() >= 2 * kCb);
  const std::vector<std::byte> last(file.end() - kCb, file.end());
  CHECK(last == std::vector<std::byte>(kCb));
  const std::vector<std::byte> before(file.end() - 2 * kCb, file.end() - kCb);
  CHECK(before == data);
}

TEST_CASE("delta builder: appends through a writer are reserved ahead and the reserve is cut off") {
  const std::vector<uint64_t> first = {9, 3, 40};
  const std::vector<uint64_t> second = {1, 2, 60, 61, 62, 7, 8, 10, 11, 12};
  std::vector<uint64_t> all = first;
  all.insert(all.end(), second.begin(), second.end());
  const std::vector<std::byte> plain = Plain(all);
  REQUIRE(plain.size() == FirstDataByte() + all.size() * kCb);
  SUBCASE("finished") {
    MemoryFileSystem mem;
    REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(mem, "d.hds", kDiskBytes, kCb));
    AppendAll(*b, first, /*queued=*/true);
    // More reserved than the three clusters appended, but never more than
    // the delta can hold (one cluster per BAT entry).
    CHECK(mem.Contents("d.hds").size() > FirstDataByte() + first.size() * kCb);
    CHECK(mem.Contents("d.hds").size() <= FirstDataByte() + kDiskBytes);
    AppendAll(*b, second, /*queued=*/true);
    CHECK(mem.Contents("d.hds").size() > FirstDataByte() + all.size() * kCb);
    CHECK(mem.Contents("d.hds").size() <= FirstDataByte() + kDiskBytes);
    REQUIRE_OK(b->Finish());
    CHECK(mem.Contents("d.hds") == plain);
  }
  SUBCASE("resumed from a checkpoint") {
    MemoryFileSystem mem;
    {
      REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(mem, "d.hds", kDiskBytes, kCb));
      AppendAll(*b, first, /*queued=*/true);
    }
    CHECK(mem.Contents("d.hds").size() > FirstDataByte() + first.size() * kCb);
    REQUIRE_ASSIGN(auto b, DeltaBuilder::Resume(mem, "d.hds", kDiskBytes, kCb, first.size()));
    CHECK(mem.Contents("d.hds").size() == FirstDataByte() + first.size() * kCb);
    AppendAll(*b, second, /*queued=*/true);
    REQUIRE_OK(b->Finish());
    CHECK(mem.Contents("d.hds") == plain);
  }
}

TEST_CASE("delta builder: the reserve never passes what a small delta can hold") {
  constexpr uint64_t kSmallDisk = 4 * kCb;
  REQUIRE_ASSIGN(Header h, MakeHeader(kSmallDisk, kCb));
  MemoryFileSystem mem;
  REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(mem, "d.hds", kSmallDisk, kCb));
  AppendAll(*b, {2}, /*queued=*/true);
  CHECK(mem.Contents("d.hds").size() > h.first_block_bytes() + kCb);
  CHECK(mem.Contents("d.hds").size() <= h.first_block_bytes() + kSmallDisk);
  AppendAll(*b, {0, 1, 3}, /*queued=*/true);
  CHECK(mem.Contents("d.hds").size() == h.first_block_bytes() + kSmallDisk);
  REQUIRE_OK(b->Finish());
  CHECK(mem.Contents("d.hds").size() == h.first_block_bytes() + kSmallDisk);
}

TEST_CASE("delta builder: a file system that cannot reserve still gets every cluster") {
  const std::vector<uint64_t> indices = {5, 6, 7, 0, 33, 34, 35, 36, 37, 38, 39, 20};
  const std::vector<std::byte> plain = Plain(indices);
  for (int err : {ENOSPC, EOPNOTSUPP}) {
    for (uint64_t nth : {1, 2}) {
      INFO("reservation " << nth << " fails with errno " << err);
      MemoryFileSystem mem;
      FaultFileSystem fs(mem);
      REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(fs, "d.hds", kDiskBytes, kCb));
      fs.FailFrom(FaultOp::kAllocate, nth, err);
      AppendAll(*b, indices, /*queued=*/true);
      REQUIRE_OK(b->Finish());
      CHECK(mem.Contents("d.hds") == plain);
    }
  }
}

TEST_CASE("delta builder: a reservation that fails with an I/O error fails the append") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  REQUIRE_ASSIGN(auto b, DeltaBuilder::Create(fs, "d.hds", kDiskBytes, kCb));
  fs.FailNth(FaultOp::kAllocate, 1, EIO);
  WriteBehind writer(/*max_queued_bytes=*/4 * kCb, /*threads=*/4);
  b->UseWriteBehind(&writer);
  const std::vector<std::byte> data = ClusterOf(4);
  const uint64_t index = 4;
  CHECK(b->Append(std::span(&index, 1), data).code() == StatusCode::kIOError);
  CHECK(!b->Holds(4));
  REQUIRE_OK(writer.Drain());
  b->UseWriteBehind(nullptr);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
