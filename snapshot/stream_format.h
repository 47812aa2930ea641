// The send/receive stream's byte format (snapshot/STREAM.md) as plain
// encode/decode functions, plus the digests (SHA-256 through OpenSSL EVP
// for the stream's integrity, XXH3-128 per cluster for content digests)
// and the lz4 frame codec the sender and receiver share. Internal to
// snapshot/.
//
// Every decoder validates what it decodes against the limits in STREAM.md
// and returns Corruption with a one-line reason; none allocates more than
// the bounded sizes it checked first.
//
// Thread-safety: pure functions and values; a Sha256, Lz4Compressor or
// Lz4Decompressor object is used by one thread at a time.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ploop/io/io_memory.h"
#include "ploop/status.h"

struct evp_md_ctx_st;
struct LZ4F_cctx_s;
struct LZ4F_dctx_s;

namespace ploop::stream {

inline constexpr size_t kDigestBytes = 32;
using Digest = std::array<std::byte, kDigestBytes>;
// A cluster's XXH3-128, in xxHash's canonical (big-endian) byte order.
inline constexpr size_t kClusterDigestBytes = 16;
using ClusterDigest = std::array<std::byte, kClusterDigestBytes>;

// --- Limits (STREAM.md, "Limits") ---------------------------------------------

inline constexpr uint32_t kVersion = 2;
inline constexpr uint32_t kMaxLayers = 256;
// Cluster data a chunk carries: at most this much, or one index group
// (all layers' records of one cluster index) when that alone is bigger.
inline constexpr uint64_t kChunkDataBytes = 4ull << 20;
// layer_count * cluster_bytes, the largest index group, is at most this.
inline constexpr uint64_t kMaxIndexGroupBytes = 256ull << 20;
inline constexpr uint32_t kMaxChunkRecords = 16384;

// --- Sizes of the encoded parts ------------------------------------------------

inline constexpr size_t kHeaderFixedBytes = 128;
inline constexpr size_t kLayerEntryBytes = 96;
inline constexpr size_t kGuidTextBytes = 38;
inline constexpr size_t kChunkHeaderBytes = 80;
// The part of a chunk header its digest covers (everything before it).
inline constexpr size_t kChunkHeaderDigestedBytes = 48;
inline constexpr size_t kRecordBytes = 12;
inline constexpr size_t kEndFixedBytes = 32;
inline constexpr size_t kResumeRecordBytes = 56;
// Every record after the header starts with one of these four bytes.
inline constexpr size_t kTagBytes = 4;

inline constexpr char kStreamMagic[] = "PLOOPSTR";  // 8 bytes, no NUL
inline constexpr char kChunkTag[] = "PLCK";
inline constexpr char kEndTag[] = "PLND";
inline constexpr char kResumeTag[] = "PLRS";

inline constexpr uint32_t kFlagIncremental = 0x1;
inline constexpr uint32_t kFlagLayered = 0x2;
inline constexpr uint32_t kChunkLz4 = 0x1;

enum class RecordKind : uint8_t { kData = 1, kZero = 2 };

// --- Header --------------------------------------------------------------------

struct LayerEntry {
  std::string guid;         // normalised (ParseGuid) text
  std::string parent_guid;  // the layer below, the base, or kNullGuid
  uint64_t size_bytes = 0;
};

struct StreamHeader {
  bool incremental = false;
  bool layered = false;
  uint32_t cluster_bytes = 0;
  uint64_t disk_size_bytes = 0;
  uint32_t heads = 0;
  uint32_t cylinders = 0;
  // Disk bytes the chunks will cover (sum of progress); for progress bars.
  uint64_t total_bytes = 0;
  std::string base_guid;  // kNullGuid for a full stream
  Digest base_digest{};   // zeros for a full stream
  std::vector<LayerEntry> layers;

  // Set by Encode/DecodeStreamHeader: SHA-256 of the bytes before it.
  Digest digest{};

