// The test doubles the crash tests rely on: FaultFileSystem (failing the Nth
// operation, cutting the power, tearing a write, dropping unsynced data on
// Crash()) and MemoryFileSystem (holes, EOF, locks). A crash test is only as
// good as these, so they get tests of their own.
#include "ploop/io/fault_file_system.h"

#include <cerrno>
#include <cstring>

#include "ploop/io/memory_file_system.h"
#include "ploop/lock.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::Pattern;
using testing::TestRng;

std::unique_ptr<BlockFile> CreateFile(FileSystem& fs, const std::string& path) {
  auto f = fs.Create(path, /*exclusive=*/true);
  REQUIRE_OK(f);
  return std::move(f).value();
}

std::unique_ptr<BlockFile> OpenFile(FileSystem& fs, const std::string& path,
                                    OpenMode mode = OpenMode::kReadWrite) {
  auto f = fs.Open(path, mode);
  REQUIRE_OK(f);
  return std::move(f).value();
}

std::vector<std::byte> Concat(std::vector<std::byte> a, const std::vector<std::byte>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST_SUITE_BEGIN("unit");
TEST_CASE("MemoryFileSystem: holes read as zeros and reads past EOF fail") {
  MemoryFileSystem fs;
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(200000, Pattern(100, 0x11)));
  REQUIRE_ASSIGN(uint64_t size, f->Size());
  CHECK(size == 200100);
  std::vector<std::byte> buf(200000);
  REQUIRE_OK(f->ReadAt(0, buf));
  CHECK(buf == Pattern(200000, 0));

  // Growing by truncate adds a hole; punching keeps the length.
  REQUIRE_OK(f->Truncate(300000));
  std::vector<std::byte> tail(100000);
  REQUIRE_OK(f->ReadAt(200000, tail));
  CHECK(Concat(Pattern(100, 0x11), Pattern(99900, 0)) == tail);
  REQUIRE_OK(f->PunchHole(200050, 10));
  std::vector<std::byte> punched(100);
  REQUIRE_OK(f->ReadAt(200000, punched));
  CHECK(Concat(Concat(Pattern(50, 0x11), Pattern(10, 0)), Pattern(40, 0x11)) == punched);
  REQUIRE_ASSIGN(size, f->Size());
  CHECK(size == 300000);

  std::vector<std::byte> one(1);
  Status past = f->ReadAt(300000, one);
  CHECK(past.code() == StatusCode::kCorruption);
  std::vector<std::byte> straddle(10);
  CHECK(f->ReadAt(299995, straddle).code() == StatusCode::kCorruption);

  // Shrinking drops the data: growing again shows zeros, not the old bytes.
  REQUIRE_OK(f->Truncate(200010));
  REQUIRE_OK(f->Truncate(200100));
  std::vector<std::byte> regrown(100);
  REQUIRE_OK(f->ReadAt(200000, regrown));
  CHECK(Concat(Pattern(10, 0x11), Pattern(90, 0)) == regrown);
}

TEST_CASE("MemoryFileSystem: a read-only open cannot write") {
  MemoryFileSystem fs;
  CreateFile(fs, "f");
  auto ro = OpenFile(fs, "f", OpenMode::kReadOnly);
  CHECK_FALSE(ro->WriteAt(0, Pattern(10, 1)).ok());
  CHECK_FALSE(ro->Truncate(10).ok());
  CHECK(fs.Open("missing", OpenMode::kReadOnly).error().code() == StatusCode::kNotFound);
  CHECK(fs.Create("f", /*exclusive=*/true).error().code() == StatusCode::kAlreadyExists);
}

TEST_CASE("MemoryFileSystem: image locks conflict between opens - readers share") {
  MemoryFileSystem fs;
  CreateFile(fs, "img");
  {
    auto writer = OpenFile(fs, "img");
    REQUIRE_OK(LockImage(*writer, /*writable=*/true));
    auto second_writer = OpenFile(fs, "img");
    CHECK(LockImage(*second_writer, true).code() == StatusCode::kBusy);
    auto reader = OpenFile(fs, "img", OpenMode::kReadOnly);
    CHECK(LockImage(*reader, false).code() == StatusCode::kBusy);
  }
  {
    // The writer's handle is gone, so its locks are too.
    auto reader1 = OpenFile(fs, "img", OpenMode::kReadOnly);
    auto reader2 = OpenFile(fs, "img", OpenMode::kReadOnly);
    REQUIRE_OK(LockImage(*reader1, false));
    REQUIRE_OK(LockImage(*reader2, false));
    auto writer = OpenFile(fs, "img");
    CHECK(LockImage(*writer, true).code() == StatusCode::kBusy);
  }
  auto writer = OpenFile(fs, "img");
  CHECK_OK(LockImage(*writer, true));
}

