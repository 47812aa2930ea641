// The stream's byte format: encoders and validating decoders.
//
// Goal: one place that turns stream structures into bytes and back, so the
// sender and the receiver cannot disagree, and so every value read from a
// stream is checked before it is used. The layout, field by field, is
// snapshot/STREAM.md; the offsets in the comments below match it.
//
// Invariants of every decoder:
//   - it never reads past the span it was given and never allocates more
//     than a size it has already bounded (the header is at most
//     kHeaderFixedBytes + kMaxLayers * kLayerEntryBytes + 32 bytes, a
//     record table at most kMaxChunkRecords records, a token at most
//     kMaxLayers views);
//   - reserved fields and unknown flags must be zero, so that a flipped bit
//     anywhere in a structure is either caught here or changes a digest;
//   - GUIDs are 38-byte text fields that must already be in the normalised
//     form ParseGuid() produces (braces, lower-case hex), so nothing else
//     (a path, a NUL, a newline) can come through as a GUID;
//   - a decoder of a digested structure recomputes the digest and compares.
//
// Crash ordering: none here (no I/O).
#include "snapshot/stream_format.h"

#include <lz4.h>
#include <lz4frame.h>
#include <openssl/evp.h>
#include <xxhash.h>
#if (defined(__x86_64__) || defined(__i386__)) && __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#define PLOOP_XXH3_DISPATCH 1
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>

#include "ploop/descriptor.h"
#include "ploop/format.h"
#include "snapshot/sha256_lanes.h"

namespace ploop::stream {

namespace {

bool Tagged(std::span<const std::byte> in, const char* tag) {
  return in.size() >= kTagBytes && std::memcmp(in.data(), tag, kTagBytes) == 0;
}

bool AllZero(std::span<const std::byte> in) {
  return std::all_of(in.begin(), in.end(), [](std::byte b) { return b == std::byte{0}; });
}

void PutGuid(std::vector<std::byte>& out, const std::string& guid) {
  std::byte field[kGuidTextBytes] = {};
  std::memcpy(field, guid.data(), std::min(guid.size(), kGuidTextBytes));
  PutBytes(out, field);
}

// A GUID field must hold a GUID exactly as ParseGuid() writes it.
Result<std::string> GetGuid(const std::byte* p, std::string_view what) {
  std::string text(reinterpret_cast<const char*>(p), kGuidTextBytes);
  auto parsed = ParseGuid(text);
  if (!parsed.ok() || *parsed != text) {
    std::string shown;
    for (char c : text) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
    return Status::Corruption(std::string(what) + " is not a GUID: '" + shown + "'");
  }
  return text;
}

Digest DigestAt(const std::byte* p) {
  Digest d;
  std::memcpy(d.data(), p, kDigestBytes);
  return d;
}

const EVP_MD* Sha256Md() {
  // Fetched once: the implicit fetch behind EVP_sha256() takes a lock per
  // call, which the chunk digests of several workers would contend on.
  static const EVP_MD* md = [] {
    EVP_MD* m = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (m == nullptr) std::abort();  // no SHA-256 provider: OpenSSL is unusable
    return m;
  }();
  return md;
}

constexpr char kBase64Url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
constexpr std::string_view kTokenPrefix = "ploop1-";
constexpr char kTokenTag[] = "PLRT";
constexpr size_t kTokenFixedBytes = 4 + 4 + 32 + 8 * 5 + 32 + 4;
constexpr size_t kTokenCheckBytes = 8;

std::string Base64Url(std::span<const std::byte> in) {
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (std::byte b : in) {
    acc = (acc << 8) | uint32_t(b);
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out += kBase64Url[(acc >> bits) & 63];
    }
  }
  if (bits > 0) out += kBase64Url[(acc << (6 - bits)) & 63];
  return out;
}

bool FromBase64Url(std::string_view in, std::vector<std::byte>& out) {
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    const char* p = std::strchr(kBase64Url, c);
    if (c == '\0' || p == nullptr) return false;
    acc = (acc << 6) | uint32_t(p - kBase64Url);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(std::byte(acc >> bits));
    }
  }
  // Leftover bits must be padding zeros (a canonical encoding).
  return bits < 6 && (acc & ((1u << bits) - 1)) == 0;
}

// The lz4 frame header Lz4Compressor writes: magic, FLG 0x68 (version 1,
// independent blocks, content size; no block or content checksums: the
// chunk's SHA-256 covers the frame), BD 0x70 (4 MiB blocks), then the
// content size; the header checksum byte follows.
constexpr uint8_t kLz4Flg = 0x68;
constexpr uint8_t kLz4Bd = 0x70;
constexpr size_t kLz4FixedHeaderBytes = 4 + 1 + 1 + 8;

