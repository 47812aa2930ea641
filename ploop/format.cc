#include "ploop/format.h"

#include <cstring>

namespace ploop {

namespace {

uint64_t RoundUp(uint64_t v, uint64_t unit) { return (v + unit - 1) / unit * unit; }

struct Chs {
  uint32_t heads;
  uint32_t cylinders;
};

// OpenVZ ploop's ConvertToCHS(): only heads and cylinders reach the header,
// offset 28 carries the cluster size instead of sectors per track.
Chs ComputeChs(uint64_t size_sectors) {
  if (size_sectors > 1032192 && size_sectors < 16777216) {
    return {16, static_cast<uint32_t>(size_sectors / (63 * 16))};
  }
  uint64_t spt = 0;
  for (uint64_t s : {63, 32, 16, 8}) {
    if (size_sectors % s == 0) {
      spt = s;
      break;
    }
  }
  if (spt == 0) return {1, static_cast<uint32_t>(size_sectors)};
  uint64_t rest = size_sectors / spt;
  for (uint64_t h : {16, 8, 4, 2}) {
    if (rest % h == 0) return {static_cast<uint32_t>(h), static_cast<uint32_t>(rest / h)};
  }
  return {1, static_cast<uint32_t>(size_sectors)};
}

}  // namespace

bool IsValidClusterBytes(uint64_t cluster_bytes) {
  return cluster_bytes >= kMinClusterBytes && cluster_bytes <= kMaxClusterBytes &&
         (cluster_bytes & (cluster_bytes - 1)) == 0;
}

uint64_t FirstBlockBytes(uint64_t bat_entries, uint64_t cluster_bytes) {
  return RoundUp(kHeaderBytes + kBatEntryBytes * bat_entries, cluster_bytes);
}

Result<Header> MakeHeader(uint64_t size_bytes, uint64_t cluster_bytes) {
  if (!IsValidClusterBytes(cluster_bytes)) {
    return Status::InvalidArgument("cluster size " + std::to_string(cluster_bytes) +
                                   " is not a power of two from 32K to 64M");
  }
  if (size_bytes == 0) return Status::InvalidArgument("disk size must not be zero");
  if (size_bytes > kMaxCreateSizeBytes) {
    return Status::InvalidArgument("disk size " + std::to_string(size_bytes) +
                                   " bytes is over the maximum of 50T");
  }
  if (size_bytes / cluster_bytes > kMaxBatEntries) {
    return Status::InvalidArgument("disk size needs more than " + std::to_string(kMaxBatEntries) +
                                   " clusters; use a bigger cluster size");
  }
  Header h;
  h.version = FormatVersion::kV2;
  h.cluster_sectors = static_cast<uint32_t>(cluster_bytes / kSectorBytes);
  uint64_t rounded = RoundUp(size_bytes, cluster_bytes);
  h.size_sectors = rounded / kSectorBytes;
  h.bat_entries = static_cast<uint32_t>(rounded / cluster_bytes);
  Chs chs = ComputeChs(h.size_sectors);
  h.heads = chs.heads;
  h.cylinders = chs.cylinders;
  h.first_block_sectors =
      static_cast<uint32_t>(FirstBlockBytes(h.bat_entries, cluster_bytes) / kSectorBytes);
  h.in_use = kInUseClean;
  h.flags = kFlagEmpty;
  return h;
}

void EncodeHeader(const Header& h, std::span<std::byte, kHeaderBytes> out) {
  std::byte* p = out.data();
  std::memcpy(p, h.version == FormatVersion::kV2 ? kSignatureV2 : kSignatureV1, 16);
  StoreLe32(p + 16, h.type);
  StoreLe32(p + 20, h.heads);
  StoreLe32(p + 24, h.cylinders);
  StoreLe32(p + 28, h.cluster_sectors);
  StoreLe32(p + 32, h.bat_entries);
  if (h.version == FormatVersion::kV2) {
    StoreLe64(p + 36, h.size_sectors);
  } else {
    StoreLe32(p + 36, static_cast<uint32_t>(h.size_sectors));
    StoreLe32(p + 40, 0);
  }
  StoreLe32(p + 44, h.in_use);
  StoreLe32(p + 48, h.first_block_sectors);
  StoreLe32(p + 52, h.flags);
  StoreLe64(p + 56, h.ext_offset_sectors);
}

bool HasPloopSignature(std::span<const std::byte> in) {
  return in.size() >= 16 && (std::memcmp(in.data(), kSignatureV2, 16) == 0 ||
                             std::memcmp(in.data(), kSignatureV1, 16) == 0);
}

Result<Header> DecodeHeader(std::span<const std::byte, kHeaderBytes> in) {
  const std::byte* p = in.data();
  Header h;
  if (std::memcmp(p, kSignatureV2, 16) == 0) {
    h.version = FormatVersion::kV2;
  } else if (std::memcmp(p, kSignatureV1, 16) == 0) {
    h.version = FormatVersion::kV1;
  } else {
    return Status::Corruption("bad signature: not a ploop image");
  }
  h.type = LoadLe32(p + 16);
  h.heads = LoadLe32(p + 20);
  h.cylinders = LoadLe32(p + 24);
  h.cluster_sectors = LoadLe32(p + 28);
  h.bat_entries = LoadLe32(p + 32);
  h.size_sectors = h.version == FormatVersion::kV2 ? LoadLe64(p + 36) : LoadLe32(p + 36);
  h.in_use = LoadLe32(p + 44);
  h.first_block_sectors = LoadLe32(p + 48);
  h.flags = LoadLe32(p + 52);
  h.ext_offset_sectors = LoadLe64(p + 56);

  if (h.type != kImageType) {
    return Status::Corruption("wrong image type " + std::to_string(h.type) + " (expected 2)");
  }
  if (!IsValidClusterBytes(h.cluster_bytes())) {
    return Status::Corruption("wrong cluster size: " + std::to_string(h.cluster_sectors) +
                              " sectors is not a power of two from 64 to 131072");
  }
  if (h.bat_entries > kMaxBatEntries) {
    return Status::Corruption("BAT too large: " + std::to_string(h.bat_entries) + " entries");
  }
  uint64_t want_entries = (h.size_sectors + h.cluster_sectors - 1) / h.cluster_sectors;
  if (want_entries != h.bat_entries) {
    return Status::Corruption("BAT has " + std::to_string(h.bat_entries) +
                              " entries but the disk size of " + std::to_string(h.size_sectors) +
                              " sectors needs " + std::to_string(want_entries));
  }
  return h;
}

}  // namespace ploop
