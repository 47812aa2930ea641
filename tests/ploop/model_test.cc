// Randomised model test: a long seeded sequence of writes (any offset and
// length, across clusters, partial, all zeros), discards, flushes,
// close-and-reopen and grows, applied both to an image and to a plain byte
// vector; after every step the whole disk must read as the vector. Runs on
// the in-memory file system for several cluster sizes and both ploop kinds,
// and once on the real one in a temporary directory. Reproduce a failure
// with the printed PLOOP_TEST_SEED.
#include <cstring>
#include <sstream>

#include "ploop/check.h"
#include "ploop/image.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/io/posix_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::TempDir;
using testing::TestRng;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

struct ModelConfig {
  uint64_t cluster_bytes;
  ImageKind kind;
  uint64_t size_bytes;
  // The disk may grow up to this size.
  uint64_t max_size_bytes;
  int steps;
};

std::unique_ptr<Image> OpenWritable(FileSystem& fs, const std::string& path) {
  OpenOptions options;
  options.writable = true;
  auto image = OpenImage(fs, path, options);
  REQUIRE_OK(image);
  return std::move(image).value();
}

// check on the closed image finds nothing at all to report.
void RequireCheckClean(FileSystem& fs, const std::string& path) {
  auto file = fs.Open(path, OpenMode::kReadOnly);
  REQUIRE_OK(file);
  REQUIRE_ASSIGN(CheckReport report, CheckImage(**file, /*repair=*/false));
  std::string problems;
  for (const auto& p : report.problems) problems += "\n  " + p.message;
  INFO("check found:" << problems);
  REQUIRE(report.problems.empty());
}

void RequireDiskEquals(Image& image, const std::vector<std::byte>& model) {
  REQUIRE(image.size_bytes() == model.size());
  std::vector<std::byte> disk(model.size());
  REQUIRE_OK(image.Read(0, disk));
  if (std::memcmp(disk.data(), model.data(), model.size()) == 0) return;
  uint64_t first = 0;
  while (disk[first] == model[first]) ++first;
  FAIL("disk differs from the model, first at offset " << first << " (cluster "
                                                       << first / image.cluster_bytes() << ")");
}

// A random length for a write or discard: often tiny or a whole cluster,
// sometimes several clusters.
uint64_t RandomLength(TestRng& rng, uint64_t cb) {
  switch (rng.Uniform(0, 4)) {
    case 0:
      return rng.Uniform(1, 600);
    case 1:
      return cb;
    case 2:
      return rng.Uniform(1, cb);
    case 3:
      return rng.Uniform(cb, 3 * cb);
    default:
      return rng.Uniform(1, 2) * cb + rng.Uniform(0, 1) * rng.Uniform(1, cb);
  }
}

// A random offset: cluster-aligned, sector-aligned or anywhere.
uint64_t RandomOffset(TestRng& rng, uint64_t cb, uint64_t size) {
  uint64_t offset = rng.Uniform(0, size - 1);
  switch (rng.Uniform(0, 2)) {
    case 0:
      return offset / cb * cb;
    case 1:
      return offset / 512 * 512;
    default:
      return offset;
  }
}