LZ4F_preferences_t Lz4Prefs(size_t raw_bytes) {
  LZ4F_preferences_t prefs;
  std::memset(&prefs, 0, sizeof(prefs));
  prefs.frameInfo.blockSizeID = LZ4F_max4MB;
  prefs.frameInfo.blockMode = LZ4F_blockIndependent;
  prefs.frameInfo.contentChecksumFlag = LZ4F_noContentChecksum;
  prefs.frameInfo.frameType = LZ4F_frame;
  prefs.frameInfo.contentSize = raw_bytes;
  prefs.frameInfo.blockChecksumFlag = LZ4F_noBlockChecksum;
  prefs.compressionLevel = 0;  // the fast default
  prefs.autoFlush = 1;
  return prefs;
}

}  // namespace

// --- Buffers -------------------------------------------------------------------------

AlignedBuffer NewAlignedBuffer(size_t size_bytes) {
  AlignedBuffer b = AllocateIoMemory(size_bytes);
  if (b == nullptr) throw std::bad_alloc();
  return b;
}

AlignedBuffer BufferPool::Get() {
  {
    std::lock_guard lock(mu_);
    if (!free_.empty()) {
      AlignedBuffer b = std::move(free_.back());
      free_.pop_back();
      return b;
    }
  }
  return NewAlignedBuffer(buffer_bytes_);
}

void BufferPool::Put(AlignedBuffer buffer) {
  if (buffer == nullptr) return;
  std::lock_guard lock(mu_);
  free_.push_back(std::move(buffer));
}

// --- Little-endian helpers ---------------------------------------------------------

void PutLe32(std::vector<std::byte>& out, uint32_t v) {
  std::byte b[4];
  StoreLe32(b, v);
  PutBytes(out, b);
}

void PutLe64(std::vector<std::byte>& out, uint64_t v) {
  std::byte b[8];
  StoreLe64(b, v);
  PutBytes(out, b);
}

void PutBytes(std::vector<std::byte>& out, std::span<const std::byte> bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}

// --- Header ------------------------------------------------------------------------

uint64_t StreamHeader::max_chunk_data_bytes() const {
  return std::max<uint64_t>(kChunkDataBytes, uint64_t{cluster_bytes} * layers.size());
}

std::vector<std::byte> EncodeStreamHeader(StreamHeader& h) {
  std::vector<std::byte> out;
  const uint32_t flags = (h.incremental ? kFlagIncremental : 0) | (h.layered ? kFlagLayered : 0);
  PutBytes(out, std::as_bytes(std::span(kStreamMagic, 8)));  // 0 magic
  PutLe32(out, kVersion);                                    // 8 version
  PutLe32(out, static_cast<uint32_t>(kHeaderFixedBytes + kLayerEntryBytes * h.layers.size() +
                                     kDigestBytes));     // 12 header_bytes
  PutLe32(out, flags);                                   // 16 flags
  PutLe32(out, h.cluster_bytes);                         // 20
  PutLe64(out, h.disk_size_bytes);                       // 24
  PutLe32(out, h.heads);                                 // 32
  PutLe32(out, h.cylinders);                             // 36
  PutLe32(out, static_cast<uint32_t>(h.layers.size()));  // 40 layer_count
  PutLe32(out, 0);                                       // 44 reserved
  PutLe64(out, h.total_bytes);                           // 48
  PutGuid(out, h.base_guid);                             // 56
  out.resize(out.size() + 2);                            // 94 reserved
  PutBytes(out, h.base_digest);                          // 96
  for (const LayerEntry& layer : h.layers) {             // 128 + 96 * i
    PutGuid(out, layer.guid);                            //   0
    out.resize(out.size() + 2);                          //  38 reserved
    PutLe64(out, layer.size_bytes);                      //  40
    PutGuid(out, layer.parent_guid);                     //  48
    out.resize(out.size() + 10);                         //  86 reserved
  }
  h.digest = Sha256::Of(out);
  PutBytes(out, h.digest);
  return out;
}

Result<size_t> StreamHeaderBytes(std::span<const std::byte> prefix) {
  if (prefix.size() < kHeaderFixedBytes) return Status::Corruption("stream header is truncated");
  if (std::memcmp(prefix.data(), kStreamMagic, 8) != 0) {
    return Status::Corruption("not a ploop stream (bad magic)");
  }
  const uint32_t version = LoadLe32(prefix.data() + 8);
  if (version != kVersion) {
    return Status::NotSupported("stream version " + std::to_string(version) +
                                "; this ploop reads version " + std::to_string(kVersion));
  }
  const uint32_t layers = LoadLe32(prefix.data() + 40);
  if (layers == 0 || layers > kMaxLayers) {
    return Status::Corruption("stream header: " + std::to_string(layers) + " layers (1 to " +
                              std::to_string(kMaxLayers) + " allowed)");
  }
  const size_t expected = kHeaderFixedBytes + kLayerEntryBytes * layers + kDigestBytes;
  const uint32_t declared = LoadLe32(prefix.data() + 12);
  if (declared != expected) {
    return Status::Corruption("stream header: size " + std::to_string(declared) + " for " +
                              std::to_string(layers) + " layers (expected " +
                              std::to_string(expected) + ")");
  }
  return expected;
}

