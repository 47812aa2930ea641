// Behaviour of one ploop image through the Image interface, on the
// in-memory file system: holes, partial writes, zero writes, discard,
// preallocation, grow with relocation, dirty flag, reopen.
#include "ploop/delta.h"

#include <cstring>

#include "layer_support.h"
#include "ploop/check.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/lock.h"
#include "ploop/raw_image.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

std::unique_ptr<Delta> MakeDelta(MemoryFileSystem& fs, uint64_t size, uint64_t cluster,
                                 ImageKind kind = ImageKind::kExpanded,
                                 const std::string& path = "img.hds") {
  return testing::NewDelta(fs, path, size, cluster, kind);
}

std::unique_ptr<Delta> Reopen(MemoryFileSystem& fs, bool writable,
                              const std::string& path = "img.hds") {
  OpenOptions o;
  o.writable = writable;
  auto d = Delta::Open(fs, path, o);
  REQUIRE_OK(d);
  return std::move(d).value();
}

std::vector<std::byte> ReadAll(Image& image, uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  REQUIRE_OK(image.Read(offset, out));
  return out;
}

uint32_t BatEntry(MemoryFileSystem& fs, uint64_t index, const std::string& path = "img.hds") {
  auto bytes = fs.Contents(path);
  return LoadLe32(bytes.data() + kHeaderBytes + 4 * index);
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("a new expanded image is one header cluster and reads as zeros") {
  MemoryFileSystem fs;
  auto d = MakeDelta(fs, 100 * kMiB, kMiB);
  CHECK(d->size_bytes() == 100 * kMiB);
  CHECK(d->kind() == ImageKind::kExpanded);
  CHECK(ReadAll(*d, 0, kMiB) == Pattern(kMiB, 0));
  CHECK(ReadAll(*d, 99 * kMiB, kMiB) == Pattern(kMiB, 0));
  REQUIRE_OK(d->Close());
  auto bytes = fs.Contents("img.hds");
  CHECK(bytes.size() == kMiB);
  CHECK(LoadLe32(bytes.data() + 44) == kInUseClean);
  CHECK(LoadLe32(bytes.data() + 52) == kFlagEmpty);
}

TEST_CASE("a partial write to a new cluster zero-fills the rest of the cluster") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  auto d = MakeDelta(fs, 4 * kMiB, cb);
  REQUIRE_OK(d->Write(3 * cb + 100, Pattern(1000, 0xab)));
  auto got = ReadAll(*d, 3 * cb, cb);
  CHECK(std::vector<std::byte>(got.begin(), got.begin() + 100) == Pattern(100, 0));
  CHECK(std::vector<std::byte>(got.begin() + 100, got.begin() + 1100) == Pattern(1000, 0xab));
  CHECK(std::vector<std::byte>(got.begin() + 1100, got.end()) == Pattern(cb - 1100, 0));
  REQUIRE_OK(d->Close());
  // One data cluster appended after the header cluster; BAT points at it.
  CHECK(fs.Contents("img.hds").size() == 2 * cb);
  CHECK(BatEntry(fs, 3) == 1);
}

TEST_CASE("writing zeros to unallocated clusters allocates nothing") {
  MemoryFileSystem fs;
  auto d = MakeDelta(fs, 8 * kMiB, kMiB);
  REQUIRE_OK(d->Write(0, Pattern(3 * kMiB, 0)));
  REQUIRE_OK(d->Write(5 * kMiB + 7, Pattern(100, 0)));
  REQUIRE_ASSIGN(auto st, d->Stats());
  CHECK(st.allocated_clusters == 0);
  REQUIRE_OK(d->Close());
  CHECK(fs.Contents("img.hds").size() == kMiB);
}

