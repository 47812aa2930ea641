// DeltaBuilder, the receiver's delta writer (label unit): a write-back
// error that a background SyncData() saw fails the next Checkpoint(), whose
// own sync would not see it again (the kernel reports it once per open
// file), so a checkpoint never covers data the disk lost.
#include "snapshot/delta_builder.h"

#include <cerrno>
#include <vector>

#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using stream::DeltaBuilder;

constexpr uint64_t kCb = 64 * 1024;

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

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