Result<StreamHeader> DecodeStreamHeader(std::span<const std::byte> in) {
  ASSIGN_OR_RETURN(size_t size, StreamHeaderBytes(in));
  if (in.size() != size) return Status::Corruption("stream header is truncated");
  const std::byte* p = in.data();
  auto bad = [](const std::string& why) { return Status::Corruption("stream header: " + why); };
  Digest digest = Sha256::Of(in.first(size - kDigestBytes));
  if (digest != DigestAt(p + size - kDigestBytes)) return bad("digest mismatch");
  StreamHeader h;
  h.digest = digest;
  const uint32_t flags = LoadLe32(p + 16);
  if (flags & ~(kFlagIncremental | kFlagLayered)) {
    return bad("unknown flags 0x" + Hex(std::span(p + 16, 4)));
  }
  h.incremental = flags & kFlagIncremental;
  h.layered = flags & kFlagLayered;
  h.cluster_bytes = LoadLe32(p + 20);
  h.disk_size_bytes = LoadLe64(p + 24);
  h.heads = LoadLe32(p + 32);
  h.cylinders = LoadLe32(p + 36);
  const uint32_t layer_count = LoadLe32(p + 40);
  h.total_bytes = LoadLe64(p + 48);
  if (LoadLe32(p + 44) != 0 || !AllZero(std::span(p + 94, 2))) return bad("reserved bytes set");
  if (!IsValidClusterBytes(h.cluster_bytes)) {
    return bad("cluster size " + std::to_string(h.cluster_bytes) +
               " is not a power of two from 32K to 64M");
  }
  const uint64_t cb = h.cluster_bytes;
  if (h.disk_size_bytes == 0 || h.disk_size_bytes % cb != 0 ||
      h.disk_size_bytes > kMaxCreateSizeBytes || h.disk_size_bytes / cb > kMaxBatEntries) {
    return bad("disk size " + std::to_string(h.disk_size_bytes) +
               " is not a whole number of clusters up to 50T");
  }
  if (!h.layered && layer_count != 1) return bad("a flattened stream with several layers");
  if (uint64_t{layer_count} * cb > kMaxIndexGroupBytes) {
    return bad(std::to_string(layer_count) + " layers of " + std::to_string(cb) +
               "-byte clusters exceed the per-cluster limit of " +
               std::to_string(kMaxIndexGroupBytes) + " bytes");
  }
  if (h.total_bytes > uint64_t{layer_count} * h.disk_size_bytes) {
    return bad("total bytes " + std::to_string(h.total_bytes) + " exceed the layers' size");
  }
  ASSIGN_OR_RETURN(h.base_guid, GetGuid(p + 56, "base GUID"));
  h.base_digest = DigestAt(p + 96);
  if (h.incremental) {
    if (h.base_guid == kNullGuid || h.base_guid == kTopGuid) {
      return bad("an incremental stream needs a snapshot as its base, not " + h.base_guid);
    }
  } else if (h.base_guid != kNullGuid || !AllZero(h.base_digest)) {
    return bad("a full stream names a base");
  }
  std::set<std::string> seen{h.base_guid};
  uint64_t previous_size = 0;
  for (uint32_t i = 0; i < layer_count; ++i) {
    const std::byte* e = p + kHeaderFixedBytes + kLayerEntryBytes * i;
    const std::string which = "layer " + std::to_string(i);
    LayerEntry layer;
    ASSIGN_OR_RETURN(layer.guid, GetGuid(e, which + " GUID"));
    layer.size_bytes = LoadLe64(e + 40);
    ASSIGN_OR_RETURN(layer.parent_guid, GetGuid(e + 48, which + " parent GUID"));
    if (!AllZero(std::span(e + 38, 2)) || !AllZero(std::span(e + 86, 10))) {
      return bad(which + ": reserved bytes set");
    }
    if (layer.guid == kNullGuid || !seen.insert(layer.guid).second) {
      return bad(which + ": GUID " + layer.guid + " is null or repeated");
    }
    if (layer.guid == kTopGuid && i + 1 != layer_count) {
      return bad(which + ": the top GUID can only be the last layer");
    }
    const std::string& expected_parent = i == 0 ? h.base_guid : h.layers.back().guid;
    if (layer.parent_guid != expected_parent) {
      return bad(which + ": parent " + layer.parent_guid + ", expected " + expected_parent);
    }
    if (layer.size_bytes == 0 || layer.size_bytes % cb != 0 ||
        layer.size_bytes > h.disk_size_bytes || layer.size_bytes < previous_size) {
      return bad(which + ": size " + std::to_string(layer.size_bytes) +
                 " is not a whole number of clusters between the layer below and the disk");
    }
    previous_size = layer.size_bytes;
    h.layers.push_back(std::move(layer));
  }
  if (previous_size != h.disk_size_bytes) return bad("the last layer is not the disk's size");
  // The receiver holds the new deltas' BATs in memory (4 bytes a
  // cluster): together no more than one largest ploop image's.
  uint64_t entries = 0;
  for (size_t k = 0; k < h.layers.size(); ++k) entries += h.layer_clusters(k);
  if (entries > kMaxBatEntries) {
    return bad("the layers have " + std::to_string(entries) + " clusters together, more than " +
               std::to_string(kMaxBatEntries));
  }
  return h;
}

