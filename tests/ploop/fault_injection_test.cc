// Error paths of the image library: a full host file system (ENOSPC) and
// single failing I/O calls (FailNth on every write, sync, truncate, punch
// and read of a workload in turn). The file system itself keeps working, so
// no data is lost by a crash here; what is checked is that every error
// reaches the caller, that nothing the caller was told is durable goes
// missing, and that the image stays consistent: check finds nothing after
// a close, and it reads back as expected.
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>

#include "ploop/check.h"
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
constexpr char kPath[] = "img.hds";

std::unique_ptr<Image> Create(FileSystem& fs, uint64_t size, uint64_t cluster,
                              ImageKind kind = ImageKind::kExpanded) {
  CreateOptions options;
  options.size_bytes = size;
  options.cluster_bytes = cluster;
  options.kind = kind;
  auto image = CreateImage(fs, kPath, options);
  REQUIRE_OK(image);
  return std::move(image).value();
}

std::unique_ptr<Image> Open(FileSystem& fs, bool writable) {
  OpenOptions options;
  options.writable = writable;
  auto image = OpenImage(fs, kPath, options);
  REQUIRE_OK(image);
  return std::move(image).value();
}

std::vector<std::byte> ReadRange(Image& image, uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  REQUIRE_OK(image.Read(offset, out));
  return out;
}

std::string CheckProblems(FileSystem& fs) {
  auto file = fs.Open(kPath, OpenMode::kReadOnly);
  REQUIRE_OK(file);
  REQUIRE_ASSIGN(CheckReport report, CheckImage(**file, /*repair=*/false));
  std::string out;
  for (const auto& p : report.problems) out += p.message + "\n";
  return out;
}

TEST_SUITE_BEGIN("unit");
TEST_CASE("a write into a full file system fails with NoSpace and the image stays consistent") {
  TestRng rng;
  MemoryFileSystem fs;
  // 64K clusters match the in-memory file system's 64K pages, so every
  // new cluster needs space and a rewrite of an old one needs none.
  const uint64_t cb = 64 * kKiB;
  auto image = Create(fs, 2 * kMiB, cb);
  auto flushed = rng.Bytes(4 * cb);
  REQUIRE_OK(image->Write(0, flushed));
  REQUIRE_OK(image->Flush());

  fs.set_capacity_bytes(fs.used_bytes());
  auto lost = rng.Bytes(cb);
  Status full = image->Write(10 * cb, lost);
  CHECK(full.code() == StatusCode::kNoSpace);
  // Overwriting allocated clusters still works.
  auto rewrite = rng.Bytes(1000);
  REQUIRE_OK(image->Write(cb + 300, rewrite));
  std::memcpy(flushed.data() + cb + 300, rewrite.data(), rewrite.size());
  // A write across two new clusters when only one fits: the first may
  // land, the second must not.
  fs.set_capacity_bytes(fs.used_bytes() + cb);
  auto pair = rng.Bytes(2 * cb);
  CHECK(image->Write(20 * cb, pair).code() == StatusCode::kNoSpace);
  REQUIRE_OK(image->Flush());

  auto check_state = [&](Image& img) {
    CHECK(ReadRange(img, 0, 4 * cb) == flushed);
    REQUIRE_ASSIGN(bool allocated, img.IsAllocated(10));
    CHECK_FALSE(allocated);
    CHECK(ReadRange(img, 10 * cb, cb) == Pattern(cb, 0));
    REQUIRE_ASSIGN(allocated, img.IsAllocated(21));
    CHECK_FALSE(allocated);
    CHECK(ReadRange(img, 21 * cb, cb) == Pattern(cb, 0));
    auto first = ReadRange(img, 20 * cb, cb);
    CHECK((first == Pattern(cb, 0) ||
           first == std::vector<std::byte>(pair.begin(), pair.begin() + cb)));
  };
  check_state(*image);
  REQUIRE_OK(image->Close());
  image.reset();
  CHECK(CheckProblems(fs) == "");
  image = Open(fs, /*writable=*/false);
  check_state(*image);
  image.reset();

  // With space again the same write succeeds.
  fs.set_capacity_bytes(0);
  image = Open(fs, /*writable=*/true);
  REQUIRE_OK(image->Write(10 * cb, lost));
  REQUIRE_OK(image->Close());
  image = Open(fs, /*writable=*/false);
  CHECK(ReadRange(*image, 10 * cb, cb) == lost);
  CHECK(ReadRange(*image, 0, 4 * cb) == flushed);
}