  uint64_t layer_clusters(size_t layer) const { return layers[layer].size_bytes / cluster_bytes; }
  uint64_t disk_clusters() const { return disk_size_bytes / cluster_bytes; }
  // The most cluster data one chunk may carry.
  uint64_t max_chunk_data_bytes() const;
};

// Encodes `header` (whose fields must be valid) and sets header.digest.
std::vector<std::byte> EncodeStreamHeader(StreamHeader& header);
// The total size of a header whose first kHeaderFixedBytes are `prefix`,
// after checking magic, version and the layer count. Corruption or
// NotSupported (another version).
Result<size_t> StreamHeaderBytes(std::span<const std::byte> prefix);
// Decodes and validates a whole header (StreamHeaderBytes() long).
Result<StreamHeader> DecodeStreamHeader(std::span<const std::byte> bytes);

// --- Chunks --------------------------------------------------------------------

struct ChunkHeader {
  uint32_t flags = 0;
  uint64_t seq = 0;
  uint32_t record_count = 0;
  uint32_t data_count = 0;
  uint64_t payload_bytes = 0;
  // Disk bytes covered by the stream up to the end of this chunk.
  uint64_t progress_bytes = 0;
  Digest digest{};
};

struct Record {
  uint64_t index = 0;
  uint16_t layer = 0;
  RecordKind kind = RecordKind::kData;
};

void EncodeChunkHeader(const ChunkHeader& chunk, std::span<std::byte, kChunkHeaderBytes> out);
// Decodes a chunk header (including its tag) and checks it against the
// stream's limits: counts, payload size against the data it declares.
Result<ChunkHeader> DecodeChunkHeader(std::span<const std::byte, kChunkHeaderBytes> in,
                                      const StreamHeader& header);
void EncodeRecords(std::span<const Record> records, std::vector<std::byte>& out);
// Decodes a record table and checks each record: kind, layer, index within
// the layer, strictly increasing (index, layer), the first index after
// `min_index`, `data_count` data records.
Result<std::vector<Record>> DecodeRecords(std::span<const std::byte> in, const StreamHeader& header,
                                          uint64_t min_index, uint32_t data_count);

// A chunk's bytes as they travel, all but its digest field: header bytes
// [0, 48), the record table, the payload (compressed or not), given whole
// or, for a stored payload taken from several places of the source files,
// as pieces in order.
struct ChunkBody {
  std::span<const std::byte> header_prefix;
  std::span<const std::byte> records;
  std::span<const std::byte> payload;  // when `payload_pieces` is empty
  std::span<const std::span<const std::byte>> payload_pieces;
  // How many bytes that is.
  uint64_t bytes() const;
};
// SHA-256 of a chunk's body: the expensive half of a chunk digest; it does
// not depend on the chain, so the sender's and the receiver's workers
// compute it in parallel.
Digest ChunkBodyDigest(const ChunkBody& body);
// The body digests of two chunks, hashed together where the CPU and the
// library allow it (sha256_lanes.h): in about 0.65 of the time of two
// ChunkBodyDigest calls.
std::array<Digest, 2> ChunkBodyDigests(const ChunkBody& a, const ChunkBody& b);
// d = SHA-256(chain || body): the chunk's digest, which is also the chain
// value for the next chunk.
Digest ChainDigest(const Digest& chain, const Digest& body);

// --- End record, resume record -------------------------------------------------

struct EndRecord {
  uint64_t chunk_count = 0;
  uint64_t record_count = 0;
  uint64_t data_count = 0;
  std::vector<Digest> layer_digests;  // one per layer: its content digest
  Digest final_digest{};
};

size_t EndRecordBytes(const StreamHeader& header);
// Encodes the end record; sets end.final_digest from `chain`.
std::vector<std::byte> EncodeEndRecord(EndRecord& end, const Digest& chain);
// Decodes an end record (including its tag) and checks its final digest
// against `chain`.
Result<EndRecord> DecodeEndRecord(std::span<const std::byte> in, const StreamHeader& header,
                                  const Digest& chain);

struct ResumeRecord {
  uint64_t next_seq = 0;
  uint64_t next_index = 0;
  Digest chain{};
};
void EncodeResumeRecord(const ResumeRecord& r, std::span<std::byte, kResumeRecordBytes> out);
Result<ResumeRecord> DecodeResumeRecord(std::span<const std::byte, kResumeRecordBytes> in);

// --- Resume token ---------------------------------------------------------------

// Where an interrupted receive stopped: everything the sender needs to go
// on with the same stream.
struct ResumeToken {
  Digest header_digest{};
  uint64_t next_seq = 0;
  uint64_t next_index = 0;
  uint64_t progress_bytes = 0;
  uint64_t record_count = 0;
  uint64_t data_count = 0;
  Digest chain{};
  // Per layer: the content digest chain's state (full streams).
  std::vector<Digest> views;
};

// "ploop1-" and base64url (no padding) of the binary token with an 8-byte
// checksum.
std::string EncodeToken(const ResumeToken& token);
// InvalidArgument for anything that is not a well-formed token.
Result<ResumeToken> DecodeToken(std::string_view text);

// --- Digests --------------------------------------------------------------------

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(std::span<const std::byte> data);
  // The digest of everything since construction or the last Final().
  Digest Final();
  static Digest Of(std::span<const std::byte> data);

 private:
  evp_md_ctx_st* ctx_;
};

// XXH3-128 of a cluster's bytes (STREAM.md, "Cluster digest").
ClusterDigest ClusterDigestOf(std::span<const std::byte> data);