TEST_CASE("writes crossing clusters - overwrite in place - read back after reopen") {
  MemoryFileSystem fs;
  const uint64_t cb = 32 * kKiB;
  TestRng rng;
  std::vector<std::byte> model(2 * kMiB);
  {
    auto d = MakeDelta(fs, 2 * kMiB, cb);
    auto a = rng.Bytes(3 * cb + 123);
    REQUIRE_OK(d->Write(cb - 50, a));
    std::memcpy(model.data() + cb - 50, a.data(), a.size());
    auto b = rng.Bytes(777);
    REQUIRE_OK(d->Write(2 * cb + 5, b));
    std::memcpy(model.data() + 2 * cb + 5, b.data(), b.size());
    CHECK(ReadAll(*d, 0, model.size()) == model);
    REQUIRE_OK(d->Close());
  }
  auto d = Reopen(fs, false);
  CHECK(ReadAll(*d, 0, model.size()) == model);
}

TEST_CASE("discard of whole clusters unmaps them - partial discard writes zeros") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  auto d = MakeDelta(fs, kMiB, cb);
  REQUIRE_OK(d->Write(0, Pattern(4 * cb, 0x11)));
  REQUIRE_OK(d->Discard(cb, cb));           // whole cluster 1
  REQUIRE_OK(d->Discard(2 * cb + 10, 20));  // part of cluster 2
  REQUIRE_OK(d->Flush());
  CHECK(d->ClusterFileOffset(1) == 0);
  CHECK(d->ClusterFileOffset(2) != 0);
  CHECK(ReadAll(*d, cb, cb) == Pattern(cb, 0));
  auto c2 = ReadAll(*d, 2 * cb, cb);
  CHECK(c2[9] == std::byte{0x11});
  CHECK(c2[10] == std::byte{0});
  CHECK(c2[29] == std::byte{0});
  CHECK(c2[30] == std::byte{0x11});
  // The freed cluster is reused by the next allocation, after the flush.
  REQUIRE_OK(d->Write(10 * cb, Pattern(cb, 0x22)));
  CHECK(d->ClusterFileOffset(10) == 2 * cb);  // file cluster 2 was the discarded one
  REQUIRE_OK(d->Close());
  REQUIRE_ASSIGN(auto report, CheckImage(*fs.Open("img.hds", OpenMode::kReadOnly).value(), false));
  CHECK(report.clean());
}

