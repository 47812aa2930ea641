#include "snapshot/sha256_lanes.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#ifdef PLOOP_HAVE_OPENSSL_SHA256_MB
extern "C" {
// libcrypto's internal interfaces (crypto/sha/asm/sha256-mb-x86_64.pl and
// sha256-x86_64.pl; the declarations OpenSSL's own callers use). The
// multi-buffer state is word-sliced: word j of lane l at w[j][l].
struct OpensslSha256MbCtx {
  uint32_t w[8][8];
};
struct OpensslHashDesc {
  const unsigned char* ptr;
  int blocks;
};
void sha256_multi_block(OpensslSha256MbCtx* ctx, const OpensslHashDesc* desc, int n4x);
// `state` is the h[8] that opens a SHA256_CTX.
void sha256_block_data_order(uint32_t* state, const void* in, size_t blocks);
}
#endif

namespace ploop::stream {

namespace {

constexpr size_t kBlock = 64;

Digest EvpOf(Sha256Pieces pieces) {
  thread_local Sha256 sha;
  for (std::span<const std::byte> piece : pieces) sha.Update(piece);
  return sha.Final();
}

#ifdef PLOOP_HAVE_OPENSSL_SHA256_MB

constexpr uint32_t kInitialState[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
// Blocks per call: the routine counts them in an int.
constexpr size_t kMaxRunBlocks = size_t{1} << 20;

// Walks a message given as pieces as runs of whole 64-byte blocks: in
// place where a piece holds them, else one block gathered into `stage_`.
class BlockCursor {
 public:
  explicit BlockCursor(Sha256Pieces pieces) : pieces_(pieces) {
    for (std::span<const std::byte> p : pieces) length_ += p.size();
    Next();
  }
  BlockCursor(const BlockCursor&) = delete;
  BlockCursor& operator=(const BlockCursor&) = delete;

  // The current run: `blocks()` whole blocks at `data()`; 0 at the end,
  // when fewer than 64 bytes are left (`tail()`).
  const unsigned char* data() const { return run_; }
  size_t blocks() const { return run_blocks_; }
  std::span<const unsigned char> tail() const { return {stage_, staged_}; }
  uint64_t length() const { return length_; }

  // The first `n` blocks of the run were hashed.
  void Consume(size_t n) {
    if (run_ == stage_) {
      staged_ = 0;
    } else {
      offset_ += n * kBlock;
    }
    Next();
  }

 private:
  void Next() {
    run_ = nullptr;
    run_blocks_ = 0;
    while (piece_ < pieces_.size() && offset_ == pieces_[piece_].size()) {
      ++piece_;
      offset_ = 0;
    }
    if (piece_ == pieces_.size()) return;
    const size_t left = pieces_[piece_].size() - offset_;
    if (left >= kBlock) {
      run_ = reinterpret_cast<const unsigned char*>(pieces_[piece_].data()) + offset_;
      run_blocks_ = std::min(left / kBlock, kMaxRunBlocks);
      return;
    }
    // Fewer than a block left in this piece: gather one from here on.
    while (piece_ < pieces_.size() && staged_ < kBlock) {
      const size_t n = std::min(pieces_[piece_].size() - offset_, kBlock - staged_);
      std::memcpy(stage_ + staged_, pieces_[piece_].data() + offset_, n);
      staged_ += n;
      offset_ += n;
      if (offset_ == pieces_[piece_].size()) {
        ++piece_;
        offset_ = 0;
      }
    }
    if (staged_ == kBlock) {
      run_ = stage_;
      run_blocks_ = 1;
    }
  }

  Sha256Pieces pieces_;
  size_t piece_ = 0;
  size_t offset_ = 0;
  uint64_t length_ = 0;
  const unsigned char* run_ = nullptr;
  size_t run_blocks_ = 0;
  unsigned char stage_[kBlock];
  size_t staged_ = 0;
};

// Hashes what is left of `c` into `state` and returns the digest.
Digest Finish(BlockCursor& c, uint32_t* state) {
  while (c.blocks() > 0) {
    const size_t n = c.blocks();
    sha256_block_data_order(state, c.data(), n);
    c.Consume(n);
  }
  // Padding: 0x80, zeros, the length in bits as a big-endian 64-bit
  // number, ending a block.
  unsigned char last[2 * kBlock] = {};
  const std::span<const unsigned char> tail = c.tail();
  std::memcpy(last, tail.data(), tail.size());
  last[tail.size()] = 0x80;
  const size_t blocks = tail.size() + 1 + 8 <= kBlock ? 1 : 2;
  const uint64_t bits = c.length() * 8;
  for (int i = 0; i < 8; ++i) {
    last[blocks * kBlock - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  }
  sha256_block_data_order(state, last, blocks);
  Digest out;
  for (int j = 0; j < 8; ++j) {
    for (int k = 0; k < 4; ++k) out[4 * j + k] = std::byte(state[j] >> (24 - 8 * k));
  }
  return out;
}

std::array<Digest, 2> LanesOf2(Sha256Pieces a, Sha256Pieces b) {
  BlockCursor ca(a);
  BlockCursor cb(b);
  uint32_t sa[8];
  uint32_t sb[8];
  std::memcpy(sa, kInitialState, sizeof(sa));
  std::memcpy(sb, kInitialState, sizeof(sb));
  if (ca.blocks() > 0 && cb.blocks() > 0) {
    OpensslSha256MbCtx ctx{};
    for (int j = 0; j < 8; ++j) {
      ctx.w[j][0] = kInitialState[j];
      ctx.w[j][1] = kInitialState[j];
    }
    // Lanes 2 and 3 of the routine's four are idle: no blocks, and a
    // readable pointer all the same.
    static const unsigned char idle[kBlock] = {};
    OpensslHashDesc desc[4] = {{idle, 0}, {idle, 0}, {idle, 0}, {idle, 0}};
    while (ca.blocks() > 0 && cb.blocks() > 0) {
      const size_t n = std::min(ca.blocks(), cb.blocks());
      desc[0] = {ca.data(), static_cast<int>(n)};
      desc[1] = {cb.data(), static_cast<int>(n)};
      sha256_multi_block(&ctx, desc, 1);
      ca.Consume(n);
      cb.Consume(n);
    }
    for (int j = 0; j < 8; ++j) {
      sa[j] = ctx.w[j][0];
      sb[j] = ctx.w[j][1];
    }
  }
  return {Finish(ca, sa), Finish(cb, sb)};
}

bool CpuHasShaExtensions() {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (ebx & (1u << 29)) != 0;
#else
  return false;
#endif
}

// Lengths around block and padding boundaries, split into pieces that do
// and do not end on blocks, against EVP.
// About 0.5 MB hashed each way: a quarter of a millisecond, once.
bool LanesAgreeWithEvp() {
  constexpr size_t kLongest = 2 * 4096 + 77;
  std::vector<std::byte> data(kLongest + 64);
  uint32_t x = 0x9e3779b9;
  for (std::byte& b : data) {
    x = x * 1664525 + 1013904223;
    b = std::byte(x >> 24);
  }
  const std::span<const std::byte> all(data);
  const size_t lengths[] = {0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, kLongest};
  for (size_t la : lengths) {
    for (size_t lb : lengths) {
      const std::span<const std::byte> a[] = {all.first(la / 3), all.subspan(la / 3, la - la / 3)};
      const std::span<const std::byte> b[] = {all.subspan(7, lb / 2),
                                              all.subspan(13 + lb / 2, lb - lb / 2)};
      const auto two = LanesOf2(a, b);
      if (two[0] != EvpOf(a) || two[1] != EvpOf(b)) return false;
    }
  }
  return true;
}

#endif  // PLOOP_HAVE_OPENSSL_SHA256_MB

bool DecideLanes() {
#ifdef PLOOP_HAVE_OPENSSL_SHA256_MB
  const char* env = std::getenv("PLOOP_SHA256_LANES");
  if (env != nullptr && std::strcmp(env, "1") == 0) return false;
  // EVP first: it loads the provider, which runs OpenSSL's CPU detection
  // the internal routines dispatch on.
  (void)EvpOf({});
  return CpuHasShaExtensions() && LanesAgreeWithEvp();
#else
  return false;
#endif
}

}  // namespace

bool Sha256TwoLanes() {
  static const bool lanes = DecideLanes();
  return lanes;
}

bool Sha256LanesBuilt() {
#ifdef PLOOP_HAVE_OPENSSL_SHA256_MB
  return true;
#else
  return false;
#endif
}

std::array<Digest, 2> Sha256Of2(Sha256Pieces a, Sha256Pieces b) {
#ifdef PLOOP_HAVE_OPENSSL_SHA256_MB
  if (Sha256TwoLanes()) return LanesOf2(a, b);
#endif
  return {EvpOf(a), EvpOf(b)};
}

}  // namespace ploop::stream