// --- Chunks --------------------------------------------------------------------------

void EncodeChunkHeader(const ChunkHeader& c, std::span<std::byte, kChunkHeaderBytes> out) {
  std::byte* p = out.data();
  std::memset(p, 0, kChunkHeaderBytes);
  std::memcpy(p, kChunkTag, kTagBytes);  // 0
  StoreLe32(p + 4, c.flags);             // 4
  StoreLe64(p + 8, c.seq);               // 8
  StoreLe32(p + 16, c.record_count);     // 16
  StoreLe32(p + 20, c.data_count);       // 20
  StoreLe64(p + 24, c.payload_bytes);    // 24
  StoreLe64(p + 32, c.progress_bytes);   // 32
                                         // 40 reserved
  std::memcpy(p + 48, c.digest.data(), kDigestBytes);
}

Result<ChunkHeader> DecodeChunkHeader(std::span<const std::byte, kChunkHeaderBytes> in,
                                      const StreamHeader& header) {
  const std::byte* p = in.data();
  if (!Tagged(in, kChunkTag)) return Status::Corruption("expected a chunk, found other bytes");
  ChunkHeader c;
  c.flags = LoadLe32(p + 4);
  c.seq = LoadLe64(p + 8);
  c.record_count = LoadLe32(p + 16);
  c.data_count = LoadLe32(p + 20);
  c.payload_bytes = LoadLe64(p + 24);
  c.progress_bytes = LoadLe64(p + 32);
  c.digest = DigestAt(p + 48);
  auto bad = [&](const std::string& why) {
    return Status::Corruption("chunk " + std::to_string(c.seq) + ": " + why);
  };
  if (c.flags & ~kChunkLz4) return bad("unknown flags");
  if (!AllZero(std::span(p + 40, 8))) return bad("reserved bytes set");
  if (c.record_count == 0 || c.record_count > kMaxChunkRecords) {
    return bad(std::to_string(c.record_count) + " records (1 to " +
               std::to_string(kMaxChunkRecords) + " allowed)");
  }
  if (c.data_count > c.record_count) return bad("more data clusters than records");
  const uint64_t raw = uint64_t{c.data_count} * header.cluster_bytes;
  if (raw > header.max_chunk_data_bytes()) {
    return bad(std::to_string(raw) + " bytes of data, over the limit of " +
               std::to_string(header.max_chunk_data_bytes()));
  }
  if (c.flags & kChunkLz4) {
    if (raw == 0 || c.payload_bytes == 0 || c.payload_bytes > Lz4Compressor::Bound(raw)) {
      return bad("compressed payload of " + std::to_string(c.payload_bytes) + " bytes for " +
                 std::to_string(raw) + " bytes of data");
    }
  } else if (c.payload_bytes != raw) {
    return bad("payload of " + std::to_string(c.payload_bytes) + " bytes for " +
               std::to_string(raw) + " bytes of data");
  }
  if (c.progress_bytes > header.total_bytes) return bad("progress past the stream's total");
  return c;
}

void EncodeRecords(std::span<const Record> records, std::vector<std::byte>& out) {
  out.clear();
  out.resize(records.size() * kRecordBytes);
  std::byte* p = out.data();
  for (const Record& r : records) {
    StoreLe64(p, r.index);
    p[8] = std::byte(r.layer & 0xff);
    p[9] = std::byte(r.layer >> 8);
    p[10] = std::byte(r.kind);
    p[11] = std::byte{0};
    p += kRecordBytes;
  }
}

