// Sha256Of2: the SHA-256 digests of two messages, hashed together.
//
// Why: SHA-256 on the x86 SHA extensions is bound by the latency of its
// round instruction, so one message leaves the unit idle between rounds.
// OpenSSL interleaves two messages in its multi-buffer routine
// (sha256_multi_block, written for its TLS multi-block ciphers). On the
// AMD EPYC (Zen 5) we measure on: 3.0 GB/s for both messages together,
// against 1.94 GB/s for one through EVP. A stream's chunk digests are two
// thirds of send|receive's CPU time (tools/bench/README.md, session 13),
// so the workers on both sides hash chunks two at a time.
//
// How: OpenSSL's compression functions on our side of SHA-256's message
// handling. Each message (pieces in order) is cut into 64-byte blocks; a
// block that spans pieces is gathered into a staging block. While both
// messages have blocks, runs of equal length go through the two-lane
// routine; the longer message's rest through OpenSSL's one-message block
// function (sha256_block_data_order); then each gets SHA-256's padding
// (FIPS 180-4, 5.1.1) and its state is read out big-endian.
//
// Fallback: both routines are internal to libcrypto, reachable in its
// static archive only. Without them (PLOOP_HAVE_OPENSSL_SHA256_MB unset,
// a shared libcrypto), on a CPU without the SHA extensions (where the
// two-lane routine has no advantage), when PLOOP_SHA256_LANES=1 is in the
// environment (for A/B measurements), or when a check against EVP on test
// messages at first use fails, each message is hashed through EVP. The
// digests are the same either way.
//
// Thread-safety: a pure function; the first call decides the path once.
#pragma once

#include <array>
#include <cstddef>
#include <span>

#include "snapshot/stream_format.h"

namespace ploop::stream {

using Sha256Pieces = std::span<const std::span<const std::byte>>;

// SHA-256 of the concatenation of `a`'s pieces, and of `b`'s.
std::array<Digest, 2> Sha256Of2(Sha256Pieces a, Sha256Pieces b);

// Whether Sha256Of2 hashes the two messages together (see above).
bool Sha256TwoLanes();
// Whether the build has the two-lane routine (PLOOP_HAVE_OPENSSL_SHA256_MB).
bool Sha256LanesBuilt();

}  // namespace ploop::stream
