#include "ploop/format.h"

#include <array>
#include <cstring>

#include "test_support.h"

namespace ploop {
namespace {

TEST_SUITE_BEGIN("unit");

TEST_CASE("MakeHeader matches OpenVZ ploop for a 10 GiB disk with 1 MiB clusters") {
  REQUIRE_ASSIGN(Header h, MakeHeader(10ull << 30, 1 << 20));
  CHECK(h.version == FormatVersion::kV2);
  CHECK(h.cluster_sectors == 2048);
  CHECK(h.bat_entries == 10240);
  CHECK(h.size_sectors == 20971520);
  CHECK(h.heads == 16);
  CHECK(h.cylinders == 40960);
  CHECK(h.first_block_sectors == 2048);  // header + BAT fit in one cluster
  CHECK(h.flags == kFlagEmpty);
  CHECK(h.in_use == kInUseClean);
}

TEST_CASE("MakeHeader: CHS for 1 GiB uses 63 sectors per track - as ploop does") {
  REQUIRE_ASSIGN(Header h, MakeHeader(1ull << 30, 1 << 20));
  CHECK(h.heads == 16);
  CHECK(h.cylinders == 2080);
}

TEST_CASE("MakeHeader rounds the size up to the cluster and sizes the BAT area") {
  REQUIRE_ASSIGN(Header h, MakeHeader(100 * 1024 + 1, 32 * 1024));
  CHECK(h.bat_entries == 4);
  CHECK(h.size_bytes() == 128 * 1024);
  // 300 GiB at 1 MiB: 307200 entries need 1228864 bytes -> two clusters.
  REQUIRE_ASSIGN(Header big, MakeHeader(300ull << 30, 1 << 20));
  CHECK(big.first_block_bytes() == 2ull << 20);
  CHECK(FirstBlockBytes(262128, 1 << 20) == 1 << 20);
  CHECK(FirstBlockBytes(262129, 1 << 20) == 2 << 20);
}

TEST_CASE("MakeHeader rejects bad cluster sizes and sizes") {
  CHECK(MakeHeader(1 << 30, 16 * 1024).error().code() == StatusCode::kInvalidArgument);
  CHECK(MakeHeader(1 << 30, 3 << 20).error().code() == StatusCode::kInvalidArgument);
  CHECK(MakeHeader(1 << 30, 128 << 20).error().code() == StatusCode::kInvalidArgument);
  CHECK(MakeHeader(0, 1 << 20).error().code() == StatusCode::kInvalidArgument);
  CHECK(MakeHeader(51ull << 40, 1 << 20).error().code() == StatusCode::kInvalidArgument);
  CHECK(MakeHeader(50ull << 40, 32 << 10).error().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Header encodes little-endian at the documented offsets and decodes back") {
  REQUIRE_ASSIGN(Header h, MakeHeader(10ull << 30, 1 << 20));
  h.in_use = kInUseDirty;
  h.ext_offset_sectors = 0x0102030405060708ull;
  std::array<std::byte, kHeaderBytes> raw;
  EncodeHeader(h, raw);
  CHECK(std::memcmp(raw.data(), "WithouFreSpacExt", 16) == 0);
  CHECK(LoadLe32(raw.data() + 16) == 2);
  CHECK(LoadLe32(raw.data() + 28) == 2048);
  CHECK(LoadLe32(raw.data() + 32) == 10240);
  CHECK(LoadLe64(raw.data() + 36) == 20971520);
  CHECK(raw[44] == std::byte{0x59});  // "Ynot" little-endian
  CHECK(raw[45] == std::byte{0x6e});
  CHECK(LoadLe32(raw.data() + 48) == 2048);
  CHECK(raw[56] == std::byte{0x08});
  REQUIRE_ASSIGN(Header back, DecodeHeader(raw));
  CHECK(back.size_sectors == h.size_sectors);
  CHECK(back.ext_offset_sectors == h.ext_offset_sectors);
  CHECK(back.dirty());
}

TEST_CASE("DecodeHeader rejects what no reader may trust") {
  REQUIRE_ASSIGN(Header h, MakeHeader(1 << 30, 1 << 20));
  std::array<std::byte, kHeaderBytes> raw;
  auto corrupt = [&](auto mutate) {
    EncodeHeader(h, raw);
    mutate(raw.data());
    auto r = DecodeHeader(raw);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == StatusCode::kCorruption);
    return r.error().message();
  };
  CHECK(corrupt([](std::byte* p) { p[0] = std::byte{'X'}; }).find("signature") !=
        std::string::npos);
  CHECK(corrupt([](std::byte* p) { StoreLe32(p + 16, 3); }).find("type") != std::string::npos);
  CHECK(corrupt([](std::byte* p) { StoreLe32(p + 28, 100); }).find("cluster") != std::string::npos);
  CHECK(corrupt([](std::byte* p) { StoreLe32(p + 32, 5); }).find("entries") != std::string::npos);
}

TEST_CASE("v1 headers keep the size in 32 bits") {
  REQUIRE_ASSIGN(Header h, MakeHeader(1 << 30, 1 << 20));
  h.version = FormatVersion::kV1;
  std::array<std::byte, kHeaderBytes> raw;
  EncodeHeader(h, raw);
  CHECK(std::memcmp(raw.data(), "WithoutFreeSpace", 16) == 0);
  CHECK(LoadLe32(raw.data() + 40) == 0);
  REQUIRE_ASSIGN(Header back, DecodeHeader(raw));
  CHECK(back.version == FormatVersion::kV1);
  CHECK(back.size_sectors == h.size_sectors);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