Result<std::vector<Record>> DecodeRecords(std::span<const std::byte> in, const StreamHeader& header,
                                          uint64_t min_index, uint32_t data_count) {
  if (in.size() % kRecordBytes != 0 || in.size() / kRecordBytes > kMaxChunkRecords) {
    return Status::Corruption("bad record table size");
  }
  std::vector<Record> out(in.size() / kRecordBytes);
  uint32_t data = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const std::byte* p = in.data() + i * kRecordBytes;
    Record& r = out[i];
    r.index = LoadLe64(p);
    r.layer = static_cast<uint16_t>(uint32_t(p[8]) | uint32_t(p[9]) << 8);
    const uint8_t kind = uint8_t(p[10]);
    if (p[11] != std::byte{0})
      return Status::Corruption("record " + std::to_string(i) + ": reserved byte set");
    if (kind != uint8_t(RecordKind::kData) && kind != uint8_t(RecordKind::kZero)) {
      return Status::Corruption("record " + std::to_string(i) + ": unknown kind " +
                                std::to_string(kind));
    }
    r.kind = RecordKind(kind);
    if (r.layer >= header.layers.size()) {
      return Status::Corruption("record " + std::to_string(i) + ": layer " +
                                std::to_string(r.layer) + " does not exist");
    }
    if (r.index >= header.layer_clusters(r.layer)) {
      return Status::Corruption("record " + std::to_string(i) + ": cluster " +
                                std::to_string(r.index) + " is past the end of its layer");
    }
    const bool ordered = i == 0 ? r.index >= min_index
                                : (r.index > out[i - 1].index ||
                                   (r.index == out[i - 1].index && r.layer > out[i - 1].layer));
    if (!ordered) {
      return Status::Corruption("record " + std::to_string(i) + ": cluster " +
                                std::to_string(r.index) + " is out of order");
    }
    data += r.kind == RecordKind::kData;
  }
  if (data != data_count) return Status::Corruption("record table disagrees with the data count");
  return out;
}

namespace {

// Calls fn on each piece of `body`, in order.
template <typename Fn>
void ForEachPiece(const ChunkBody& body, Fn fn) {
  fn(body.header_prefix);
  fn(body.records);
  if (body.payload_pieces.empty()) {
    fn(body.payload);
  } else {
    for (std::span<const std::byte> piece : body.payload_pieces) fn(piece);
  }
}

}  // namespace

uint64_t ChunkBody::bytes() const {
  uint64_t n = 0;
  ForEachPiece(*this, [&](std::span<const std::byte> piece) { n += piece.size(); });
  return n;
}

Digest ChunkBodyDigest(const ChunkBody& body) {
  thread_local Sha256 sha;
  ForEachPiece(body, [](std::span<const std::byte> piece) { sha.Update(piece); });
  return sha.Final();
}

std::array<Digest, 2> ChunkBodyDigests(const ChunkBody& a, const ChunkBody& b) {
  thread_local std::vector<std::span<const std::byte>> pa;
  thread_local std::vector<std::span<const std::byte>> pb;
  for (auto [body, pieces] : {std::pair{&a, &pa}, std::pair{&b, &pb}}) {
    pieces->clear();
    ForEachPiece(*body, [&](std::span<const std::byte> piece) { pieces->push_back(piece); });
  }
  return Sha256Of2(pa, pb);
}

Digest ChainDigest(const Digest& chain, const Digest& body) {
  std::byte buf[2 * kDigestBytes];
  std::memcpy(buf, chain.data(), kDigestBytes);
  std::memcpy(buf + kDigestBytes, body.data(), kDigestBytes);
  return Sha256::Of(buf);
}

// --- End record, resume record ----------------------------------------------------------

size_t EndRecordBytes(const StreamHeader& header) {
  return kEndFixedBytes + kDigestBytes * header.layers.size() + kDigestBytes;
}

std::vector<std::byte> EncodeEndRecord(EndRecord& end, const Digest& chain) {
  std::vector<std::byte> out;
  PutBytes(out, std::as_bytes(std::span(kEndTag, kTagBytes)));  // 0
  PutLe32(out, 0);                                              // 4 reserved
  PutLe64(out, end.chunk_count);                                // 8
  PutLe64(out, end.record_count);                               // 16
  PutLe64(out, end.data_count);                                 // 24
  for (const Digest& d : end.layer_digests) PutBytes(out, d);   // 32 + 32 * i
  Sha256 sha;
  sha.Update(chain);
  sha.Update(out);
  end.final_digest = sha.Final();
  PutBytes(out, end.final_digest);
  return out;
}

Result<EndRecord> DecodeEndRecord(std::span<const std::byte> in, const StreamHeader& header,
                                  const Digest& chain) {
  if (in.size() != EndRecordBytes(header) || !Tagged(in, kEndTag)) {
    return Status::Corruption("bad end record");
  }
  const std::byte* p = in.data();
  if (LoadLe32(p + 4) != 0) return Status::Corruption("end record: reserved bytes set");
  EndRecord end;
  end.chunk_count = LoadLe64(p + 8);
  end.record_count = LoadLe64(p + 16);
  end.data_count = LoadLe64(p + 24);
  for (size_t i = 0; i < header.layers.size(); ++i) {
    end.layer_digests.push_back(DigestAt(p + kEndFixedBytes + kDigestBytes * i));
  }
  end.final_digest = DigestAt(p + in.size() - kDigestBytes);
  Sha256 sha;
  sha.Update(chain);
  sha.Update(in.first(in.size() - kDigestBytes));
  if (sha.Final() != end.final_digest) {
    return Status::Corruption("the stream's final digest does not match");
  }
  return end;
}