TEST_CASE("reads and writes past the end of the disk are refused") {
  MemoryFileSystem fs;
  auto d = MakeDelta(fs, kMiB, 64 * kKiB);
  std::vector<std::byte> buf(10);
  CHECK(d->Read(kMiB - 5, buf).code() == StatusCode::kInvalidArgument);
  CHECK(d->Write(kMiB, buf).code() == StatusCode::kInvalidArgument);
  CHECK(d->Discard(0, kMiB + 1).code() == StatusCode::kInvalidArgument);
  CHECK(d->Write(UINT64_MAX - 3, buf).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("a read-only image refuses writes") {
  MemoryFileSystem fs;
  MakeDelta(fs, kMiB, 64 * kKiB)->Close().IgnoreError();
  auto d = Reopen(fs, false);
  CHECK(d->Write(0, Pattern(10, 1)).code() == StatusCode::kFailedPrecondition);
  CHECK(d->Discard(0, 10).code() == StatusCode::kFailedPrecondition);
  CHECK(d->Grow(2 * kMiB).code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("preallocated images have an identity BAT and keep clusters on discard") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  auto d = MakeDelta(fs, 8 * cb, cb, ImageKind::kPreallocated);
  CHECK(d->kind() == ImageKind::kPreallocated);
  for (uint64_t i = 0; i < 8; ++i) CHECK(d->ClusterFileOffset(i) == (1 + i) * cb);
  REQUIRE_OK(d->Write(0, Pattern(2 * cb, 0x33)));
  REQUIRE_OK(d->Discard(0, cb));
  CHECK(d->ClusterFileOffset(0) == cb);
  CHECK(ReadAll(*d, 0, cb) == Pattern(cb, 0));
  CHECK(ReadAll(*d, cb, cb) == Pattern(cb, 0x33));
  REQUIRE_OK(d->Close());
  CHECK(fs.Contents("img.hds").size() == 9 * cb);
  CHECK(Reopen(fs, false)->kind() == ImageKind::kPreallocated);
}

TEST_CASE("the dirty flag is set before the first write and cleared on close") {
  MemoryFileSystem fs;
  auto d = MakeDelta(fs, kMiB, 64 * kKiB);
  auto in_use = [&] { return LoadLe32(fs.Contents("img.hds").data() + 44); };
  CHECK(in_use() == kInUseClean);
  std::vector<std::byte> buf(10);
  REQUIRE_OK(d->Read(0, buf));
  CHECK(in_use() == kInUseClean);  // reading does not dirty
  REQUIRE_OK(d->Write(0, Pattern(10, 1)));
  CHECK(in_use() == kInUseDirty);
  CHECK((LoadLe32(fs.Contents("img.hds").data() + 52) & kFlagEmpty) == 0);
  REQUIRE_OK(d->Flush());
  CHECK(in_use() == kInUseDirty);
  REQUIRE_OK(d->Close());
  CHECK(in_use() == kInUseClean);
}

TEST_CASE("a writable open of a dirty image repairs it - a read-only open reads it") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  {
    auto d = MakeDelta(fs, kMiB, cb, ImageKind::kExpanded, "live.hds");
    REQUIRE_OK(d->Write(0, Pattern(cb, 0x44)));
    REQUIRE_OK(d->Flush());
    // What a crash leaves on disk: the flushed state with the in-use marker
    // still set, plus a cluster appended whose BAT entry never made it.
    auto bytes = fs.Contents("live.hds");
    REQUIRE(LoadLe32(bytes.data() + 44) == kInUseDirty);
    auto f = fs.Create("img.hds", true).value();
    REQUIRE_OK(f->WriteAt(0, bytes));
    REQUIRE_OK(f->WriteAt(2 * cb, Pattern(cb, 0x55)));
  }
  {
    auto ro = Reopen(fs, false);
    CHECK(ro->header().dirty());
    CHECK(ReadAll(*ro, 0, cb) == Pattern(cb, 0x44));
  }
  auto rw = Reopen(fs, true);
  CHECK_FALSE(rw->header().dirty());
  CHECK(ReadAll(*rw, 0, cb) == Pattern(cb, 0x44));
  REQUIRE_OK(rw->Close());
  CHECK(fs.Contents("img.hds").size() == 2 * cb);  // the leaked cluster is gone
}

TEST_CASE("grow within the BAT cluster keeps data and zeroes the new range") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  auto d = MakeDelta(fs, kMiB, cb);
  REQUIRE_OK(d->Write(cb, Pattern(cb, 0x66)));
  REQUIRE_OK(d->Grow(3 * kMiB));
  CHECK(d->size_bytes() == 3 * kMiB);
  CHECK(ReadAll(*d, cb, cb) == Pattern(cb, 0x66));
  CHECK(ReadAll(*d, kMiB, 2 * kMiB) == Pattern(2 * kMiB, 0));
  REQUIRE_OK(d->Write(3 * kMiB - 10, Pattern(10, 0x77)));
  REQUIRE_OK(d->Close());
  auto r = Reopen(fs, false);
  CHECK(r->size_bytes() == 3 * kMiB);
  CHECK(ReadAll(*r, 3 * kMiB - 10, 10) == Pattern(10, 0x77));
  CHECK(r->header().bat_entries == 48);
}

TEST_CASE("grow that needs more BAT clusters moves the data clusters in the way") {
  MemoryFileSystem fs;
  const uint64_t cb = 32 * kKiB;
  const uint64_t per_bat_cluster = (cb - kHeaderBytes) / 4;  // 8176 entries
  TestRng rng;
  // Fill the first clusters of the file with data, so they sit right where
  // the grown BAT will need to go.
  auto d = MakeDelta(fs, per_bat_cluster * cb, cb);
  REQUIRE(d->header().first_block_bytes() == cb);
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> written;
  for (uint64_t i : {uint64_t{0}, uint64_t{7}, uint64_t{100}, per_bat_cluster - 1}) {
    written.emplace_back(i * cb, rng.Bytes(cb));
    REQUIRE_OK(d->Write(i * cb, written.back().second));
  }
  REQUIRE_OK(d->Flush());
  const uint64_t new_size = 3 * per_bat_cluster * cb;  // needs 3 BAT clusters
  REQUIRE_OK(d->Grow(new_size));
  CHECK(d->header().first_block_bytes() == 3 * cb);
  for (const auto& [off, data] : written) {
    CHECK(ReadAll(*d, off, cb) == data);
    CHECK(d->ClusterFileOffset(off / cb) >= 3 * cb);
  }
  CHECK(ReadAll(*d, new_size - cb, cb) == Pattern(cb, 0));
  REQUIRE_OK(d->Write(new_size - cb, Pattern(cb, 0x5a)));
  REQUIRE_OK(d->Close());

  auto file = fs.Open("img.hds", OpenMode::kReadOnly).value();
  REQUIRE_ASSIGN(auto report, CheckImage(*file, false));
  CHECK_MESSAGE(report.clean(), report.FirstProblem());
  file.reset();
  auto r = Reopen(fs, false);
  CHECK(r->size_bytes() == new_size);
  for (const auto& [off, data] : written) CHECK(ReadAll(*r, off, cb) == data);
  CHECK(ReadAll(*r, new_size - cb, cb) == Pattern(cb, 0x5a));
}

TEST_CASE("grow refuses to shrink and grows preallocated images fully") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  auto d = MakeDelta(fs, 4 * cb, cb, ImageKind::kPreallocated);
  CHECK(d->Grow(2 * cb).code() == StatusCode::kInvalidArgument);
  REQUIRE_OK(d->Grow(8 * cb));
  REQUIRE_ASSIGN(auto st, d->Stats());
  CHECK(st.allocated_clusters == 8);
  CHECK(ReadAll(*d, 4 * cb, 4 * cb) == Pattern(4 * cb, 0));
  REQUIRE_OK(d->Close());
}

