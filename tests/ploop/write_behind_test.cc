// WriteBehind, the receiver's writer threads (label unit):
//   - writes land in the order queued, and an After() function runs only
//     once every write queued before it is done;
//   - with several threads, writes run side by side, a write does not wait
//     for an After() function queued before it, a write waits for an
//     earlier one it overlaps, and random writes and After() functions
//     keep their order (checked against a model of the file);
//   - a failed write is kept: later writes are skipped, After() functions
//     still run (buffers go home), Write() and Drain() return the error;
//   - a write larger than the queue's bound still goes (alone).
#include "snapshot/write_behind.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "forwarding_file_system.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using stream::WriteBehind;
using testing::TestRng;
using Bytes = std::vector<std::byte>;

// Long enough for any machine to start a thread; a wait that runs out is
// a failure (the writes were not side by side), not a slow test.
constexpr auto kPatience = std::chrono::seconds(20);

// A new file "f" of `fs`.
std::unique_ptr<BlockFile> NewFile(MemoryFileSystem& fs) {
  auto file = fs.Create("f", /*exclusive=*/true);
  REQUIRE(file.ok());
  return std::move(*file);
}

// A file whose writes count how many of them are under way at once; a
// write can be held until `gather` writes are inside together.
class WatchedFile final : public testing::ForwardingBlockFile {
 public:
  explicit WatchedFile(std::unique_ptr<BlockFile> base) : ForwardingBlockFile(std::move(base)) {}

  void Gather(int n) {
    std::lock_guard lock(mu_);
    gather_ = n;
  }
  // Holds the first write until `n` other writes are done and no other
  // write is under way.
  void HoldFirst(int n) {
    std::lock_guard lock(mu_);
    hold_first_ = n;
  }
  int most_at_once() {
    std::lock_guard lock(mu_);
    return most_;
  }
  int started() {
    std::lock_guard lock(mu_);
    return started_;
  }
  // Whether the write of `data` (told apart by where its bytes are) is done.
  bool Done(const std::byte* data) {
    std::lock_guard lock(mu_);
    return std::find(done_.begin(), done_.end(), data) != done_.end();
  }
  // Waits (at most kPatience) until `n` writes have started.
  bool WaitStarted(int n) {
    std::unique_lock lock(mu_);
    return changed_.wait_for(lock, kPatience, [&] { return started_ >= n; });
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    {
      std::unique_lock lock(mu_);
      const bool first = started_++ == 0;
      most_ = std::max(most_, ++inside_);
      changed_.notify_all();
      changed_.wait_for(lock, kPatience, [&] { return inside_ >= gather_; });
      if (first && hold_first_ > 0) {
        changed_.wait_for(lock, kPatience, [&] {
          return static_cast<int>(done_.size()) >= hold_first_ && inside_ == 1;
        });
      }
    }
    Status s = base().WriteAt(offset, data);
    std::lock_guard lock(mu_);
    --inside_;
    done_.push_back(data.data());
    changed_.notify_all();
    return s;
  }

 private:
  std::mutex mu_;
  std::condition_variable changed_;
  int gather_ = 0;
  int inside_ = 0;
  int most_ = 0;
  int started_ = 0;
  int hold_first_ = 0;
  std::vector<const std::byte*> done_;
};

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

TEST_CASE("write behind: writes run side by side on its threads") {
  MemoryFileSystem fs;
  WatchedFile file(NewFile(fs));
  // Each write is held until all four are under way: only four threads
  // writing at once let them through without waiting out kPatience.
  file.Gather(4);
  const Bytes data = Filled(4096, 5);
  WriteBehind writer(/*max_queued_bytes=*/1 << 20, /*threads=*/4);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE_OK(writer.Write(file, i * data.size(), data));
  REQUIRE_OK(writer.Drain());
  CHECK(file.most_at_once() == 4);
  CHECK(ReadAll(fs, "f") == Filled(4 * data.size(), 5));
}

TEST_CASE("write behind: a write does not wait for an After() function queued before it") {
  MemoryFileSystem fs;
  WatchedFile file(NewFile(fs));
  const Bytes a = Filled(4096, 1);
  const Bytes b = Filled(4096, 2);
  bool saw_b_start = false;
  {
    WriteBehind writer(/*max_queued_bytes=*/1 << 20, /*threads=*/2);
    REQUIRE_OK(writer.Write(file, 0, a));
    // Runs after `a` is done; returns once `b`, queued behind it, started.
    writer.After([&] { saw_b_start = file.WaitStarted(2); });
    REQUIRE_OK(writer.Write(file, 4096, b));
    REQUIRE_OK(writer.Drain());
  }
  CHECK(saw_b_start);
}