void EncodeResumeRecord(const ResumeRecord& r, std::span<std::byte, kResumeRecordBytes> out) {
  std::byte* p = out.data();
  std::memset(p, 0, kResumeRecordBytes);
  std::memcpy(p, kResumeTag, kTagBytes);              // 0
                                                      // 4 reserved
  StoreLe64(p + 8, r.next_seq);                       // 8
  StoreLe64(p + 16, r.next_index);                    // 16
  std::memcpy(p + 24, r.chain.data(), kDigestBytes);  // 24
}

Result<ResumeRecord> DecodeResumeRecord(std::span<const std::byte, kResumeRecordBytes> in) {
  const std::byte* p = in.data();
  if (!Tagged(in, kResumeTag)) return Status::Corruption("bad resume record");
  if (LoadLe32(p + 4) != 0) return Status::Corruption("resume record: reserved bytes set");
  ResumeRecord r;
  r.next_seq = LoadLe64(p + 8);
  r.next_index = LoadLe64(p + 16);
  r.chain = DigestAt(p + 24);
  return r;
}

// --- Resume token ---------------------------------------------------------------------------

std::string EncodeToken(const ResumeToken& t) {
  std::vector<std::byte> bin;
  PutBytes(bin, std::as_bytes(std::span(kTokenTag, 4)));
  PutLe32(bin, kVersion);
  PutBytes(bin, t.header_digest);
  PutLe64(bin, t.next_seq);
  PutLe64(bin, t.next_index);
  PutLe64(bin, t.progress_bytes);
  PutLe64(bin, t.record_count);
  PutLe64(bin, t.data_count);
  PutBytes(bin, t.chain);
  PutLe32(bin, static_cast<uint32_t>(t.views.size()));
  for (const Digest& v : t.views) PutBytes(bin, v);
  Digest check = Sha256::Of(bin);
  PutBytes(bin, std::span(check).first(kTokenCheckBytes));
  return std::string(kTokenPrefix) + Base64Url(bin);
}

Result<ResumeToken> DecodeToken(std::string_view text) {
  auto bad = [](const std::string& why) {
    return Status::InvalidArgument("bad resume token: " + why);
  };
  constexpr size_t kMaxBinary = kTokenFixedBytes + kDigestBytes * kMaxLayers + kTokenCheckBytes;
  if (!text.starts_with(kTokenPrefix))
    return bad("it does not start with " + std::string(kTokenPrefix));
  text.remove_prefix(kTokenPrefix.size());
  if (text.size() > kMaxBinary * 4 / 3 + 4) return bad("too long");
  std::vector<std::byte> bin;
  if (!FromBase64Url(text, bin)) return bad("not base64url");
  if (bin.size() < kTokenFixedBytes + kTokenCheckBytes) return bad("too short");
  Digest check = Sha256::Of(std::span(bin).first(bin.size() - kTokenCheckBytes));
  if (std::memcmp(check.data(), bin.data() + bin.size() - kTokenCheckBytes, kTokenCheckBytes) !=
      0) {
    return bad("checksum mismatch (copied incompletely?)");
  }
  const std::byte* p = bin.data();
  if (std::memcmp(p, kTokenTag, 4) != 0 || LoadLe32(p + 4) != kVersion) {
    return bad("unknown version");
  }
  ResumeToken t;
  t.header_digest = DigestAt(p + 8);
  t.next_seq = LoadLe64(p + 40);
  t.next_index = LoadLe64(p + 48);
  t.progress_bytes = LoadLe64(p + 56);
  t.record_count = LoadLe64(p + 64);
  t.data_count = LoadLe64(p + 72);
  t.chain = DigestAt(p + 80);
  const uint32_t views = LoadLe32(p + 112);
  if (views > kMaxLayers ||
      bin.size() != kTokenFixedBytes + kDigestBytes * views + kTokenCheckBytes) {
    return bad("inconsistent length");
  }
  for (uint32_t i = 0; i < views; ++i)
    t.views.push_back(DigestAt(p + kTokenFixedBytes + kDigestBytes * i));
  return t;
}

// --- Digests ----------------------------------------------------------------------------------

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (ctx_ == nullptr || EVP_DigestInit_ex2(ctx_, Sha256Md(), nullptr) != 1) std::abort();
}

Sha256::~Sha256() { EVP_MD_CTX_free(ctx_); }

