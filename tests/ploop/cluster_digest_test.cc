// Cluster digests (snapshot/stream_format.h): XXH3-128 as the format says,
// and no wide vector state left in use after them.
//
// Why the second: libxxhash's AVX2/AVX-512 code returns with the upper
// halves of the vector registers in use, and then every legacy-SSE
// instruction on the thread -- OpenSSL's SHA-256, lz4 -- runs slower
// (SHA-256 measured a quarter slower; tools/bench/README.md, session 9).
// The processor says which state components are in use (XGETBV with
// ECX=1, "XINUSE"), so the test asks it rather than timing anything.
#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <vector>

#include "snapshot/stream_format.h"
#include "test_support.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace ploop::stream {
namespace {

#if defined(__x86_64__)
// The XINUSE bitmap, or nothing where the processor cannot report it.
std::optional<uint64_t> StateInUse() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return std::nullopt;
  const bool osxsave = (c & (1u << 27)) != 0;
  const bool avx = (c & (1u << 28)) != 0;
  if (!osxsave || !avx) return std::nullopt;
  if (__get_cpuid_count(0xD, 1, &a, &b, &c, &d) == 0) return std::nullopt;
  if ((a & (1u << 2)) == 0) return std::nullopt;  // no XGETBV with ECX=1
  uint32_t lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
  return (uint64_t{hi} << 32) | lo;
}
#endif

TEST_CASE("cluster digest: XXH3-128 of the cluster in canonical form") {
  const std::vector<std::byte> data = testing::TestRng().Bytes(1 << 20);
  XXH128_canonical_t want;
  XXH128_canonicalFromHash(&want, XXH3_128bits(data.data(), data.size()));
  const ClusterDigest got = ClusterDigestOf(data);
  CHECK(std::memcmp(got.data(), want.digest, got.size()) == 0);
}

TEST_CASE("cluster digest: leaves no upper vector register state in use") {
#if defined(__x86_64__)
  const std::optional<uint64_t> before = StateInUse();
  if (!before) {
    MESSAGE("this CPU cannot report the state in use (XGETBV ECX=1): not checked");
    return;
  }
  // Bit 2: the upper halves of YMM0-15; bit 6: the upper halves of ZMM0-15.
  // (ZMM16-31, bit 7, are out of SSE's reach and cost it nothing.)
  constexpr uint64_t kUpperHalves = (1u << 2) | (1u << 6);
  const std::vector<std::byte> data = testing::TestRng().Bytes(1 << 20);
  for (int i = 0; i < 4; ++i) {
    ClusterDigestOf(data);
    const std::optional<uint64_t> after = StateInUse();
    REQUIRE(after.has_value());
    char hex[32];
    std::snprintf(hex, sizeof hex, "%#llx", static_cast<unsigned long long>(*after));
    INFO("XINUSE after the digest: " << hex);
    CHECK((*after & kUpperHalves) == 0);
  }
#else
  MESSAGE("not an x86-64 build: nothing to check");
#endif
}

}  // namespace
}  // namespace ploop::stream
