// Chain: top-down reads, copy-up writes, zero/discard hiding lower data,
// lower layers untouched, deep chains, and the layering rules.
#include "ploop/chain.h"

#include <cstring>

#include "layer_support.h"
#include "ploop/delta.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::MakeLayer;
using testing::OpenChain;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * 1024;

std::vector<std::byte> ReadAll(Image& image, uint64_t off, uint64_t len) {
  std::vector<std::byte> out(len);
  REQUIRE_OK(image.Read(off, out));
  return out;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("reads come from the highest layer holding each cluster") {
  MemoryFileSystem fs;
  MakeLayer(fs, "base", 8 * kCb, {{0, Pattern(4 * kCb, 0xb0)}});
  MakeLayer(fs, "mid", 8 * kCb, {{kCb, Pattern(kCb, 0x1d)}, {5 * kCb, Pattern(kCb, 0x1d)}});
  MakeLayer(fs, "top", 8 * kCb, {{2 * kCb, Pattern(kCb, 0x70)}});
  auto c = OpenChain(fs, {"base", "mid", "top"}, false);
  CHECK(ReadAll(*c, 0, kCb) == Pattern(kCb, 0xb0));
  CHECK(ReadAll(*c, kCb, kCb) == Pattern(kCb, 0x1d));
  CHECK(ReadAll(*c, 2 * kCb, kCb) == Pattern(kCb, 0x70));
  CHECK(ReadAll(*c, 3 * kCb, kCb) == Pattern(kCb, 0xb0));
  CHECK(ReadAll(*c, 4 * kCb, kCb) == Pattern(kCb, 0));
  CHECK(ReadAll(*c, 5 * kCb, kCb) == Pattern(kCb, 0x1d));
  // One read across all of them.
  auto all = ReadAll(*c, 100, 6 * kCb);
  CHECK(all[0] == std::byte{0xb0});
  CHECK(all[2 * kCb] == std::byte{0x70});
  CHECK(all[4 * kCb] == std::byte{0});
  REQUIRE_ASSIGN(auto st, c->Stats());
  CHECK(st.allocated_clusters == 5);
}

TEST_CASE("writes go to the top - a partial write copies the cluster up - lower layers stay") {
  MemoryFileSystem fs;
  TestRng rng;
  auto base_data = rng.Bytes(4 * kCb);
  MakeLayer(fs, "base", 8 * kCb, {{0, base_data}});
  MakeLayer(fs, "top", 8 * kCb, {});
  auto base_before = fs.Contents("base");
  {
    auto c = OpenChain(fs, {"base", "top"}, true);
    REQUIRE_OK(c->Write(kCb + 100, Pattern(50, 0xee)));
    auto expect = std::vector<std::byte>(base_data.begin() + kCb, base_data.begin() + 2 * kCb);
    std::memset(expect.data() + 100, 0xee, 50);
    CHECK(ReadAll(*c, kCb, kCb) == expect);
    REQUIRE_OK(c->Close());
  }
  CHECK(fs.Contents("base") == base_before);
  // The top holds the whole copied-up cluster on its own.
  OpenOptions o;
  auto top = Delta::Open(fs, "top", o);
  REQUIRE_OK(top);
  CHECK((*top)->ClusterFileOffset(1) != 0);
  CHECK((*top)->ClusterFileOffset(0) == 0);
  std::vector<std::byte> own(kCb);
  REQUIRE_OK((*top)->Read(kCb, own));
  CHECK(own[0] == base_data[kCb]);
  CHECK(own[100] == std::byte{0xee});
}

TEST_CASE("zeros and discards over lower data read as zeros - never older data") {
  MemoryFileSystem fs;
  MakeLayer(fs, "base", 8 * kCb, {{0, Pattern(6 * kCb, 0xaa)}});
  MakeLayer(fs, "top", 8 * kCb, {});
  auto c = OpenChain(fs, {"base", "top"}, true);
  REQUIRE_OK(c->Write(0, Pattern(kCb, 0)));        // whole-cluster zero write
  REQUIRE_OK(c->Write(kCb + 10, Pattern(10, 0)));  // partial zero write
  REQUIRE_OK(c->Discard(2 * kCb, kCb));            // whole-cluster discard
  REQUIRE_OK(c->Discard(3 * kCb + 5, 7));          // partial discard
  REQUIRE_OK(c->Write(4 * kCb, Pattern(kCb, 0x44)));
  REQUIRE_OK(c->Discard(4 * kCb, kCb));  // discard of a top-held cluster
  REQUIRE_OK(c->Discard(7 * kCb, kCb));  // nothing below: plain discard
  CHECK(ReadAll(*c, 0, kCb) == Pattern(kCb, 0));
  auto c1 = ReadAll(*c, kCb, kCb);
  CHECK(c1[9] == std::byte{0xaa});
  CHECK(c1[10] == std::byte{0});
  CHECK(c1[20] == std::byte{0xaa});
  CHECK(ReadAll(*c, 2 * kCb, kCb) == Pattern(kCb, 0));
  auto c3 = ReadAll(*c, 3 * kCb, kCb);
  CHECK(c3[4] == std::byte{0xaa});
  CHECK(c3[5] == std::byte{0});
  CHECK(c3[12] == std::byte{0xaa});
  CHECK(ReadAll(*c, 4 * kCb, kCb) == Pattern(kCb, 0));
  CHECK(ReadAll(*c, 5 * kCb, kCb) == Pattern(kCb, 0xaa));
  REQUIRE_OK(c->Close());
  // Still true after reopening (the zeros are on disk, not only in memory).
  auto again = OpenChain(fs, {"base", "top"}, false);
  CHECK(ReadAll(*again, 2 * kCb, kCb) == Pattern(kCb, 0));
  CHECK(ReadAll(*again, 4 * kCb, kCb) == Pattern(kCb, 0));
}

TEST_CASE("a 64-deep chain reads every layer's cluster") {
  MemoryFileSystem fs;
  std::vector<std::string> paths;
  const int kDepth = 64;
  for (int i = 0; i < kDepth; ++i) {
    paths.push_back("d" + std::to_string(i));
    MakeLayer(fs, paths.back(), kDepth * kCb,
              {{static_cast<uint64_t>(i) * kCb, Pattern(kCb, static_cast<uint8_t>(i + 1))}});
  }
  auto c = OpenChain(fs, paths, false);
  CHECK(c->depth() == kDepth);
  auto all = ReadAll(*c, 0, kDepth * kCb);
  for (int i = 0; i < kDepth; ++i) {
    CAPTURE(i);
    CHECK(all[i * kCb] == std::byte(i + 1));
    CHECK(all[(i + 1) * kCb - 1] == std::byte(i + 1));
  }
}

TEST_CASE("a lower layer smaller than the top reads zeros past its end") {
  MemoryFileSystem fs;
  MakeLayer(fs, "base", 2 * kCb, {{0, Pattern(2 * kCb, 0x31)}});
  MakeLayer(fs, "top", 4 * kCb, {});
  auto c = OpenChain(fs, {"base", "top"}, true);
  CHECK(c->size_bytes() == 4 * kCb);
  CHECK(ReadAll(*c, kCb, 3 * kCb) == [] {
    auto v = Pattern(3 * kCb, 0);
    std::memset(v.data(), 0x31, kCb);
    return v;
  }());
  REQUIRE_OK(c->Write(3 * kCb + 1, Pattern(1, 9)));
  CHECK(ReadAll(*c, 3 * kCb, 2)[1] == std::byte{9});
}

TEST_CASE("a raw base works under ploop deltas") {
  MemoryFileSystem fs;
  CreateOptions o;
  o.kind = ImageKind::kRaw;
  o.size_bytes = 4 * kCb;
  {
    auto raw = CreateImage(fs, "base.raw", o);
    REQUIRE_OK(raw);
    REQUIRE_OK((*raw)->Write(kCb, Pattern(kCb, 0x52)));
    REQUIRE_OK((*raw)->Close());
  }
  MakeLayer(fs, "top", 4 * kCb, {});
  std::vector<std::unique_ptr<Image>> layers;
  OpenOptions ro;
  ro.raw = true;
  layers.push_back(OpenImage(fs, "base.raw", ro).value());
  OpenOptions rw;
  rw.writable = true;
  layers.push_back(OpenImage(fs, "top", rw).value());
  REQUIRE_ASSIGN(auto c, Chain::FromLayers(std::move(layers)));
  CHECK(ReadAll(*c, kCb, kCb) == Pattern(kCb, 0x52));
  REQUIRE_OK(c->Write(kCb, Pattern(10, 0x53)));
  auto got = ReadAll(*c, kCb, kCb);
  CHECK(got[9] == std::byte{0x53});
  CHECK(got[10] == std::byte{0x52});
}

TEST_CASE("the layering rules are enforced") {
  MemoryFileSystem fs;
  MakeLayer(fs, "big", 8 * kCb, {});
  MakeLayer(fs, "small", 4 * kCb, {});
  MakeLayer(fs, "other", 8 * kCb, {}, 64 * 1024);
  auto open = [&](std::vector<std::string> paths, std::vector<bool> writable) {
    std::vector<std::unique_ptr<Image>> layers;
    for (size_t i = 0; i < paths.size(); ++i) {
      OpenOptions o;
      o.writable = writable[i];
      layers.push_back(OpenImage(fs, paths[i], o).value());
    }
    return Chain::FromLayers(std::move(layers));
  };
  CHECK(open({"big", "small"}, {false, false}).error().code() == StatusCode::kInvalidArgument);
  CHECK(open({"small", "other"}, {false, false}).error().code() == StatusCode::kInvalidArgument);
  CHECK(open({"small", "big"}, {true, false}).error().code() == StatusCode::kInvalidArgument);
  CHECK(Chain::FromLayers({}).error().code() == StatusCode::kInvalidArgument);
  CHECK(open({"small", "big"}, {false, true}).ok());
}

TEST_CASE("random writes and discards on a chain match a model - lower layers never change") {
  MemoryFileSystem fs;
  TestRng rng;
  const uint64_t size = 24 * kCb;
  std::vector<std::byte> model(size);
  std::vector<std::string> paths;
  for (int layer = 0; layer < 4; ++layer) {
    paths.push_back("l" + std::to_string(layer));
    MakeLayer(fs, paths.back(), size, {});
    std::vector<std::vector<std::byte>> lower_bytes;
    for (size_t i = 0; i + 1 < paths.size(); ++i) lower_bytes.push_back(fs.Contents(paths[i]));
    auto c = OpenChain(fs, paths, true);
    for (int step = 0; step < 60; ++step) {
      uint64_t off = rng.Uniform(0, size - 1);
      uint64_t len = rng.Uniform(1, std::min<uint64_t>(size - off, 3 * kCb));
      switch (rng.Uniform(0, 3)) {
        case 0:
        case 1: {
          auto data = rng.Uniform(0, 3) == 0 ? Pattern(len, 0) : rng.Bytes(len);
          REQUIRE_OK(c->Write(off, data));
          std::memcpy(model.data() + off, data.data(), len);
          break;
        }
        case 2:
          REQUIRE_OK(c->Discard(off, len));
          std::memset(model.data() + off, 0, len);
          break;
        default:
          REQUIRE_OK(c->Flush());
      }
      REQUIRE(ReadAll(*c, 0, size) == model);
    }
    REQUIRE_OK(c->Close());
    for (size_t i = 0; i + 1 < paths.size(); ++i) CHECK(fs.Contents(paths[i]) == lower_bytes[i]);
    auto ro = OpenChain(fs, paths, false);
    CHECK(ReadAll(*ro, 0, size) == model);
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