TEST_CASE("creating an image in a full file system fails and leaves no file") {
  MemoryFileSystem fs;
  fs.set_capacity_bytes(64 * kKiB);
  CreateOptions options;
  options.size_bytes = 4 * kMiB;
  options.cluster_bytes = 64 * kKiB;
  options.kind = ImageKind::kPreallocated;
  auto image = CreateImage(fs, kPath, options);
  CHECK(image.error().code() == StatusCode::kNoSpace);
  REQUIRE_ASSIGN(bool exists, fs.Exists(kPath));
  CHECK_FALSE(exists);
}

TEST_CASE("ENOSPC while writing the BAT: flush fails - a later flush writes it") {
  TestRng rng;
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  const uint64_t cb = 32 * kKiB;
  auto image = Create(fs, kMiB, cb);
  auto data = rng.Bytes(3 * cb);
  REQUIRE_OK(image->Write(5 * cb, data));
  // Flush: sync the data, write the BAT (this fails), sync.
  fs.set_logging(true);
  fs.FailNth(FaultOp::kWrite, 1, ENOSPC);
  Status s = image->Flush();
  CHECK(s.code() == StatusCode::kNoSpace);
  auto log = fs.log();
  REQUIRE(log.size() >= 2);
  CHECK(log[0].rfind("sync", 0) == 0);
  CHECK(log[1].rfind("write img.hds 64+", 0) == 0);
  CHECK(ReadRange(*image, 5 * cb, 3 * cb) == data);
  REQUIRE_OK(image->Flush());
  REQUIRE_OK(image->Close());
  CHECK(CheckProblems(mem) == "");
  image = Open(mem, /*writable=*/false);
  CHECK(ReadRange(*image, 5 * cb, 3 * cb) == data);
}

