// The ploop / Parallels "expanded" image header and its constants.
//
// Byte layout (all little-endian; see ploop/FORMAT.md for the full spec):
//
//   off size field                 meaning
//     0  16  signature             "WithoutFreeSpace" (v1) | "WithouFreSpacExt" (v2)
//    16   4  type                  always 2
//    20   4  heads                 CHS geometry, informational
//    24   4  cylinders             CHS geometry, informational
//    28   4  cluster_sectors       cluster size in 512-byte sectors
//    32   4  bat_entries           virtual size in clusters
//    36   8  size_sectors          virtual size in sectors (v1: low 32 bits)
//    44   4  in_use                0 clean, 0x746F6E59 dirty, 0x312e3276 clean+ext
//    48   4  first_block_sectors   start of the data area, in sectors
//    52   4  flags                 bit0 empty, bit1 format-version conversion
//    56   8  ext_offset_sectors    format extension cluster, 0 = none
//    64 ...  BAT                   u32 per cluster; v2 cluster index, v1 sector
//
// Thread-safety: plain values and pure functions.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "ploop/status.h"

namespace ploop {

inline constexpr uint64_t kSectorBytes = 512;
inline constexpr size_t kHeaderBytes = 64;
inline constexpr size_t kBatEntryBytes = 4;

inline constexpr char kSignatureV1[] = "WithoutFreeSpace";
inline constexpr char kSignatureV2[] = "WithouFreSpacExt";
inline constexpr uint32_t kImageType = 2;

inline constexpr uint32_t kInUseDirty = 0x746F6E59;     // "Ynot": open read-write
inline constexpr uint32_t kInUseClean = 0;              // closed by spec 2.0 software
inline constexpr uint32_t kInUseCleanExt = 0x312e3276;  // "v2.1": closed, extension present

inline constexpr uint32_t kFlagEmpty = 0x1;
inline constexpr uint32_t kFlagFmtVersionConvert = 0x2;

inline constexpr uint64_t kMinClusterBytes = 32 * 1024;
inline constexpr uint64_t kMaxClusterBytes = 64 * 1024 * 1024;
inline constexpr uint64_t kDefaultClusterBytes = 1024 * 1024;

// The largest virtual size we create: 50 TiB, the limit of OpenVZ ploop.
inline constexpr uint64_t kMaxCreateSizeBytes = 50ull << 40;
// The most BAT entries we open (as QEMU: the BAT must stay under 2 GiB).
inline constexpr uint64_t kMaxBatEntries = 0x7fffffff / 4;

enum class FormatVersion { kV1, kV2 };

struct Header {
  FormatVersion version = FormatVersion::kV2;
  uint32_t type = kImageType;
  uint32_t heads = 0;
  uint32_t cylinders = 0;
  uint32_t cluster_sectors = 0;
  uint32_t bat_entries = 0;
  uint64_t size_sectors = 0;
  uint32_t in_use = kInUseClean;
  uint32_t first_block_sectors = 0;
  uint32_t flags = 0;
  uint64_t ext_offset_sectors = 0;

  uint64_t cluster_bytes() const { return uint64_t{cluster_sectors} * kSectorBytes; }
  uint64_t size_bytes() const { return size_sectors * kSectorBytes; }
  uint64_t first_block_bytes() const { return uint64_t{first_block_sectors} * kSectorBytes; }
  // Anything but the two "closed" markers means the image was not closed
  // cleanly (OpenVZ treats unknown values the same way).
  bool dirty() const { return in_use != kInUseClean && in_use != kInUseCleanExt; }
  bool v2() const { return version == FormatVersion::kV2; }
};

// True for a power of two from 32 KiB to 64 MiB.
bool IsValidClusterBytes(uint64_t cluster_bytes);

// Bytes from the start of the file to the first data cluster for a BAT of
// `bat_entries`: roundup(64 + 4 * entries, cluster).
uint64_t FirstBlockBytes(uint64_t bat_entries, uint64_t cluster_bytes);

// A fresh v2 header for a disk of `size_bytes` (rounded up to the cluster)
// with CHS geometry computed as OpenVZ ploop does, so our headers match
// theirs byte for byte. InvalidArgument for a bad cluster size or a size of
// zero or over kMaxCreateSizeBytes.
Result<Header> MakeHeader(uint64_t size_bytes, uint64_t cluster_bytes);

// Encodes the 64-byte header.
void EncodeHeader(const Header& header, std::span<std::byte, kHeaderBytes> out);

// Decodes and validates what every reader needs before trusting the BAT:
// signature, type, cluster size, entry count vs. size, first-block offset
// (within sane bounds), v1 size. Corruption with a one-line reason
// otherwise. Checks against the file length are the image's job.
Result<Header> DecodeHeader(std::span<const std::byte, kHeaderBytes> in);

// The raw 16 signature bytes of `in` match either version.
bool HasPloopSignature(std::span<const std::byte> in);

// Little-endian helpers over byte spans.
inline uint32_t LoadLe32(const std::byte* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline uint64_t LoadLe64(const std::byte* p) {
  return uint64_t(LoadLe32(p)) | uint64_t(LoadLe32(p + 4)) << 32;
}
inline void StoreLe32(std::byte* p, uint32_t v) {
  p[0] = std::byte(v);
  p[1] = std::byte(v >> 8);
  p[2] = std::byte(v >> 16);
  p[3] = std::byte(v >> 24);
}
inline void StoreLe64(std::byte* p, uint64_t v) {
  StoreLe32(p, uint32_t(v));
  StoreLe32(p + 4, uint32_t(v >> 32));
}

}  // namespace ploop