TEST_CASE("MemoryFileSystem: capacity makes writes fail with NoSpace") {
  MemoryFileSystem fs;
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(0, Pattern(1000, 1)));
  fs.set_capacity_bytes(fs.used_bytes());
  // Rewriting space the file already holds needs no more.
  CHECK_OK(f->WriteAt(10, Pattern(10, 2)));
  Status s = f->WriteAt(1 << 20, Pattern(10, 3));
  CHECK(s.code() == StatusCode::kNoSpace);
  CHECK(s.error_number() == ENOSPC);
  REQUIRE_ASSIGN(uint64_t size, f->Size());
  CHECK(size == 1000);
  REQUIRE_ASSIGN(uint64_t free_bytes, fs.FreeSpace("f"));
  CHECK(free_bytes == 0);
  fs.set_capacity_bytes(0);
  CHECK_OK(f->WriteAt(1 << 20, Pattern(10, 3)));
}

TEST_CASE("FaultFileSystem: FailNth fails exactly the Nth operation with the errno") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  fs.FailNth(FaultOp::kWrite, 3, ENOSPC);
  CHECK_OK(f->WriteAt(0, Pattern(512, 1)));
  CHECK_OK(f->WriteAt(512, Pattern(512, 2)));
  Status third = f->WriteAt(1024, Pattern(512, 3));
  CHECK(third.code() == StatusCode::kNoSpace);
  CHECK(third.error_number() == ENOSPC);
  CHECK_OK(f->WriteAt(1536, Pattern(512, 4)));
  // Other kinds of operation are not counted.
  CHECK_OK(f->Sync());
  std::vector<std::byte> buf(2048);
  REQUIRE_OK(f->ReadAt(0, buf));
  CHECK(buf ==
        Concat(Concat(Pattern(512, 1), Pattern(512, 2)), Concat(Pattern(512, 0), Pattern(512, 4))));

  // Counted from the call, not from the start.
  fs.FailNth(FaultOp::kSync, 2, EIO);
  CHECK_OK(f->Sync());
  Status sync = f->Sync();
  CHECK(sync.code() == StatusCode::kIOError);
  CHECK(sync.error_number() == EIO);
  CHECK_OK(f->Sync());

  fs.FailNth(FaultOp::kOpen, 1, EACCES);
  CHECK(fs.Open("f", OpenMode::kReadOnly).error().error_number() == EACCES);
  CHECK(fs.Open("f", OpenMode::kReadOnly).ok());
}

TEST_CASE("FaultFileSystem: FailFrom fails every operation of the kind from the Nth on") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  fs.FailFrom(FaultOp::kRead, 2, EIO);
  std::vector<std::byte> buf(10);
  REQUIRE_OK(f->WriteAt(0, Pattern(10, 1)));
  CHECK_OK(f->ReadAt(0, buf));
  for (int i = 0; i < 5; ++i) CHECK(f->ReadAt(0, buf).error_number() == EIO);
  CHECK_OK(f->WriteAt(0, Pattern(10, 2)));
  fs.Reset();
  CHECK_OK(f->ReadAt(0, buf));
  CHECK(buf == Pattern(10, 2));
}

TEST_CASE("FaultFileSystem: after CutAfter(n) the (n+1)th mutation and everything later fail") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(0, Pattern(4096, 1)));
  uint64_t before = fs.mutation_count();
  fs.CutAfter(2);
  CHECK_OK(f->WriteAt(0, Pattern(512, 2)));
  CHECK_OK(f->Sync());
  CHECK_FALSE(fs.cut());
  std::vector<std::byte> buf(512);
  CHECK_OK(f->ReadAt(0, buf));  // reads do not count
  Status at_cut = f->WriteAt(512, Pattern(512, 3));
  CHECK(at_cut.error_number() == EIO);
  CHECK(fs.cut());
  CHECK(fs.mutation_count() == before + 3);
  CHECK(f->ReadAt(0, buf).error_number() == EIO);
  CHECK(f->Sync().error_number() == EIO);
  CHECK(f->Truncate(0).error_number() == EIO);
  CHECK(f->PunchHole(0, 512).error_number() == EIO);
  CHECK(f->Allocate(0, 8192).error_number() == EIO);
  CHECK(fs.Open("f", OpenMode::kReadOnly).error().error_number() == EIO);
  CHECK(fs.Create("g", false).error().error_number() == EIO);
  CHECK(fs.Remove("f").error_number() == EIO);
  // The write at the cut (not torn) reached nothing.
  auto contents = mem.Contents("f");
  CHECK(std::vector<std::byte>(contents.begin() + 512, contents.begin() + 1024) == Pattern(512, 1));
  REQUIRE_OK(fs.Crash(CrashMode::kKeepAll));
  CHECK_FALSE(fs.cut());
  CHECK(mem.Contents("f") == Concat(Pattern(512, 2), Pattern(3584, 1)));
}