void Sha256::Update(std::span<const std::byte> data) {
  EVP_DigestUpdate(ctx_, data.data(), data.size());
}

Digest Sha256::Final() {
  Digest d;
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx_, reinterpret_cast<unsigned char*>(d.data()), &n);
  EVP_DigestInit_ex2(ctx_, Sha256Md(), nullptr);
  return d;
}

Digest Sha256::Of(std::span<const std::byte> data) {
  thread_local Sha256 sha;
  sha.Update(data);
  return sha.Final();
}

namespace {

#if defined(__x86_64__) || defined(__i386__)
// libxxhash (0.8.1) returns from its AVX2/AVX-512 code with the upper
// halves of the vector registers still in use. Until something clears
// them, every legacy-SSE instruction on the thread pays for it -- and
// OpenSSL's SHA-256 (SHA-NI) and lz4 are SSE code: measured here, SHA-256
// right after XXH3 ran at 1.31 GB/s, and at 1.78 GB/s with the state
// cleared (its speed alone). In send|receive, that was 0.5 of ~3.9
// CPU-seconds. VZEROUPPER clears the state and keeps the low 128 bits of
// every register (all that SSE2 code, like ours, uses); it is an invalid
// instruction without AVX, hence the check.
void ClearUpperVectorState() {
  static const bool has_avx = __builtin_cpu_supports("avx");
  // The clobbers keep the compiler from holding anything in these
  // registers across it (were this file ever built for AVX).
  if (has_avx) {
#if defined(__x86_64__)
    asm volatile("vzeroupper" ::
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#else
    asm volatile("vzeroupper" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
#endif
  }
}
#else
void ClearUpperVectorState() {}
#endif

}  // namespace

ClusterDigest ClusterDigestOf(std::span<const std::byte> data) {
#ifdef PLOOP_XXH3_DISPATCH
  // The same hash with the widest vector unit the CPU has (libxxhash picks
  // AVX2 or AVX-512 at run time; plain XXH3_128bits is built for SSE2):
  // measured 40 against 18.7 GB/s on 1 MiB clusters here.
  const XXH128_hash_t h = XXH3_128bits_dispatch(data.data(), data.size());
#else
  const XXH128_hash_t h = XXH3_128bits(data.data(), data.size());
#endif
  ClearUpperVectorState();
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, h);
  static_assert(sizeof(canonical.digest) == kClusterDigestBytes);
  ClusterDigest d;
  std::memcpy(d.data(), canonical.digest, kClusterDigestBytes);
  return d;
}

void ViewChain::Init(uint64_t size_bytes, uint64_t cluster_bytes) {
  std::vector<std::byte> seed;
  constexpr std::string_view kDomain = "ploop view digest v2";
  PutBytes(seed, std::as_bytes(std::span(kDomain.data(), kDomain.size())));
  PutLe64(seed, size_bytes);
  PutLe64(seed, cluster_bytes);
  state_ = Sha256::Of(seed);
}

void ViewChain::Add(uint64_t index, const ClusterDigest& cluster_digest) {
  std::byte buf[kDigestBytes + 8 + kClusterDigestBytes];
  std::memcpy(buf, state_.data(), kDigestBytes);
  StoreLe64(buf + kDigestBytes, index);
  std::memcpy(buf + kDigestBytes + 8, cluster_digest.data(), kClusterDigestBytes);
  state_ = Sha256::Of(buf);
}

std::string Hex(std::span<const std::byte> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (std::byte b : bytes) {
    out += kDigits[uint8_t(b) >> 4];
    out += kDigits[uint8_t(b) & 15];
  }
  return out;
}

std::string ContentDigestText(const Digest& digest) {
  return std::string(kContentDigestPrefix) + Hex(digest);
}

bool ParseContentDigest(std::string_view text, Digest* out) {
  if (!IsContentDigest(text)) return false;
  std::string_view hex = text.substr(text.size() - 2 * kDigestBytes);
  auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < kDigestBytes; ++i) {
    (*out)[i] = std::byte((nibble(hex[2 * i]) << 4) | nibble(hex[2 * i + 1]));
  }
  return true;
}

// --- lz4 ----------------------------------------------------------------------------------------

Result<std::unique_ptr<Lz4Compressor>> Lz4Compressor::Create() {
  LZ4F_cctx* cctx = nullptr;
  if (LZ4F_isError(LZ4F_createCompressionContext(&cctx, LZ4F_VERSION))) {
    return Status::FromErrno(ENOMEM, "lz4: create a compression context");
  }
  return std::unique_ptr<Lz4Compressor>(new Lz4Compressor(cctx));
}

Lz4Compressor::~Lz4Compressor() { LZ4F_freeCompressionContext(cctx_); }