TEST_CASE("a second writer is refused with Busy - readers share") {
  MemoryFileSystem fs;
  MakeDelta(fs, kMiB, 64 * kKiB)->Close().IgnoreError();
  {
    auto w = Reopen(fs, true);
    OpenOptions o;
    o.writable = true;
    CHECK(Delta::Open(fs, "img.hds", o).error().code() == StatusCode::kBusy);
    o.writable = false;
    CHECK(Delta::Open(fs, "img.hds", o).error().code() == StatusCode::kBusy);
    o.lock = false;  // inspection without the lock (info) still works
    CHECK(Delta::Open(fs, "img.hds", o).ok());
  }
  auto r1 = Reopen(fs, false);
  auto r2 = Reopen(fs, false);
  OpenOptions o;
  o.writable = true;
  CHECK(Delta::Open(fs, "img.hds", o).error().code() == StatusCode::kBusy);
}

TEST_CASE("corrupt images fail to open with a clear reason") {
  const uint64_t cb = 64 * kKiB;
  auto open_error = [&](auto corrupt) {
    MemoryFileSystem fs;
    {
      auto d = MakeDelta(fs, kMiB, cb);
      REQUIRE_OK(d->Write(0, Pattern(2 * cb, 0x12)));
      REQUIRE_OK(d->Close());
    }
    auto f = fs.Open("img.hds", OpenMode::kReadWrite).value();
    corrupt(*f);
    f.reset();
    OpenOptions o;
    auto r = Delta::Open(fs, "img.hds", o);
    REQUIRE_FALSE(r.ok());
    return r.error();
  };
  auto put32 = [](BlockFile& f, uint64_t off, uint32_t v) {
    std::array<std::byte, 4> b;
    StoreLe32(b.data(), v);
    REQUIRE_OK(f.WriteAt(off, b));
  };
  auto e = open_error([&](BlockFile& f) { put32(f, 64 + 4 * 5, 99); });
  CHECK(e.code() == StatusCode::kCorruption);
  CHECK(e.message().find("past the end") != std::string::npos);
  e = open_error([&](BlockFile& f) { put32(f, 64 + 4 * 5, 1); });
  CHECK(e.message().find("more than one") != std::string::npos);
  e = open_error([&](BlockFile& f) { f.Truncate(100).IgnoreError(); });
  CHECK(e.code() == StatusCode::kCorruption);
  CHECK(e.message().find("truncated") != std::string::npos);
  e = open_error([&](BlockFile& f) { f.Truncate(10).IgnoreError(); });
  CHECK(e.message().find("too short") != std::string::npos);
  e = open_error([&](BlockFile& f) { put32(f, 48, 3); });
  CHECK(e.message().find("first block") != std::string::npos);
  e = open_error([&](BlockFile& f) { put32(f, 0, 0x41414141); });
  CHECK(e.message().find("signature") != std::string::npos);
}