TEST_CASE("FaultFileSystem: Crash(kDropAll) restores the synced content and size") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  TestRng rng;
  auto f = CreateFile(fs, "f");
  auto synced = rng.Bytes(300000);
  REQUIRE_OK(f->WriteAt(0, synced));
  REQUIRE_OK(f->Sync());

  SUBCASE("overwrite and extend by writing") {
    REQUIRE_OK(f->WriteAt(1000, rng.Bytes(5000)));
    REQUIRE_OK(f->WriteAt(299000, rng.Bytes(100000)));
  }
  SUBCASE("shrink, then grow back with writes") {
    REQUIRE_OK(f->Truncate(1000));
    REQUIRE_OK(f->WriteAt(250000, rng.Bytes(10)));
  }
  SUBCASE("punch holes") {
    REQUIRE_OK(f->PunchHole(0, 70000));
    REQUIRE_OK(f->PunchHole(100000, 5));
  }
  SUBCASE("extend by truncate and by allocate") {
    REQUIRE_OK(f->Truncate(400000));
    REQUIRE_OK(f->WriteAt(350000, rng.Bytes(10)));
    REQUIRE_OK(f->Allocate(500000, 65536));
  }
  SUBCASE("many operations of every kind, through a second handle too") {
    auto g = OpenFile(fs, "f");
    for (int i = 0; i < 50; ++i) {
      uint64_t off = rng.Uniform(0, 400000);
      switch (rng.Uniform(0, 3)) {
        case 0:
          REQUIRE_OK(f->WriteAt(off, rng.Bytes(rng.Uniform(1, 9000))));
          break;
        case 1:
          REQUIRE_OK(g->Truncate(off));
          break;
        case 2:
          REQUIRE_OK(f->PunchHole(off, rng.Uniform(1, 70000)));
          break;
        case 3:
          REQUIRE_OK(g->Allocate(off, rng.Uniform(1, 70000)));
          break;
      }
    }
  }
  CHECK(mem.Contents("f") != synced);
  REQUIRE_OK(fs.Crash(CrashMode::kDropAll));
  CHECK(mem.Contents("f") == synced);
  REQUIRE_ASSIGN(uint64_t size, f->Size());
  CHECK(size == synced.size());
}

TEST_CASE("FaultFileSystem: only writes since the last Sync() are dropped") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  auto g = CreateFile(fs, "g");
  REQUIRE_OK(f->WriteAt(0, Pattern(1024, 1)));
  REQUIRE_OK(g->WriteAt(0, Pattern(1024, 1)));
  REQUIRE_OK(f->Sync());
  REQUIRE_OK(f->WriteAt(0, Pattern(512, 2)));
  REQUIRE_OK(f->Truncate(700));
  REQUIRE_OK(f->Sync());
  REQUIRE_OK(f->WriteAt(512, Pattern(100, 3)));
  REQUIRE_OK(f->Truncate(10000));
  // g was never synced: a crash loses all of it, as a new file's data.
  REQUIRE_OK(fs.Crash(CrashMode::kDropAll));
  CHECK(mem.Contents("f") == Concat(Pattern(512, 2), Pattern(188, 1)));
  CHECK(mem.Contents("g").empty());
  REQUIRE_ASSIGN(bool g_exists, fs.Exists("g"));
  CHECK(g_exists);  // directory operations are durable at once
}