size_t Lz4Compressor::Bound(size_t raw_bytes) {
  LZ4F_preferences_t prefs = Lz4Prefs(raw_bytes);
  return LZ4F_HEADER_SIZE_MAX + LZ4F_compressBound(raw_bytes, &prefs);
}

Result<size_t> Lz4Compressor::Compress(std::span<const std::byte> in, std::span<std::byte> out) {
  LZ4F_preferences_t prefs = Lz4Prefs(in.size());
  auto* dst = reinterpret_cast<char*>(out.data());
  size_t pos = LZ4F_compressBegin(cctx_, dst, out.size(), &prefs);
  if (!LZ4F_isError(pos)) {
    size_t n =
        LZ4F_compressUpdate(cctx_, dst + pos, out.size() - pos, in.data(), in.size(), nullptr);
    pos = LZ4F_isError(n) ? n : pos + n;
  }
  if (!LZ4F_isError(pos)) {
    size_t n = LZ4F_compressEnd(cctx_, dst + pos, out.size() - pos, nullptr);
    pos = LZ4F_isError(n) ? n : pos + n;
  }
  if (LZ4F_isError(pos)) {
    return Status::InvalidArgument(std::string("lz4 compression failed: ") +
                                   LZ4F_getErrorName(pos));
  }
  return pos;
}

Lz4Compressor::Sample Lz4Compressor::SampleCompression(std::span<const std::byte* const> starts,
                                                       size_t piece_bytes) {
  // One 4 KiB sample per piece (cluster), at most 64 pieces spread evenly:
  // a chunk that is mostly random but holds a few compressible clusters
  // is still compressed.
  constexpr size_t kSampleBytes = 4 << 10;
  constexpr size_t kMaxSamples = 64;
  Sample s;
  const size_t pieces = starts.size();
  if (pieces == 0 || piece_bytes < kSampleBytes) return s;
  const size_t samples = std::min(pieces, kMaxSamples);
  scratch_.resize(LZ4_compressBound(kSampleBytes));
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < samples; ++i) {
    const std::byte* sample = starts[i * pieces / samples];
    const int n = LZ4_compress_default(reinterpret_cast<const char*>(sample), scratch_.data(),
                                       kSampleBytes, static_cast<int>(scratch_.size()));
    s.raw += kSampleBytes;
    s.packed += n > 0 ? std::min<size_t>(static_cast<size_t>(n), kSampleBytes) : kSampleBytes;
  }
  s.ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count());
  return s;
}

Result<std::unique_ptr<Lz4Decompressor>> Lz4Decompressor::Create() {
  LZ4F_dctx* dctx = nullptr;
  if (LZ4F_isError(LZ4F_createDecompressionContext(&dctx, LZ4F_VERSION))) {
    return Status::FromErrno(ENOMEM, "lz4: create a decompression context");
  }
  return std::unique_ptr<Lz4Decompressor>(new Lz4Decompressor(dctx));
}

Lz4Decompressor::~Lz4Decompressor() { LZ4F_freeDecompressionContext(dctx_); }

Status Lz4Decompressor::Decompress(std::span<const std::byte> in, std::span<std::byte> out) {
  // The frame header must be exactly the one our compressor writes, so that
  // no flag (an unchecked content checksum, a dictionary, other block
  // sizes) can change how the rest is read.
  std::byte expected[kLz4FixedHeaderBytes];
  StoreLe32(expected, 0x184D2204);
  expected[4] = std::byte{kLz4Flg};
  expected[5] = std::byte{kLz4Bd};
  StoreLe64(expected + 6, out.size());
  if (in.size() < kLz4FixedHeaderBytes + 1 ||
      std::memcmp(in.data(), expected, kLz4FixedHeaderBytes) != 0) {
    return Status::Corruption("lz4 frame header is not the expected one");
  }
  size_t in_pos = 0;
  size_t out_pos = 0;
  size_t hint = 1;
  while (in_pos < in.size()) {
    size_t dst = out.size() - out_pos;
    size_t src = in.size() - in_pos;
    hint = LZ4F_decompress(dctx_, out.data() + out_pos, &dst, in.data() + in_pos, &src, nullptr);
    if (LZ4F_isError(hint)) {
      LZ4F_resetDecompressionContext(dctx_);
      return Status::Corruption(std::string("lz4: ") + LZ4F_getErrorName(hint));
    }
    in_pos += src;
    out_pos += dst;
    if (hint == 0) break;             // the frame is complete
    if (src == 0 && dst == 0) break;  // no progress: the output is full
  }
  if (hint != 0 || in_pos != in.size() || out_pos != out.size()) {
    LZ4F_resetDecompressionContext(dctx_);
    return Status::Corruption("lz4 frame does not decode to exactly " + std::to_string(out.size()) +
                              " bytes");
  }
  return Status::Ok();
}

}  // namespace ploop::stream