TEST_CASE("write behind: a write waits for an earlier write it overlaps") {
  MemoryFileSystem fs;
  WatchedFile file(NewFile(fs));
  // `a` is held until `c` (which overlaps nothing) is done and nothing else
  // is being written: a `b` that did not wait for `a` would be done by then,
  // and `a` would land over it.
  file.HoldFirst(1);
  const Bytes a = Filled(4096, 1);
  const Bytes b = Filled(4096, 2);
  const Bytes c = Filled(4096, 3);
  {
    WriteBehind writer(/*max_queued_bytes=*/1 << 20, /*threads=*/3);
    REQUIRE_OK(writer.Write(file, 0, a));
    REQUIRE_OK(writer.Write(file, 2048, b));
    REQUIRE_OK(writer.Write(file, 8192, c));
    REQUIRE_OK(writer.Drain());
  }
  Bytes expected = Filled(2048, 1);
  expected.insert(expected.end(), b.begin(), b.end());
  expected.resize(8192);
  expected.insert(expected.end(), c.begin(), c.end());
  CHECK(ReadAll(fs, "f") == expected);
}

TEST_CASE("write behind: with four threads, overlapping writes and After() keep their order") {
  TestRng rng;
  INFO("PLOOP_TEST_SEED=" << rng.seed());
  constexpr size_t kFileBytes = 64 * 1024;
  constexpr int kItems = 400;
  MemoryFileSystem fs;
  WatchedFile file(NewFile(fs));
  Bytes model(kFileBytes);
  std::vector<Bytes> writes;  // kept alive (and in place) until Drain()
  writes.reserve(kItems);
  int afters = 0;
  std::vector<int> missed;  // After() functions that found an earlier write not done
  std::vector<int> order;   // the After() functions, as they ran
  {
    WriteBehind writer(/*max_queued_bytes=*/16 * 1024, /*threads=*/4);
    for (int i = 0; i < kItems; ++i) {
      if (!writes.empty() && rng.Uniform(0, 9) == 0) {
        // Writes queued after it may be done too: only the earlier ones
        // must be.
        writer.After([&, n = afters++, before = writes.size()] {
          order.push_back(n);
          for (size_t w = 0; w < before; ++w) {
            if (!file.Done(writes[w].data())) missed.push_back(n);
          }
        });
        continue;
      }
      const uint64_t offset = rng.Uniform(0, kFileBytes - 1);
      const uint64_t size = rng.Uniform(1, std::min<uint64_t>(8192, kFileBytes - offset));
      writes.push_back(Filled(size, static_cast<int>(rng.Uniform(1, 255))));
      std::copy(writes.back().begin(), writes.back().end(), model.begin() + offset);
      REQUIRE_OK(writer.Write(file, offset, writes.back()));
    }
    REQUIRE_OK(writer.Drain());
  }
  REQUIRE(afters > 0);
  CHECK(missed.empty());
  std::vector<int> in_order(afters);
  for (int i = 0; i < afters; ++i) in_order[i] = i;
  CHECK(order == in_order);
  // Where writes overlap, the later one won.
  Bytes contents = ReadAll(fs, "f");
  contents.resize(kFileBytes);  // bytes never written read as zeros
  CHECK(contents == model);
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

TEST_CASE("write behind: with four threads, a failed write fails the rest too") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  REQUIRE_ASSIGN(auto file, fs.Create("f", /*exclusive=*/true));
  fs.FailNth(FaultOp::kWrite, 3, ENOSPC);
  const Bytes data = Filled(4096, 1);
  std::atomic<int> released{0};
  WriteBehind writer(/*max_queued_bytes=*/1 << 20, /*threads=*/4);
  for (uint64_t i = 0; i < 8; ++i) {
    Status s = writer.Write(*file, i * data.size(), data);
    if (!s.ok()) CHECK(s.code() == StatusCode::kNoSpace);
    writer.After([&] { released.fetch_add(1); });
  }
  CHECK(writer.Drain().code() == StatusCode::kNoSpace);
  CHECK(released.load() == 8);
  CHECK(writer.Write(*file, 0, data).code() == StatusCode::kNoSpace);
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