TEST_CASE("FaultFileSystem: Crash(kKeepAll) keeps every write") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  TestRng rng;
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(0, rng.Bytes(100000)));
  REQUIRE_OK(f->Sync());
  REQUIRE_OK(f->WriteAt(5000, rng.Bytes(20000)));
  REQUIRE_OK(f->PunchHole(70000, 4096));
  REQUIRE_OK(f->Truncate(90000));
  REQUIRE_OK(f->WriteAt(120000, rng.Bytes(300)));
  auto expected = mem.Contents("f");
  REQUIRE_OK(fs.Crash(CrashMode::kKeepAll));
  CHECK(mem.Contents("f") == expected);
}

TEST_CASE("FaultFileSystem: Crash(kRandom) keeps a seeded subset - later writes without earlier") {
  // Eight unsynced writes to distinct sectors: after a random crash each
  // sector holds its old or its new content, the same seed picks the same
  // subset, and across seeds a later write survives while an earlier one
  // is lost (the reordering that exposes a BAT written before its data).
  constexpr int kWrites = 8;
  auto run = [&](uint64_t seed) {
    MemoryFileSystem mem;
    FaultFileSystem fs(mem);
    auto f = CreateFile(fs, "f");
    REQUIRE_OK(f->WriteAt(0, Pattern(kWrites * 512, 0xee)));
    REQUIRE_OK(f->Sync());
    for (int i = 0; i < kWrites; ++i) {
      REQUIRE_OK(f->WriteAt(i * 512, Pattern(512, static_cast<uint8_t>(i + 1))));
    }
    REQUIRE_OK(fs.Crash(CrashMode::kRandom, seed));
    auto contents = mem.Contents("f");
    REQUIRE(contents.size() == kWrites * 512);
    std::vector<bool> kept;
    for (int i = 0; i < kWrites; ++i) {
      auto sector =
          std::vector<std::byte>(contents.begin() + i * 512, contents.begin() + (i + 1) * 512);
      bool is_new = sector == Pattern(512, static_cast<uint8_t>(i + 1));
      CHECK((is_new || sector == Pattern(512, 0xee)));
      kept.push_back(is_new);
    }
    return kept;
  };
  bool later_without_earlier = false;
  bool some_kept = false;
  bool some_dropped = false;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    auto kept = run(seed);
    CHECK(kept == run(seed));
    for (int i = 0; i < kWrites; ++i) {
      some_kept |= kept[i];
      some_dropped |= !kept[i];
      for (int j = i + 1; j < kWrites; ++j) later_without_earlier |= !kept[i] && kept[j];
    }
  }
  CHECK(some_kept);
  CHECK(some_dropped);
  CHECK(later_without_earlier);
}

TEST_CASE("FaultFileSystem: a torn write leaves a whole-sector prefix of the new data") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  TestRng rng;
  auto f = CreateFile(fs, "f");
  auto old_data = rng.Bytes(16384);
  REQUIRE_OK(f->WriteAt(0, old_data));
  REQUIRE_OK(f->Sync());
  auto new_data = rng.Bytes(8192 + 300);
  fs.CutAfter(0, /*torn=*/true);
  CHECK(f->WriteAt(1024, new_data).error_number() == EIO);
  auto after = mem.Contents("f");
  // Count how much of the new data reached the file.
  size_t prefix = 0;
  while (prefix < new_data.size() && after[1024 + prefix] == new_data[prefix]) ++prefix;
  // Random bytes may match by chance for a byte or two past the prefix.
  size_t torn = prefix / 512 * 512;
  CHECK(torn > 0);
  CHECK(torn < new_data.size());
  CHECK(std::equal(after.begin() + 1024 + torn, after.end(), old_data.begin() + 1024 + torn));
  CHECK(std::equal(after.begin(), after.begin() + 1024, old_data.begin()));

  // kKeepAll keeps the torn prefix; kDropAll would drop it.
  REQUIRE_OK(fs.Crash(CrashMode::kKeepAll));
  CHECK(mem.Contents("f") == after);
  fs.CutAfter(0, /*torn=*/true);
  CHECK_FALSE(f->WriteAt(0, rng.Bytes(4096)).ok());
  REQUIRE_OK(fs.Crash(CrashMode::kDropAll));
  CHECK(mem.Contents("f") == after);
}

TEST_CASE("FaultFileSystem: a torn write past EOF is dropped with the extension") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(0, Pattern(4096, 1)));
  REQUIRE_OK(f->Sync());
  fs.CutAfter(0, /*torn=*/true);
  CHECK_FALSE(f->WriteAt(4096, Pattern(8192, 2)).ok());
  CHECK(mem.Contents("f") == Concat(Pattern(4096, 1), Pattern(4096, 2)));
  REQUIRE_OK(fs.Crash(CrashMode::kDropAll));
  CHECK(mem.Contents("f") == Pattern(4096, 1));
}