TEST_CASE("one failing I/O call anywhere in a workload: reported - consistent - nothing lost") {
  // The workload: writes and discards on disjoint, sector-aligned ranges
  // of some clusters written before, flushes in between and a reopen. Each
  // of its calls of one kind fails in turn, with EIO or ENOSPC. A step
  // that returned OK and was followed by a successful flush must read back
  // exactly; any other step's range reads, sector by sector, as before or
  // after it.
  TestRng rng;
  const uint64_t cb = 32 * kKiB;
  const uint64_t size = 32 * cb;
  auto initial = rng.Bytes(8 * cb);

  struct Step {
    enum Kind { kWrite, kDiscard, kFlush, kReopen } kind;
    uint64_t offset_bytes = 0;
    uint64_t length_bytes = 0;
    std::vector<std::byte> data;
  };
  std::vector<Step> steps = {
      {Step::kWrite, 10 * cb, cb, rng.Bytes(cb)},
      {Step::kWrite, cb + 512, 4096, rng.Bytes(4096)},
      {Step::kDiscard, 3 * cb, cb, {}},
      {Step::kFlush, 0, 0, {}},
      {Step::kWrite, 12 * cb - 1024, 2 * cb, rng.Bytes(2 * cb)},
      {Step::kDiscard, 4 * cb + 1024, 2048, {}},
      {Step::kWrite, 6 * cb, 2 * cb, rng.Bytes(2 * cb)},
      {Step::kFlush, 0, 0, {}},
      {Step::kReopen, 0, 0, {}},
      {Step::kDiscard, 5 * cb, cb, {}},
      {Step::kWrite, 20 * cb + 4096, 8192, rng.Bytes(8192)},
      {Step::kWrite, 2 * cb, cb, Pattern(cb, 0)},
      {Step::kFlush, 0, 0, {}},
      {Step::kWrite, 25 * cb, 3 * cb, rng.Bytes(3 * cb)},
  };
  std::vector<std::byte> before(size);
  std::memcpy(before.data(), initial.data(), initial.size());

  // Runs the workload on `fs` and tells which steps failed, which are
  // certain (returned OK, and a later flush or the final close of the same
  // session did too; after a failed sync a session's flushes keep failing)
  // and whether any call failed with `expected`.
  struct Run {
    std::vector<bool> certain;
    std::vector<bool> failed;
    bool saw_expected = false;
  };
  auto run = [&](MemoryFileSystem& mem, FaultFileSystem& fs, StatusCode expected) {
    Run r;
    r.certain.assign(steps.size(), false);
    r.failed.assign(steps.size(), false);
    {
      auto image = Create(mem, size, cb);
      REQUIRE_OK(image->Write(0, initial));
      REQUIRE_OK(image->Close());
    }
    auto note = [&](const Status& s) {
      if (s.code() == expected) r.saw_expected = true;
      return s.ok();
    };
    auto open = [&]() -> std::unique_ptr<Image> {
      OpenOptions options;
      options.writable = true;
      // A failed read while opening is retried once, as a user would.
      for (int attempt = 0; attempt < 2; ++attempt) {
        auto image = OpenImage(fs, kPath, options);
        if (note(image.error())) return std::move(image).value();
      }
      FAIL("the image does not open twice in a row");
      return nullptr;
    };
    auto image = open();
    size_t unflushed_from = 0;
    auto flushed = [&](size_t upto) {
      for (size_t i = unflushed_from; i < upto; ++i) r.certain[i] = !r.failed[i];
      unflushed_from = upto;
    };
    for (size_t i = 0; i < steps.size(); ++i) {
      const Step& step = steps[i];
      Status s;
      switch (step.kind) {
        case Step::kWrite:
          s = image->Write(step.offset_bytes, step.data);
          break;
        case Step::kDiscard:
          s = image->Discard(step.offset_bytes, step.length_bytes);
          break;
        case Step::kFlush:
          s = image->Flush();
          break;
        case Step::kReopen:
          s = image->Close();
          image.reset();
          image = open();
          // A failed close leaves the earlier unflushed steps undecided for
          // good: no flush of the next session makes them durable.
          if (!s.ok()) unflushed_from = i;
          break;
      }
      r.failed[i] = !note(s);
      if ((step.kind == Step::kFlush || step.kind == Step::kReopen) && s.ok()) flushed(i);
    }
    if (note(image->Close())) flushed(steps.size());
    return r;
  };

  // A clean run: how many calls of each kind there are.
  std::map<std::string, uint64_t> calls;
  {
    MemoryFileSystem mem;
    FaultFileSystem fs(mem);
    fs.set_logging(true);
    Run r = run(mem, fs, StatusCode::kOk);
    for (size_t i = 0; i < steps.size(); ++i) REQUIRE(r.certain[i]);
    for (const auto& line : fs.log()) ++calls[line.substr(0, line.find(' '))];
  }
  REQUIRE(calls["write"] > 5);
  REQUIRE(calls["sync"] > 3);
  REQUIRE(calls["punch"] > 0);

  const std::pair<FaultOp, std::string> kinds[] = {{FaultOp::kWrite, "write"},
                                                   {FaultOp::kSync, "sync"},
                                                   {FaultOp::kTruncate, "truncate"},
                                                   {FaultOp::kPunchHole, "punch"},
                                                   {FaultOp::kRead, "read"}};
  for (const auto& [op, name] : kinds) {
    for (int err : {EIO, ENOSPC}) {
      for (uint64_t n = 1; n <= calls[name]; ++n) {
        CAPTURE(name);
        CAPTURE(n);
        CAPTURE(err);
        MemoryFileSystem mem;
        FaultFileSystem fs(mem);
        const StatusCode expected = err == ENOSPC ? StatusCode::kNoSpace : StatusCode::kIOError;
        fs.FailNth(op, n, err);
        Run r = run(mem, fs, expected);
        // A failed punch only leaves space unreturned; every other failure
        // is reported to the caller.
        if (op != FaultOp::kPunchHole) CHECK(r.saw_expected);

        std::vector<std::byte> after = before;
        for (const Step& step : steps) {
          if (step.kind == Step::kWrite) {
            std::memcpy(after.data() + step.offset_bytes, step.data.data(), step.data.size());
          } else if (step.kind == Step::kDiscard) {
            std::memset(after.data() + step.offset_bytes, 0, step.length_bytes);
          }
        }
        auto image = Open(mem, /*writable=*/true);  // repairs the image if a close failed
        std::vector<std::byte> disk(size);
        REQUIRE_OK(image->Read(0, disk));
        REQUIRE_OK(image->Close());
        CHECK(CheckProblems(mem) == "");
        // Sectors no step touched read as before; a certain step's sectors
        // as after it; the others as either.
        std::vector<int> owner(size / 512, -1);
        for (size_t i = 0; i < steps.size(); ++i) {
          const Step& step = steps[i];
          if (step.kind != Step::kWrite && step.kind != Step::kDiscard) continue;
          for (uint64_t sector = step.offset_bytes / 512;
               sector < (step.offset_bytes + step.length_bytes) / 512; ++sector) {
            owner[sector] = static_cast<int>(i);
          }
        }
        for (uint64_t sector = 0; sector < size / 512; ++sector) {
          const std::byte* got = disk.data() + sector * 512;
          bool is_old = std::memcmp(got, before.data() + sector * 512, 512) == 0;
          bool is_new = std::memcmp(got, after.data() + sector * 512, 512) == 0;
          int step = owner[sector];
          CAPTURE(sector);
          CAPTURE(step);
          if (step < 0) {
            REQUIRE(is_old);
          } else if (r.certain[step]) {
            REQUIRE(is_new);
          } else {
            REQUIRE((is_old || is_new));
          }
        }
      }
    }
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
