// WriteBehind, the receiver's writer thread (label unit):
//   - writes land in the order queued, and an After() function runs only
//     once every write queued before it is done;
//   - a failed write is kept: later writes are skipped, After() functions
//     still run (buffers go home), Write() and Drain() return the error;
//   - a write larger than the queue's bound still goes (alone).
#include "snapshot/write_behind.h"

#include <atomic>
#include <cerrno>
#include <vector>

#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using stream::WriteBehind;
using Bytes = std::vector<std::byte>;

Bytes Filled(size_t n, int value) { return Bytes(n, static_cast<std::byte>(value)); }

Bytes ReadAll(FileSystem& fs, const std::string& path) {
  REQUIRE_ASSIGN(auto file, fs.Open(path, OpenMode::kReadOnly));
  REQUIRE_ASSIGN(uint64_t size, file->Size());
  Bytes out(size);
  REQUIRE_OK(file->ReadAt(0, out));
  return out;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("write behind: writes land in order and After() runs behind them") {
  MemoryFileSystem fs;
  REQUIRE_ASSIGN(auto file, fs.Create("f", /*exclusive=*/true));
  const Bytes a = Filled(4096, 0xaa);
  const Bytes b = Filled(4096, 0xbb);
  const Bytes c = Filled(8192, 0xcc);
  std::vector<Bytes> seen;  // the file as each After() found it
  {
    WriteBehind writer(/*max_queued_bytes=*/8192);
    REQUIRE_OK(writer.Write(*file, 0, a));
    writer.After([&] { seen.push_back(ReadAll(fs, "f")); });
    // Overlapping the first: the later write must win.
    REQUIRE_OK(writer.Write(*file, 0, b));
    REQUIRE_OK(writer.Write(*file, 4096, c));
    writer.After([&] { seen.push_back(ReadAll(fs, "f")); });
    REQUIRE_OK(writer.Drain());
  }
  REQUIRE(seen.size() == 2);
  CHECK(seen[0] == a);
  Bytes expected = b;
  expected.insert(expected.end(), c.begin(), c.end());
  CHECK(seen[1] == expected);
  CHECK(ReadAll(fs, "f") == expected);
}

TEST_CASE("write behind: a failed write is kept and later writes are skipped") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  REQUIRE_ASSIGN(auto file, fs.Create("f", /*exclusive=*/true));
  fs.FailNth(FaultOp::kWrite, 2, ENOSPC);
  const Bytes one = Filled(4096, 1);
  const Bytes two = Filled(4096, 2);
  const Bytes three = Filled(4096, 3);
  std::atomic<int> released{0};
  WriteBehind writer(/*max_queued_bytes=*/1 << 20);
  REQUIRE_OK(writer.Write(*file, 0, one));
  REQUIRE_OK(writer.Write(*file, 4096, two));  // fails on the thread
  // Queued or refused, depending on whether the failure was seen yet;
  // either way it must not reach the file.
  Status third = writer.Write(*file, 8192, three);
  if (!third.ok()) CHECK(third.code() == StatusCode::kNoSpace);
  writer.After([&] { released.fetch_add(1); });
  Status drained = writer.Drain();
  CHECK(drained.code() == StatusCode::kNoSpace);
  CHECK(released.load() == 1);
  CHECK(writer.Write(*file, 12288, one).code() == StatusCode::kNoSpace);
  CHECK(writer.Drain().code() == StatusCode::kNoSpace);
  CHECK(ReadAll(mem, "f") == one);
}

TEST_CASE("write behind: a write larger than the bound goes alone") {
  MemoryFileSystem fs;
  REQUIRE_ASSIGN(auto file, fs.Create("f", /*exclusive=*/true));
  const Bytes big = Filled(64 * 1024, 7);
  WriteBehind writer(/*max_queued_bytes=*/4096);
  for (uint64_t i = 0; i < 8; ++i) REQUIRE_OK(writer.Write(*file, i * big.size(), big));
  REQUIRE_OK(writer.Drain());
  CHECK(ReadAll(fs, "f") == Filled(8 * big.size(), 7));
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