TEST_CASE("FaultFileSystem: a crash does not replay what the base file system refused") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  auto f = CreateFile(fs, "f");
  REQUIRE_OK(f->WriteAt(0, Pattern(65536, 1)));
  REQUIRE_OK(f->Sync());
  mem.set_capacity_bytes(mem.used_bytes());
  CHECK(f->WriteAt(65536, Pattern(4096, 2)).code() == StatusCode::kNoSpace);
  CHECK(f->Allocate(65536, 65536).code() == StatusCode::kNoSpace);
  CHECK_OK(f->WriteAt(0, Pattern(512, 3)));
  mem.set_capacity_bytes(0);
  REQUIRE_OK(fs.Crash(CrashMode::kKeepAll));
  CHECK(mem.Contents("f") == Concat(Pattern(512, 3), Pattern(65024, 1)));
}

TEST_CASE("FaultFileSystem: the log names each operation") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  fs.set_logging(true);
  auto f = CreateFile(fs, "img");
  REQUIRE_OK(f->WriteAt(4096, Pattern(512, 1)));
  REQUIRE_OK(f->Sync());
  REQUIRE_OK(f->Truncate(100));
  auto log = fs.log();
  REQUIRE(log.size() == 4);
  CHECK(log[0].rfind("create img", 0) == 0);
  CHECK(log[1] == "write img 4096+512");
  CHECK(log[2].rfind("sync img", 0) == 0);
  CHECK(log[3] == "truncate img 100");
}

TEST_CASE("FaultFileSystem: Configure() arms faults from a spec") {
  MemoryFileSystem mem;
  SUBCASE("fail=") {
    FaultFileSystem fs(mem);
    REQUIRE_OK(fs.Configure("fail=write:2:ENOSPC"));
    auto f = CreateFile(fs, "f");
    CHECK_OK(f->WriteAt(0, Pattern(10, 1)));
    CHECK(f->WriteAt(0, Pattern(10, 1)).code() == StatusCode::kNoSpace);
    CHECK_OK(f->WriteAt(0, Pattern(10, 1)));
  }
  SUBCASE("failfrom= with a numeric errno") {
    FaultFileSystem fs(mem);
    REQUIRE_OK(fs.Configure("failfrom=sync:2:5"));
    auto f = CreateFile(fs, "f");
    CHECK_OK(f->Sync());
    CHECK(f->Sync().error_number() == 5);
    CHECK(f->Sync().error_number() == 5);
  }
  SUBCASE("cut= and torn") {
    FaultFileSystem fs(mem);
    REQUIRE_OK(fs.Configure("cut=1,torn"));
    auto f = CreateFile(fs, "f");
    CHECK_OK(f->WriteAt(0, Pattern(4096, 1)));
    CHECK(f->WriteAt(0, Pattern(4096, 2)).error_number() == EIO);
    CHECK(fs.cut());
    CHECK(mem.Contents("f") == Concat(Pattern(2048, 2), Pattern(2048, 1)));
  }
  SUBCASE("several items, empty items ignored") {
    FaultFileSystem fs(mem);
    REQUIRE_OK(fs.Configure("fail=open:1:EROFS,,failfrom=remove:1:EACCES"));
    CHECK(fs.Open("x", OpenMode::kReadOnly).error().error_number() == EROFS);
    CHECK(fs.Remove("x").error_number() == EACCES);
    CHECK_OK(fs.Configure(""));
  }
  SUBCASE("bad specs are rejected") {
    for (const char* bad : {"bogus", "cut=", "cut=abc", "cut=5x", "fail=write", "fail=write:2",
                            "fail=write:2:", "fail=frobnicate:1:EIO", "fail=write:x:EIO",
                            "fail=write:2x:EIO", "fail=write:1:ENOTANERRNO", "fail=write:1:5x",
                            "failfrom=read::EIO", "torn=1", "what=ever"}) {
      INFO("spec: " << std::string(bad));
      FaultFileSystem fs(mem);
      CHECK(fs.Configure(bad).code() == StatusCode::kInvalidArgument);
    }
  }
}

TEST_SUITE_END();
}  // namespace
}  // namespace ploop