// The content digest of a disk view (STREAM.md, "Content digest"): a
// SHA-256 hash chain over the non-zero clusters' XXH3-128 digests in index
// order.
class ViewChain {
 public:
  void Init(uint64_t size_bytes, uint64_t cluster_bytes);
  // Cluster `index` is not all zeros and has digest `cluster_digest`.
  void Add(uint64_t index, const ClusterDigest& cluster_digest);
  const Digest& state() const { return state_; }
  void set_state(const Digest& state) { state_ = state; }

 private:
  Digest state_{};
};

// "view-xxh3-v2:<hex>" (the descriptor's <ContentDigest>, kContentDigestPrefix)
// and back. A record with another tag (an older ploop's "view-sha256-v1:")
// does not parse: it is treated as absent.
std::string ContentDigestText(const Digest& digest);
bool ParseContentDigest(std::string_view text, Digest* out);
std::string Hex(std::span<const std::byte> bytes);

// --- lz4 frames -----------------------------------------------------------------

// One lz4 frame per chunk: 4 MiB independent blocks, the content size in
// the frame header, no checksums (the chunk's SHA-256 covers the frame's
// bytes and is checked before decoding), no dictionary.
class Lz4Compressor {
 public:
  static Result<std::unique_ptr<Lz4Compressor>> Create();
  ~Lz4Compressor();
  // Worst-case frame size for `raw_bytes` of input.
  static size_t Bound(size_t raw_bytes);
  // Compresses `in` into `out` (Bound(in.size()) long); returns the frame's
  // size.
  Result<size_t> Compress(std::span<const std::byte> in, std::span<std::byte> out);
  // What lz4 makes of `pieces` (each `piece_bytes` long, the clusters; the
  // first byte of each, not necessarily adjacent), judged from a 4 KiB
  // sample of each of up to 64 of them: a few percent of the work of
  // compressing it all. The time is the samples' (steady clock), an
  // estimate of lz4's cost per byte here; it reads high by a third on
  // real file system data, where 4 KiB gives lz4 less to find.
  struct Sample {
    size_t raw = 0;     // bytes sampled
    size_t packed = 0;  // what they compressed to
    uint64_t ns = 0;    // how long that took
  };
  Sample SampleCompression(std::span<const std::byte* const> pieces, size_t piece_bytes);
  // Whether the samples shrank by 5% together. Random data (most of a disk
  // that holds compressed files) is then sent as it is without paying for
  // a full attempt. True when nothing was sampled (pieces under 4 KiB).
  static bool Shrinks(const Sample& s) { return s.raw == 0 || s.packed * 20 < s.raw * 19; }

 private:
  explicit Lz4Compressor(LZ4F_cctx_s* cctx) : cctx_(cctx) {}
  LZ4F_cctx_s* cctx_;
  std::vector<char> scratch_;
};

class Lz4Decompressor {
 public:
  static Result<std::unique_ptr<Lz4Decompressor>> Create();
  ~Lz4Decompressor();
  // Decodes the frame `in` into exactly out.size() bytes. Corruption unless
  // the frame header is exactly the one Lz4Compressor writes for that size,
  // the frame ends exactly at the end of `in` and yields exactly out.size()
  // bytes. Never writes past `out`, whatever `in` holds.
  Status Decompress(std::span<const std::byte> in, std::span<std::byte> out);

 private:
  explicit Lz4Decompressor(LZ4F_dctx_s* dctx) : dctx_(dctx) {}
  LZ4F_dctx_s* dctx_;
};

// --- Buffers ----------------------------------------------------------------------

// Buffers for cluster data: page-aligned (the kernel's copies into and out
// of a buffer that is not cache-line aligned measured up to 1.7x slower, see
// tools/bench/README.md, import), and from 2 MiB up in huge pages, so that a
// direct write of a chunk is a few contiguous pieces (ploop/io/io_memory.h).
using AlignedBuffer = IoMemory;
// Zeroed. Throws std::bad_alloc when the memory cannot be mapped, as new
// does.
AlignedBuffer NewAlignedBuffer(size_t size_bytes);

// A free list of equal-sized aligned buffers, so that a stream does not map
// and fault in fresh memory for every chunk. Thread-safe.
class BufferPool {
 public:
  explicit BufferPool(size_t buffer_bytes) : buffer_bytes_(buffer_bytes) {}
  size_t buffer_bytes() const { return buffer_bytes_; }
  AlignedBuffer Get();
  void Put(AlignedBuffer buffer);

 private:
  const size_t buffer_bytes_;
  std::mutex mu_;
  std::vector<AlignedBuffer> free_;
};

// --- Little-endian helpers over byte vectors -----------------------------------

void PutLe32(std::vector<std::byte>& out, uint32_t v);
void PutLe64(std::vector<std::byte>& out, uint64_t v);
void PutBytes(std::vector<std::byte>& out, std::span<const std::byte> bytes);

}  // namespace ploop::stream