TEST_CASE("v1 images are read - with BAT entries in sectors - and refused for writing") {
  MemoryFileSystem fs;
  const uint64_t cb = 64 * kKiB;
  const uint32_t cs = cb / kSectorBytes;
  REQUIRE_ASSIGN(Header h, MakeHeader(8 * cb, cb));
  h.version = FormatVersion::kV1;
  h.flags = 0;
  std::vector<std::byte> file(3 * cb);
  EncodeHeader(h, std::span<std::byte, kHeaderBytes>(file.data(), kHeaderBytes));
  StoreLe32(file.data() + kHeaderBytes + 4 * 2, 2 * cs);  // cluster 2 -> file cluster 2
  StoreLe32(file.data() + kHeaderBytes + 4 * 5, 1 * cs);  // cluster 5 -> file cluster 1
  std::memset(file.data() + cb, 0x5, cb);
  std::memset(file.data() + 2 * cb, 0x2, cb);
  REQUIRE_OK(fs.Create("v1.hds", true).value()->WriteAt(0, file));
  auto d = Reopen(fs, false, "v1.hds");
  CHECK(d->header().version == FormatVersion::kV1);
  CHECK(ReadAll(*d, 2 * cb, cb) == Pattern(cb, 2));
  CHECK(ReadAll(*d, 5 * cb, cb) == Pattern(cb, 5));
  CHECK(ReadAll(*d, 0, cb) == Pattern(cb, 0));
  d.reset();
  OpenOptions o;
  o.writable = true;
  CHECK(Delta::Open(fs, "v1.hds", o).error().code() == StatusCode::kNotSupported);
}

TEST_CASE("raw images: created allocated - read/write/discard/grow") {
  MemoryFileSystem fs;
  CreateOptions o;
  o.kind = ImageKind::kRaw;
  o.size_bytes = kMiB;
  REQUIRE_ASSIGN(auto img, CreateImage(fs, "disk.raw", o));
  CHECK(img->kind() == ImageKind::kRaw);
  REQUIRE_OK(img->Write(1000, Pattern(5000, 0x9)));
  REQUIRE_OK(img->Discard(2000, 1000));
  auto got = ReadAll(*img, 1000, 5000);
  CHECK(got[999] == std::byte{9});
  CHECK(got[1000] == std::byte{0});
  CHECK(got[1999] == std::byte{0});
  CHECK(got[2000] == std::byte{9});
  REQUIRE_OK(img->Grow(2 * kMiB));
  CHECK(img->size_bytes() == 2 * kMiB);
  CHECK(img->Grow(kMiB).code() == StatusCode::kInvalidArgument);
  REQUIRE_OK(img->Close());
  CHECK(fs.Contents("disk.raw").size() == 2 * kMiB);
  CHECK(CreateImage(fs, "disk.raw", o).error().code() == StatusCode::kAlreadyExists);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