void RunModel(FileSystem& fs, const std::string& path, const ModelConfig& config, TestRng& rng) {
  const uint64_t cb = config.cluster_bytes;
  CreateOptions options;
  options.size_bytes = config.size_bytes;
  options.cluster_bytes = cb;
  options.kind = config.kind;
  auto created = CreateImage(fs, path, options);
  REQUIRE_OK(created);
  std::unique_ptr<Image> image = std::move(created).value();
  // The disk size is rounded up to whole clusters.
  auto round_up = [cb](uint64_t bytes) { return (bytes + cb - 1) / cb * cb; };
  REQUIRE(image->size_bytes() == round_up(config.size_bytes));
  std::vector<std::byte> model(image->size_bytes());

  int step = 0;
  std::string what;
  INFO("step " << step << ": " << what);
  for (step = 0; step < config.steps; ++step) {
    std::ostringstream op;
    const uint64_t size = model.size();
    const uint64_t dice = rng.Uniform(0, 99);
    if (dice < 50) {
      uint64_t offset = RandomOffset(rng, cb, size);
      uint64_t length = std::min(RandomLength(rng, cb), size - offset);
      std::vector<std::byte> data;
      switch (rng.Uniform(0, 5)) {
        case 0:
          data.assign(length, std::byte{0});
          break;
        case 1: {
          // Zeros with a little data somewhere inside.
          data.assign(length, std::byte{0});
          data[rng.Uniform(0, length - 1)] = std::byte{0x77};
          break;
        }
        default:
          data = rng.Bytes(length);
      }
      op << "write " << offset << "+" << length << (IsZero(data) ? " (zeros)" : "");
      what = op.str();
      REQUIRE_OK(image->Write(offset, data));
      std::memcpy(model.data() + offset, data.data(), length);
    } else if (dice < 68) {
      uint64_t offset = RandomOffset(rng, cb, size);
      uint64_t length = std::min(RandomLength(rng, cb), size - offset);
      op << "discard " << offset << "+" << length;
      what = op.str();
      REQUIRE_OK(image->Discard(offset, length));
      std::memset(model.data() + offset, 0, length);
    } else if (dice < 78) {
      what = "flush";
      REQUIRE_OK(image->Flush());
    } else if (dice < 84) {
      what = "close, check, reopen";
      REQUIRE_OK(image->Close());
      image.reset();
      RequireCheckClean(fs, path);
      image = OpenWritable(fs, path);
    } else if (dice < 87 && size < config.max_size_bytes) {
      uint64_t new_size = std::min(config.max_size_bytes, size + rng.Uniform(1, 8 * cb));
      op << "grow " << size << " -> " << new_size;
      what = op.str();
      REQUIRE_OK(image->Grow(new_size));
      REQUIRE(image->size_bytes() == round_up(new_size));
      model.resize(image->size_bytes());
    } else {
      // A read of a random range, besides the whole-disk read below.
      uint64_t offset = RandomOffset(rng, cb, size);
      uint64_t length = std::min(RandomLength(rng, cb), size - offset);
      op << "read " << offset << "+" << length;
      what = op.str();
      std::vector<std::byte> got(length);
      REQUIRE_OK(image->Read(offset, got));
      REQUIRE(std::memcmp(got.data(), model.data() + offset, length) == 0);
    }
    RequireDiskEquals(*image, model);
  }
  what = "final close and check";
  REQUIRE_OK(image->Close());
  image.reset();
  RequireCheckClean(fs, path);
  OpenOptions read_only;
  auto reopened = OpenImage(fs, path, read_only);
  REQUIRE_OK(reopened);
  RequireDiskEquals(**reopened, model);
}

TEST_SUITE_BEGIN("unit");
TEST_CASE("random writes - discards - flushes - reopens and grows read back as the model") {
  TestRng rng;
  ModelConfig config{};
  SUBCASE("expanded, 32K clusters") {
    config = {32 * kKiB, ImageKind::kExpanded, 2 * kMiB, 3 * kMiB, 400};
  }
  SUBCASE("expanded, 64K clusters") {
    config = {64 * kKiB, ImageKind::kExpanded, 4 * kMiB, 6 * kMiB, 400};
  }
  SUBCASE("expanded, 1M clusters, disk not a whole number of clusters") {
    config = {kMiB, ImageKind::kExpanded, 7 * kMiB + 512, 12 * kMiB, 250};
  }
  SUBCASE("preallocated, 32K clusters") {
    config = {32 * kKiB, ImageKind::kPreallocated, 2 * kMiB, 3 * kMiB, 400};
  }
  SUBCASE("preallocated, 256K clusters") {
    config = {256 * kKiB, ImageKind::kPreallocated, 4 * kMiB, 8 * kMiB, 300};
  }
  CAPTURE(config.cluster_bytes);
  CAPTURE(ImageKindName(config.kind));
  MemoryFileSystem fs;
  RunModel(fs, "img.hds", config, rng);
}

TEST_SUITE_END();

TEST_SUITE_BEGIN("posix");

TEST_CASE("random operations on a real file read back as the model") {
  TestRng rng;
  ModelConfig config{};
  SUBCASE("expanded, 64K clusters") {
    config = {64 * kKiB, ImageKind::kExpanded, 4 * kMiB, 6 * kMiB, 200};
  }
  SUBCASE("preallocated, 32K clusters") {
    config = {32 * kKiB, ImageKind::kPreallocated, 2 * kMiB, 3 * kMiB, 200};
  }
  CAPTURE(config.cluster_bytes);
  CAPTURE(ImageKindName(config.kind));
  TempDir dir;
  PosixFileSystem fs;
  RunModel(fs, dir / "img.hds", config, rng);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
