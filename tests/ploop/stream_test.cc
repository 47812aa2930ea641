// Send/receive streams (snapshot/stream.h) on the in-memory file system:
//   - round trips: full (flattened and layered) and incremental streams read
//     back exactly as the source snapshots; a three-snapshot incremental
//     chain received onto a second folder; the receiver's descriptor keeps
//     the GUIDs and records content digests; what an incremental stream
//     carries is exactly the clusters whose content changed;
//   - resume: streams cut at seeded random points (several cuts per round)
//     and continued from the receiver's token end byte-identical to an
//     uninterrupted receive;
//   - hostility: every single-bit flip at sampled positions and every
//     truncation point is rejected, and no disk appears; hostile headers
//     and chunks (huge sizes and counts, bad or path-like GUIDs, wrong base
//     GUID or digest) are rejected without large allocations and without
//     writing anything;
//   - crashes of the receiver (fault file system, cut after every k-th
//     write, unsynced data dropped) never leave a disk that looks complete
//     but is not, and the receive then finishes with --resume.
#include "snapshot/stream.h"

#include <lz4frame.h>
#include <openssl/evp.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <set>

#include "ploop/delta.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "snapshot/snapshot.h"
#include "snapshot/stream_format.h"
#include "snapshot_support.h"
#include "test_support.h"

// --- Allocation tracking -------------------------------------------------------
//
// GCC sees the replaced operator delete call free() on memory from a
// "new" expression and warns; that is exactly the replacement's contract.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
//
// The largest single allocation while g_track is set, to assert that a
// hostile stream is refused before its sizes are believed. Replacing the
// global allocation functions affects the whole test binary, but only adds
// one relaxed atomic load when nothing is tracked.
namespace {
std::atomic<bool> g_track{false};
std::atomic<size_t> g_largest{0};

void Note(size_t n) {
  if (!g_track.load(std::memory_order_relaxed)) return;
  size_t seen = g_largest.load(std::memory_order_relaxed);
  while (n > seen && !g_largest.compare_exchange_weak(seen, n)) {
  }
}
}  // namespace

void* operator new(std::size_t n) {
  Note(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t align) {
  Note(n);
  const size_t a = static_cast<size_t>(align);
  if (void* p = std::aligned_alloc(a, (std::max<size_t>(n, 1) + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace ploop {
namespace {

using namespace snaptest;
using testing::Pattern;
using testing::TestRng;

constexpr uint64_t kCb = 32 * kKiB;

const std::string kS1 = "{11111111-1111-4111-8111-111111111111}";
const std::string kS2 = "{22222222-2222-4222-8222-222222222222}";
const std::string kS3 = "{33333333-3333-4333-8333-333333333333}";
const std::string kSrc = "src/DiskDescriptor.xml";
const std::string kDst = "dst";
const std::string kDstDd = "dst/DiskDescriptor.xml";

// Reads `data`, ending (as a closed pipe does) after `limit` bytes.
class MemReader final : public StreamReader {
 public:
  explicit MemReader(std::span<const std::byte> data, size_t limit = SIZE_MAX)
      : data_(data.first(std::min(limit, data.size()))) {}
  Result<size_t> Read(std::span<std::byte> out) override {
    // Short reads, as from a pipe.
    size_t n = std::min({out.size(), data_.size() - pos_, size_t{100000}});
    std::memcpy(out.data(), data_.data() + pos_, n);
    pos_ += n;
    return n;
  }

 private:
  std::span<const std::byte> data_;
  size_t pos_ = 0;
};

Result<Bytes> SendBytes(FileSystem& fs, const SendOptions& options, const std::string& dd = kSrc,
                        SendSummary* summary = nullptr) {
  MemWriter out;
  ASSIGN_OR_RETURN(SendSummary s, SendStream(fs, dd, out, options));
  if (summary != nullptr) *summary = s;
  return out.bytes;
}

Bytes Send(FileSystem& fs, const SendOptions& options, const std::string& dd = kSrc,
           SendSummary* summary = nullptr) {
  REQUIRE_ASSIGN(Bytes bytes, SendBytes(fs, options, dd, summary));
  return bytes;
}

SendOptions Full(const std::string& guid = "", StreamLayout layout = StreamLayout::kFlatten) {
  SendOptions o;
  o.guid = guid;
  o.layout = layout;
  return o;
}

SendOptions Incremental(const std::string& from, const std::string& guid,
                        StreamLayout layout = StreamLayout::kFlatten) {
  SendOptions o = Full(guid, layout);
  o.from_guid = from;
  return o;
}

Result<ReceiveSummary> Receive(FileSystem& fs, std::span<const std::byte> stream,
                               bool resume = false, size_t limit = SIZE_MAX,
                               const std::string& dir = kDst) {
  MemReader in(stream, limit);
  ReceiveOptions o;
  o.resume = resume;
  o.checkpoint_bytes = 1;  // checkpoint after every chunk: resumes start mid-stream
  return ReceiveStream(fs, dir, in, o);
}

// The source disk: 48 clusters, three snapshots and a top, with data in
// every layer, clusters rewritten with identical data, zeros written over
// older data and discards.
//
//   S1   clusters 0-19 random, 30-31 pattern 0x11
//   S2   0-3 new, 5 same data again, 10-11 zeroed, 40 new
//   S3   12 new, 30 discarded (zeros over S1's data)
//   top  1 new, 47 new
void MakeSource(MemoryFileSystem& fs, TestRng& rng) {
  CreateOptions o;
  o.size_bytes = 48 * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(fs, "src/root.hds", o));
  auto write = [&](uint64_t cluster, const Bytes& data) {
    auto chain = OpenTop(fs, kSrc);
    REQUIRE_OK(chain->Write(cluster * kCb, data));
    REQUIRE_OK(chain->Close());
  };
  Bytes s1 = rng.Bytes(20 * kCb);
  write(0, s1);
  write(30, Pattern(2 * kCb, 0x11));
  REQUIRE_OK(CreateSnapshot(fs, kSrc, kS1).status());
  write(0, rng.Bytes(4 * kCb));
  write(5, Bytes(s1.begin() + 5 * kCb, s1.begin() + 6 * kCb));
  write(10, Bytes(2 * kCb));
  write(40, rng.Bytes(kCb));
  REQUIRE_OK(CreateSnapshot(fs, kSrc, kS2).status());
  write(12, rng.Bytes(kCb));
  {
    auto chain = OpenTop(fs, kSrc);
    REQUIRE_OK(chain->Discard(30 * kCb, kCb));
    REQUIRE_OK(chain->Close());
  }
  REQUIRE_OK(CreateSnapshot(fs, kSrc, kS3).status());
  write(1, rng.Bytes(kCb));
  write(47, rng.Bytes(kCb));
}

// Snapshot `guid` (empty: the top) of the two disks reads the same.
void RequireSameSnapshot(FileSystem& a, const std::string& a_dd, FileSystem& b,
                         const std::string& b_dd, const std::string& guid) {
  INFO("snapshot " << (guid.empty() ? "top" : guid));
  Bytes x = ReadSnapshot(a, guid, a_dd);
  Bytes y = ReadSnapshot(b, guid, b_dd);
  REQUIRE(x.size() == y.size());
  CHECK(x == y);
}

std::string ParentOf(FileSystem& fs, const std::string& dd, const std::string& guid) {
  Descriptor d = LoadDd(fs, dd);
  REQUIRE(d.FindShot(guid) != nullptr);
  return d.FindShot(guid)->parent_guid;
}

// Per GUID, the bytes of its delta file (file names are random).
std::map<std::string, Bytes> DeltaBytes(MemoryFileSystem& fs, const std::string& dd_path) {
  Descriptor dd = LoadDd(fs, dd_path);
  std::map<std::string, Bytes> out;
  for (const auto& image : dd.images()) out[image.guid] = fs.Contents(image.path);
  return out;
}

bool Exists(FileSystem& fs, const std::string& path) {
  auto e = fs.Exists(path);
  REQUIRE_OK(e);
  return *e;
}

TEST_SUITE_BEGIN("unit");

// --- Round trips -----------------------------------------------------------------

TEST_CASE("stream: a full flattened stream of a snapshot reads back identical") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  SendSummary summary;
  Bytes stream = Send(src, Full(kS2), kSrc, &summary);
  REQUIRE_ASSIGN(ReceiveSummary got, Receive(dst, stream));
  CHECK(!got.incremental);
  CHECK(got.guids == std::vector<std::string>{kS2});
  RequireSameSnapshot(src, kSrc, dst, kDstDd, kS2);
  // The new disk: the snapshot (one delta), an empty top over it, the
  // snapshot's content digest recorded.
  Descriptor dd = LoadDd(dst, kDstDd);
  CHECK(dd.images().size() == 2);
  CHECK(dd.top_guid() == kTopGuid);
  CHECK(ParentOf(dst, kDstDd, kTop) == kS2);
  CHECK(ParentOf(dst, kDstDd, kS2) == kNull);
  CHECK(IsContentDigest(dd.FindShot(kS2)->content_digest));
  CHECK(dd.FindShot(kTopGuid)->content_digest.empty());
  CHECK(ReadSnapshot(dst, "", kDstDd) == ReadSnapshot(src, kS2, kSrc));
  RequireCleanDisk(dst, kDstDd);
  CHECK(!Exists(dst, "dst/" + std::string(kReceiveStateFileName)));
  // Zero clusters are not sent: S2 reads 21 non-zero clusters (S1's 22,
  // two zeroed, one added).
  CHECK(summary.data_clusters == 21);
  CHECK(summary.zero_clusters == 0);
}

TEST_CASE("stream: a full stream of the top keeps the top GUID and compresses") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  SendSummary summary;
  Bytes stream = Send(src, Full(), kSrc, &summary);
  REQUIRE_ASSIGN(ReceiveSummary got, Receive(dst, stream));
  CHECK(got.guids == std::vector<std::string>{std::string(kTopGuid)});
  Descriptor dd = LoadDd(dst, kDstDd);
  CHECK(dd.images().size() == 1);
  RequireSameSnapshot(src, kSrc, dst, kDstDd, "");
  // S1's two clusters of 0x11 among 20 random ones are worth compressing:
  // the stream is smaller than the data; without compression it is not.
  Bytes s1 = Send(src, Full(kS1), kSrc, &summary);
  CHECK(s1.size() < summary.data_clusters * kCb);
  SendOptions plain = Full(kS1);
  plain.compress = false;
  CHECK(Send(src, plain).size() > summary.data_clusters * kCb);
}

TEST_CASE("stream: compress_if decides per chunk, and every answer is received the same") {
  TestRng rng;
  MemoryFileSystem src;
  CreateOptions o;
  o.size_bytes = 16 * kMiB;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(src, "src/root.hds", o));
  {
    // 12 MiB, three chunks and more: pattern clusters (lz4 shrinks them)
    // with a random one in every eight.
    auto chain = OpenTop(src, kSrc);
    for (uint64_t i = 0; i < 12 * kMiB / kCb; ++i) {
      REQUIRE_OK(chain->Write(i * kCb,
                              i % 8 == 3 ? rng.Bytes(kCb) : Pattern(kCb, static_cast<uint8_t>(i))));
    }
    REQUIRE_OK(chain->Close());
  }
  SendOptions always = Full();
  // One worker: chunks hashed in order, alone or two together (the first
  // two may be prepared before either is hashed), so the SHA-256 speed is
  // known from the third chunk on.
  always.threads = 1;
  std::vector<CompressionEstimate> seen;
  SendOptions never = always;
  never.compress_if = [&](const CompressionEstimate& e) {
    seen.push_back(e);
    return false;
  };
  int n = 0;
  SendOptions alternate = always;
  alternate.compress_if = [&](const CompressionEstimate&) { return n++ % 2 == 0; };
  SendOptions plain = always;
  plain.compress = false;
  SendSummary summary;
  const Bytes a = Send(src, always, kSrc, &summary);
  const Bytes none = Send(src, never);
  const Bytes some = Send(src, alternate);
  // Asked once per chunk, with what the samples showed and what hashing
  // costs; refusing every chunk stores them all.
  CHECK(seen.size() == summary.chunks);
  REQUIRE(seen.size() >= 3);
  for (size_t i = 0; i < seen.size(); ++i) {
    CHECK(seen[i].sampled_bytes > 0);
    CHECK(seen[i].packed_bytes < seen[i].sampled_bytes);
    if (i > 1) CHECK(seen[i].sha_ns_per_byte > 0);
  }
  CHECK(none == Send(src, plain));
  CHECK(a.size() < some.size());
  CHECK(some.size() < none.size());
  for (const Bytes* stream : {&a, &none, &some}) {
    MemoryFileSystem dst;
    REQUIRE_OK(Receive(dst, *stream).status());
    RequireSameSnapshot(src, kSrc, dst, kDstDd, "");
  }
}

TEST_CASE("stream: CompressionPaysOff weighs lz4's time against the hashing it saves") {
  CompressionEstimate e;
  CHECK(CompressionPaysOff(e));  // nothing sampled
  e.sampled_bytes = 16384;
  e.packed_bytes = 8520;         // a file system image of /usr: 52%
  e.sample_ns = 20480;           // 1.25 ns per byte
  CHECK(CompressionPaysOff(e));  // the hashing's cost not known yet
  e.sha_ns_per_byte = 0.48;
  CHECK(!CompressionPaysOff(e));     // saves 0.46 ns of hashing per byte for 1.56
  e.packed_bytes = 4096;             // the benchmark's partly used blocks: 25%
  e.sample_ns = 5243;                // 0.32 ns per byte
  CHECK(CompressionPaysOff(e));      // saves 0.72 for 0.40
  e.packed_bytes = e.sampled_bytes;  // nothing saved
  CHECK(!CompressionPaysOff(e));
}

TEST_CASE("stream: a full layered stream keeps every delta with its GUID and parent") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  Bytes stream = Send(src, Full("", StreamLayout::kLayers));
  REQUIRE_ASSIGN(ReceiveSummary got, Receive(dst, stream));
  CHECK(got.guids == std::vector<std::string>{kS1, kS2, kS3, std::string(kTopGuid)});
  for (const std::string& g : {kS1, kS2, kS3, std::string()}) {
    RequireSameSnapshot(src, kSrc, dst, kDstDd, g);
  }
  CHECK(ParentOf(dst, kDstDd, kS1) == kNull);
  CHECK(ParentOf(dst, kDstDd, kS2) == kS1);
  CHECK(ParentOf(dst, kDstDd, kS3) == kS2);
  CHECK(ParentOf(dst, kDstDd, kTop) == kS3);
  Descriptor dd = LoadDd(dst, kDstDd);
  for (const std::string& g : {kS1, kS2, kS3}) {
    CHECK(IsContentDigest(dd.FindShot(g)->content_digest));
  }
  RequireCleanDisk(dst, kDstDd);
}

TEST_CASE("stream: content digests agree between flattened and layered streams") {
  TestRng rng;
  MemoryFileSystem src, flat, layered;
  MakeSource(src, rng);
  REQUIRE_OK(Receive(flat, Send(src, Full(kS3))).status());
  REQUIRE_OK(Receive(layered, Send(src, Full(kS3, StreamLayout::kLayers))).status());
  std::string a = LoadDd(flat, kDstDd).FindShot(kS3)->content_digest;
  std::string b = LoadDd(layered, kDstDd).FindShot(kS3)->content_digest;
  CHECK(!a.empty());
  CHECK(a == b);
  // And a snapshot made later over the received disk gets none (its top
  // had none, and RenameGuid clears it).
  REQUIRE_ASSIGN(std::string snap, CreateSnapshot(flat, kDstDd, ""));
  CHECK(LoadDd(flat, kDstDd).FindShot(snap)->content_digest.empty());
  CHECK(LoadDd(flat, kDstDd).FindShot(kS3)->content_digest == a);
}

TEST_CASE("stream: an incremental stream carries exactly the changed clusters") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  REQUIRE_OK(Receive(dst, Send(src, Full(kS1))).status());
  SendSummary summary;
  Bytes stream = Send(src, Incremental(kS1, kS2), kSrc, &summary);
  // S2 changed clusters 0-3 and 40 (data) and 10-11 (zeros over data);
  // cluster 5 was rewritten with the same bytes: held, but not changed.
  CHECK(summary.data_clusters == 5);
  CHECK(summary.zero_clusters == 2);
  CHECK(stream.size() < 6 * kCb);
  REQUIRE_ASSIGN(ReceiveSummary got, Receive(dst, stream));
  CHECK(got.incremental);
  RequireSameSnapshot(src, kSrc, dst, kDstDd, kS1);
  RequireSameSnapshot(src, kSrc, dst, kDstDd, kS2);
  // The top moved onto the new snapshot, empty.
  CHECK(ParentOf(dst, kDstDd, kS2) == kS1);
  CHECK(ParentOf(dst, kDstDd, kTop) == kS2);
  RequireSameSnapshot(dst, kDstDd, dst, kDstDd, "");
  CHECK(ReadSnapshot(dst, "", kDstDd) == ReadSnapshot(src, kS2, kSrc));
  RequireCleanDisk(dst, kDstDd);
  // No stray files: the old top was removed, nothing is left over.
  REQUIRE_ASSIGN(auto names, dst.ListDir(kDst));
  CHECK(names.size() == 1 + LoadDd(dst, kDstDd).images().size());
}

TEST_CASE("stream: a three-snapshot incremental chain received onto a second folder") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  for (StreamLayout layout : {StreamLayout::kFlatten, StreamLayout::kLayers}) {
    INFO("layered " << (layout == StreamLayout::kLayers));
    const std::string dir = layout == StreamLayout::kLayers ? "layered" : "flat";
    const std::string dd = dir + "/DiskDescriptor.xml";
    REQUIRE_OK(Receive(dst, Send(src, Full(kS1, layout)), false, SIZE_MAX, dir).status());
    REQUIRE_OK(
        Receive(dst, Send(src, Incremental(kS1, kS2, layout)), false, SIZE_MAX, dir).status());
    REQUIRE_OK(
        Receive(dst, Send(src, Incremental(kS2, kS3, layout)), false, SIZE_MAX, dir).status());
    for (const std::string& g : {kS1, kS2, kS3}) RequireSameSnapshot(src, kSrc, dst, dd, g);
    CHECK(ParentOf(dst, dd, kS3) == kS2);
    CHECK(ParentOf(dst, dd, kTop) == kS3);
    // An incremental stream of the live top applies too (the top is
    // replaced by the received one).
    REQUIRE_OK(
        Receive(dst, Send(src, Incremental(kS3, "", layout)), false, SIZE_MAX, dir).status());
    RequireSameSnapshot(src, kSrc, dst, dd, "");
    RequireCleanDisk(dst, dd);
  }
  // A skipping increment (S1 -> S3 directly) applies as well.
  MemoryFileSystem other;
  REQUIRE_OK(Receive(other, Send(src, Full(kS1))).status());
  REQUIRE_OK(Receive(other, Send(src, Incremental(kS1, kS3))).status());
  RequireSameSnapshot(src, kSrc, other, kDstDd, kS3);
  CHECK(ParentOf(other, kDstDd, kS3) == kS1);
}

TEST_CASE("stream: the received disk sends on: chained replication uses recorded digests") {
  TestRng rng;
  MemoryFileSystem a, b, c;
  MakeSource(a, rng);
  REQUIRE_OK(Receive(b, Send(a, Full(kS1))).status());
  REQUIRE_OK(Receive(b, Send(a, Incremental(kS1, kS2))).status());
  // b sends to c: the base digest comes from b's descriptor.
  int digest_phases = 0;
  SendOptions o = Full(kS1);
  REQUIRE_OK(Receive(c, Send(b, o, kDstDd)).status());
  o = Incremental(kS1, kS2);
  o.progress = [&](const StreamProgress& p) {
    digest_phases += p.phase == StreamProgress::Phase::kDigest;
  };
  REQUIRE_OK(Receive(c, Send(b, o, kDstDd)).status());
  CHECK(digest_phases == 0);
  RequireSameSnapshot(a, kSrc, c, kDstDd, kS2);
  CHECK(LoadDd(b, kDstDd).FindShot(kS2)->content_digest ==
        LoadDd(c, kDstDd).FindShot(kS2)->content_digest);
}

TEST_CASE("stream: progress reaches the total and stream bytes add up") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  StreamProgress last;
  SendOptions o = Full();
  o.progress = [&](const StreamProgress& p) { last = p; };
  Bytes stream = Send(src, o);
  CHECK(last.done_bytes == last.total_bytes);
  CHECK(last.total_bytes > 0);
  CHECK(last.stream_bytes == stream.size());
  StreamProgress got;
  MemReader in(stream);
  ReceiveOptions ro;
  ro.progress = [&](const StreamProgress& p) { got = p; };
  REQUIRE_OK(ReceiveStream(dst, kDst, in, ro).status());
  CHECK(got.done_bytes == last.total_bytes);
  CHECK(got.stream_bytes == stream.size());
}

// --- Refusals ----------------------------------------------------------------------

TEST_CASE("stream: send refuses bad snapshots and bases and tokens") {
  TestRng rng;
  MemoryFileSystem src;
  MakeSource(src, rng);
  CHECK(SendBytes(src, Full("{44444444-4444-4444-8444-444444444444}")).error().code() ==
        StatusCode::kNotFound);
  CHECK(SendBytes(src, Full("not-a-guid")).error().code() == StatusCode::kInvalidArgument);
  CHECK(SendBytes(src, Incremental(kS2, kS2)).error().code() == StatusCode::kInvalidArgument);
  CHECK(SendBytes(src, Incremental(kS3, kS2)).error().code() == StatusCode::kInvalidArgument);
  CHECK(SendBytes(src, Incremental(std::string(kTopGuid), kS2)).error().code() ==
        StatusCode::kInvalidArgument);
  // A token of another stream.
  MemoryFileSystem dst;
  Bytes stream = Send(src, Full(kS1));
  CHECK(!Receive(dst, stream, false, stream.size() / 2).ok());
  REQUIRE_ASSIGN(std::string token, ReceiveResumeToken(dst, kDst));
  SendOptions o = Full(kS2);
  o.resume_token = token;
  CHECK(SendBytes(src, o).error().code() == StatusCode::kFailedPrecondition);
  o.resume_token = token.substr(0, token.size() - 3);
  CHECK(SendBytes(src, o).error().code() == StatusCode::kInvalidArgument);
  o.resume_token = "../../etc/passwd";
  CHECK(SendBytes(src, o).error().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("stream: receive refuses a full stream over a disk and an incremental without base") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  Bytes full = Send(src, Full(kS1));
  REQUIRE_OK(Receive(dst, full).status());
  auto before = Files(dst, kDst);
  CHECK(Receive(dst, full).error().code() == StatusCode::kAlreadyExists);
  CHECK(Files(dst, kDst) == before);
  // Missing base: a folder with another disk, and an empty folder.
  Bytes inc = Send(src, Incremental(kS2, kS3));
  CHECK(Receive(dst, inc).error().code() == StatusCode::kNotFound);
  CHECK(Files(dst, kDst) == before);
  CHECK(Receive(dst, inc, false, SIZE_MAX, "empty").error().code() == StatusCode::kNotFound);
  // The same snapshot twice.
  REQUIRE_OK(Receive(dst, Send(src, Incremental(kS1, kS2))).status());
  before = Files(dst, kDst);
  CHECK(Receive(dst, Send(src, Incremental(kS1, kS2))).error().code() ==
        StatusCode::kAlreadyExists);
  CHECK(Files(dst, kDst) == before);
}

TEST_CASE("stream: a base with another content is refused before anything is written") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  // dst has a snapshot with S1's GUID but not S1's data.
  CreateOptions o;
  o.size_bytes = 48 * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(dst, "dst/root.hds", o));
  {
    auto chain = OpenTop(dst, kDstDd);
    REQUIRE_OK(chain->Write(0, rng.Bytes(kCb)));
    REQUIRE_OK(chain->Close());
  }
  REQUIRE_OK(CreateSnapshot(dst, kDstDd, kS1).status());
  auto before = Files(dst, kDst);
  Bytes inc = Send(src, Incremental(kS1, kS2));
  auto r = Receive(dst, inc);
  CHECK(r.error().code() == StatusCode::kFailedPrecondition);
  CHECK(r.error().message().find("differs from the sender") != std::string::npos);
  CHECK(Files(dst, kDst) == before);

  // A recorded digest is trusted (O(1)); without one the base is digested.
  MemoryFileSystem good;
  REQUIRE_OK(Receive(good, Send(src, Full(kS1))).status());
  {
    Descriptor dd = LoadDd(good, kDstDd);
    REQUIRE_OK(dd.SetContentDigest(kS1, ""));
    REQUIRE_OK(dd.Save(good));
  }
  int verify_phases = 0;
  MemReader in(inc);
  ReceiveOptions ro;
  ro.progress = [&](const StreamProgress& p) {
    verify_phases += p.phase == StreamProgress::Phase::kVerifyBase;
  };
  REQUIRE_OK(ReceiveStream(good, kDst, in, ro).status());
  CHECK(verify_phases > 0);
  RequireSameSnapshot(src, kSrc, good, kDstDd, kS2);

  // A wrong recorded digest (hand-edited) is believed, and so refuses.
  MemoryFileSystem forged;
  REQUIRE_OK(Receive(forged, Send(src, Full(kS1))).status());
  {
    Descriptor dd = LoadDd(forged, kDstDd);
    REQUIRE_OK(dd.SetContentDigest(kS1, std::string(kContentDigestPrefix) + std::string(64, '0')));
    REQUIRE_OK(dd.Save(forged));
  }
  CHECK(Receive(forged, inc).error().code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("stream: an incremental receive refuses a top that holds data") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  REQUIRE_OK(Receive(dst, Send(src, Full(kS1))).status());
  {
    auto chain = OpenTop(dst, kDstDd);
    REQUIRE_OK(chain->Write(0, Pattern(kCb, 0x77)));
    REQUIRE_OK(chain->Close());
  }
  auto before = Files(dst, kDst);
  auto r = Receive(dst, Send(src, Incremental(kS1, kS2)));
  CHECK(r.error().code() == StatusCode::kFailedPrecondition);
  CHECK(Files(dst, kDst) == before);
  // After a snapshot of it (kept as a branch) the stream applies.
  REQUIRE_ASSIGN(std::string branch, CreateSnapshot(dst, kDstDd, ""));
  REQUIRE_OK(Receive(dst, Send(src, Incremental(kS1, kS2))).status());
  RequireSameSnapshot(src, kSrc, dst, kDstDd, kS2);
  CHECK(ReadSnapshot(dst, branch, kDstDd)[0] == std::byte{0x77});
}

TEST_CASE("stream: continuation streams and plain streams are not mixed up") {
  TestRng rng;
  MemoryFileSystem src, dst;
  MakeSource(src, rng);
  Bytes stream = Send(src, Full(kS1));
  CHECK(!Receive(dst, stream, false, stream.size() / 2).ok());
  REQUIRE_ASSIGN(bool partial, HasInterruptedReceive(dst, kDst));
  CHECK(partial);
  // A second plain receive into the folder: refused, state kept.
  CHECK(Receive(dst, stream).error().code() == StatusCode::kFailedPrecondition);
  // --resume with a stream from the start: refused.
  CHECK(Receive(dst, stream, true).error().code() == StatusCode::kFailedPrecondition);
  REQUIRE_ASSIGN(std::string token, ReceiveResumeToken(dst, kDst));
  SendOptions o = Full(kS1);
  o.resume_token = token;
  Bytes rest = Send(src, o);
  // The continuation without --resume, or into another folder: refused.
  CHECK(Receive(dst, rest, false, SIZE_MAX, "other").error().code() ==
        StatusCode::kInvalidArgument);
  REQUIRE_OK(Receive(dst, rest, true).status());
  RequireSameSnapshot(src, kSrc, dst, kDstDd, kS1);
  CHECK(Receive(dst, rest, true).error().code() == StatusCode::kNotFound);
  // --abort discards a partial receive and nothing else.
  MemoryFileSystem other;
  CHECK(!Receive(other, stream, false, stream.size() / 3).ok());
  REQUIRE_OK(AbortReceive(other, kDst));
  REQUIRE_ASSIGN(auto left, other.ListDir(kDst));
  CHECK(left.empty());
  CHECK(AbortReceive(other, kDst).code() == StatusCode::kNotFound);
}

// --- Resume --------------------------------------------------------------------------

// A source big enough for several chunks (4 MiB of data each).
void MakeBigSource(MemoryFileSystem& fs, TestRng& rng) {
  CreateOptions o;
  o.size_bytes = 640 * kCb;  // 20 MiB
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(fs, "src/root.hds", o));
  auto chain = OpenTop(fs, kSrc);
  REQUIRE_OK(chain->Write(0, rng.Bytes(200 * kCb)));
  REQUIRE_OK(chain->Write(300 * kCb, Pattern(100 * kCb, 0x5a)));  // compressible
  REQUIRE_OK(chain->Write(500 * kCb, rng.Bytes(120 * kCb)));
  REQUIRE_OK(chain->Close());
  REQUIRE_OK(CreateSnapshot(fs, kSrc, kS1).status());
  chain = OpenTop(fs, kSrc);
  REQUIRE_OK(chain->Write(100 * kCb, rng.Bytes(150 * kCb)));
  REQUIRE_OK(chain->Discard(520 * kCb, 10 * kCb));
  REQUIRE_OK(chain->Close());
  REQUIRE_OK(CreateSnapshot(fs, kSrc, kS2).status());
}

// Receives `options`' stream into `dst`, cutting it at `cuts` random points
// (each continuation is cut again), and returns how many resumes it took.
int ReceiveWithCuts(MemoryFileSystem& src, MemoryFileSystem& dst, const SendOptions& options,
                    TestRng& rng, int cuts) {
  Bytes stream = Send(src, options);
  int resumes = 0;
  bool resume = false;
  for (int i = 0; i <= cuts; ++i) {
    const bool last = i == cuts;
    const size_t limit = last ? SIZE_MAX : rng.Uniform(0, stream.size() - 1);
    INFO("cut " << i << " at " << limit << " of " << stream.size());
    auto r = Receive(dst, stream, resume, limit);
    if (last) {
      REQUIRE_OK(r.status());
      return resumes;
    }
    REQUIRE(!r.ok());
    // A cut stream never leaves a complete-looking new disk behind.
    REQUIRE_ASSIGN(bool partial, HasInterruptedReceive(dst, kDst));
    if (!partial) {
      // Cut before the receive began (in the header): start again.
      CHECK(!resume);
      continue;
    }
    REQUIRE_ASSIGN(std::string token, ReceiveResumeToken(dst, kDst));
    SendOptions o = options;
    o.resume_token = token;
    stream = Send(src, o);
    resume = true;
    ++resumes;
  }
  return resumes;
}

TEST_CASE("stream: resume after cuts at random points is byte-identical") {
  TestRng rng;
  MemoryFileSystem src;
  MakeBigSource(src, rng);
  struct Case {
    const char* name;
    SendOptions full;
    SendOptions inc;
  };
  std::vector<Case> cases = {
      {"flatten", Full(kS1), Incremental(kS1, kS2)},
      {"layers", Full(kS1, StreamLayout::kLayers), Incremental(kS1, kS2, StreamLayout::kLayers)},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    MemoryFileSystem reference;
    REQUIRE_OK(Receive(reference, Send(src, c.full)).status());
    REQUIRE_OK(Receive(reference, Send(src, c.inc)).status());
    auto want = DeltaBytes(reference, kDstDd);
    int resumes = 0;
    for (int round = 0; round < 6; ++round) {
      INFO("round " << round);
      MemoryFileSystem dst;
      resumes += ReceiveWithCuts(src, dst, c.full, rng, 1 + round % 3);
      resumes += ReceiveWithCuts(src, dst, c.inc, rng, 1 + round % 2);
      auto got = DeltaBytes(dst, kDstDd);
      // Same deltas, same bytes (the new empty top aside, whose GUID is
      // the same and whose bytes are too).
      REQUIRE(got.size() == want.size());
      for (const auto& [guid, bytes] : want) {
        INFO("delta " << guid);
        CHECK(got[guid] == bytes);
      }
      CHECK(LoadDd(dst, kDstDd).FindShot(kS2)->content_digest ==
            LoadDd(reference, kDstDd).FindShot(kS2)->content_digest);
      RequireCleanDisk(dst, kDstDd);
    }
    CHECK(resumes > 0);
  }
}

// --- Corruption and truncation ---------------------------------------------------------

// A small stream with a compressed and a stored chunk's worth of kinds: a
// pattern cluster (compresses), random clusters, a hole record.
Bytes SmallStream(MemoryFileSystem& src, bool compress, bool incremental) {
  CreateOptions o;
  o.size_bytes = 8 * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(src, "src/root.hds", o));
  TestRng rng;
  auto chain = OpenTop(src, kSrc);
  REQUIRE_OK(chain->Write(0, Pattern(kCb, 0x42)));
  REQUIRE_OK(chain->Write(2 * kCb, rng.Bytes(kCb)));
  REQUIRE_OK(chain->Close());
  REQUIRE_OK(CreateSnapshot(src, kSrc, kS1).status());
  chain = OpenTop(src, kSrc);
  REQUIRE_OK(chain->Write(0, Bytes(kCb)));  // a hole over data
  REQUIRE_OK(chain->Write(5 * kCb, rng.Bytes(kCb / 2)));
  REQUIRE_OK(chain->Close());
  REQUIRE_OK(CreateSnapshot(src, kSrc, kS2).status());
  SendOptions so = incremental ? Incremental(kS1, kS2) : Full(kS2, StreamLayout::kLayers);
  so.compress = compress;
  return Send(src, so);
}

// The receive of `stream` (into a fresh copy of `base`, or an empty file
// system) must fail and leave no new complete disk.
void RequireRejected(const MemoryFileSystem* base, const Bytes& stream, const std::string& what) {
  MemoryFileSystem dst;
  std::map<std::string, Bytes> before;
  if (base != nullptr) {
    before = Files(const_cast<MemoryFileSystem&>(*base), kDst);
    PutFiles(dst, before, kDst);
  }
  auto r = Receive(dst, stream);
  if (r.ok()) FAIL_CHECK(what << " was accepted");
  // Either the folder's disk is as it was, or there is none.
  if (base == nullptr) {
    CHECK(!Exists(dst, kDstDd));
  } else {
    auto after = Files(dst, kDst);
    CHECK(after.at(std::string(kDescriptorFileName)) ==
          before.at(std::string(kDescriptorFileName)));
  }
}

// Byte positions to try: all of the first and last 600 bytes (header,
// first chunk header and records, end record) and a sample elsewhere.
std::vector<size_t> Positions(size_t size) {
  std::vector<size_t> out;
  for (size_t p = 0; p < size; ++p) {
    if (p < 600 || p + 600 >= size || p % 61 == 0) out.push_back(p);
  }
  return out;
}

// --- The digests, as STREAM.md defines them -------------------------------------------
//
// Computed here independently of stream_format.cc (OpenSSL and xxHash
// called directly), so the code and the document cannot drift apart.

Bytes RefSha256(std::initializer_list<std::span<const std::byte>> parts) {
  Bytes all;
  for (auto part : parts) all.insert(all.end(), part.begin(), part.end());
  Bytes out(32);
  unsigned int n = 0;
  REQUIRE(EVP_Digest(all.data(), all.size(), reinterpret_cast<unsigned char*>(out.data()), &n,
                     EVP_sha256(), nullptr) == 1);
  return out;
}

Bytes Le64Bytes(uint64_t v) {
  Bytes b(8);
  StoreLe64(b.data(), v);
  return b;
}

// The content digest of a view that reads `data` (whole clusters of kCb).
Bytes RefViewDigest(const Bytes& data) {
  constexpr std::string_view kDomain = "ploop view digest v2";
  Bytes v = RefSha256({std::as_bytes(std::span(kDomain.data(), kDomain.size())),
                       Le64Bytes(data.size()), Le64Bytes(kCb)});
  for (uint64_t i = 0; i < data.size() / kCb; ++i) {
    std::span<const std::byte> cluster(data.data() + i * kCb, kCb);
    if (std::all_of(cluster.begin(), cluster.end(), [](std::byte b) { return b == std::byte{0}; }))
      continue;
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, XXH3_128bits(cluster.data(), cluster.size()));
    v = RefSha256({v, Le64Bytes(i), std::as_bytes(std::span(canonical.digest))});
  }
  return v;
}

struct ChunkAt {
  size_t offset = 0;
  stream::ChunkHeader header;
  size_t bytes() const {
    return stream::kChunkHeaderBytes + header.record_count * stream::kRecordBytes +
           header.payload_bytes;
  }
  size_t payload_offset() const { return offset + bytes() - header.payload_bytes; }
};

// The chunks of `s` (a stream from its start) and where its end record is.
std::vector<ChunkAt> ChunksOf(const Bytes& s, size_t* end_offset = nullptr) {
  REQUIRE_ASSIGN(size_t header_bytes, stream::StreamHeaderBytes(s));
  REQUIRE_ASSIGN(stream::StreamHeader h,
                 stream::DecodeStreamHeader(std::span(s).first(header_bytes)));
  std::vector<ChunkAt> out;
  size_t o = header_bytes;
  while (std::memcmp(s.data() + o, stream::kChunkTag, 4) == 0) {
    REQUIRE_ASSIGN(stream::ChunkHeader ch,
                   stream::DecodeChunkHeader(std::span<const std::byte, stream::kChunkHeaderBytes>(
                                                 s.data() + o, stream::kChunkHeaderBytes),
                                             h));
    out.push_back(ChunkAt{o, ch});
    o += out.back().bytes();
  }
  REQUIRE(std::memcmp(s.data() + o, stream::kEndTag, 4) == 0);
  if (end_offset != nullptr) *end_offset = o;
  return out;
}

TEST_CASE("stream: chunk, stream and content digests are the ones STREAM.md defines") {
  TestRng rng;
  MemoryFileSystem src;
  MakeBigSource(src, rng);
  for (StreamLayout layout : {StreamLayout::kFlatten, StreamLayout::kLayers}) {
    INFO("layered " << (layout == StreamLayout::kLayers));
    const Bytes s = Send(src, Full(kS2, layout));
    REQUIRE_ASSIGN(size_t header_bytes, stream::StreamHeaderBytes(s));
    // c_0: the header's digest.
    Bytes c(s.begin() + header_bytes - 32, s.begin() + header_bytes);
    CHECK(c == RefSha256({std::span(s).first(header_bytes - 32)}));
    size_t end = 0;
    std::vector<ChunkAt> chunks = ChunksOf(s, &end);
    REQUIRE(chunks.size() > 2);
    int compressed = 0;
    for (const ChunkAt& chunk : chunks) {
      INFO("chunk " << chunk.header.seq);
      const std::span<const std::byte> bytes(s.data() + chunk.offset, chunk.bytes());
      // d_k = SHA-256(c_k || SHA-256(bytes [0, 48) || records || payload)).
      Bytes body = RefSha256({bytes.first(48), bytes.subspan(stream::kChunkHeaderBytes)});
      Bytes d = RefSha256({c, body});
      CHECK(d == Bytes(bytes.begin() + 48, bytes.begin() + 80));
      c = d;
      if (chunk.header.flags & stream::kChunkLz4) {
        ++compressed;
        // The frame header: magic, FLG 0x68, BD 0x70, the content size.
        const std::byte* f = s.data() + chunk.payload_offset();
        CHECK(LoadLe32(f) == 0x184D2204u);
        CHECK(f[4] == std::byte{0x68});
        CHECK(f[5] == std::byte{0x70});
        CHECK(LoadLe64(f + 6) == uint64_t{chunk.header.data_count} * kCb);
      }
    }
    CHECK(compressed > 0);
    // The end record: the layers' content digests, then
    // SHA-256(c_n || the record's bytes before the final digest).
    const std::span<const std::byte> end_record = std::span(s).subspan(end);
    REQUIRE(end_record.size() ==
            stream::kEndFixedBytes + 32 * (layout == StreamLayout::kLayers ? 2 : 1) + 32);
    CHECK(RefSha256({c, end_record.first(end_record.size() - 32)}) ==
          Bytes(end_record.end() - 32, end_record.end()));
    // The last layer's content digest is S2's view digest, and the receiver
    // records it (and layer 0's, S1's, when layered).
    const Bytes last(end_record.end() - 64, end_record.end() - 32);
    CHECK(last == RefViewDigest(ReadSnapshot(src, kS2, kSrc)));
    MemoryFileSystem dst;
    REQUIRE_OK(Receive(dst, s).status());
    Descriptor dd = LoadDd(dst, kDstDd);
    CHECK(dd.FindShot(kS2)->content_digest ==
          std::string(kContentDigestPrefix) + stream::Hex(last));
    if (layout == StreamLayout::kLayers) {
      const Bytes first(end_record.begin() + 32, end_record.begin() + 64);
      CHECK(first == RefViewDigest(ReadSnapshot(src, kS1, kSrc)));
      CHECK(dd.FindShot(kS1)->content_digest ==
            std::string(kContentDigestPrefix) + stream::Hex(first));
    }
  }
}

TEST_CASE("stream: a corrupt chunk is refused before it is decompressed or written") {
  TestRng rng;
  MemoryFileSystem src;
  MakeBigSource(src, rng);
  const Bytes s = Send(src, Full(kS1));
  std::vector<ChunkAt> chunks = ChunksOf(s);
  // A compressed chunk after the first.
  size_t k = 1;
  while (k < chunks.size() && !(chunks[k].header.flags & stream::kChunkLz4)) ++k;
  REQUIRE(k < chunks.size());
  const ChunkAt& chunk = chunks[k];
  // What the receiver holds when the stream stops right before chunk k.
  MemoryFileSystem cut;
  REQUIRE(!Receive(cut, s, false, chunk.offset).ok());
  const Bytes before = cut.Contents("dst/root.hds");
  REQUIRE(!before.empty());
  const size_t payload = chunk.payload_offset();
  const std::vector<std::pair<size_t, std::string>> flips = {
      {payload + 4, "the lz4 frame's FLG byte"},
      {payload + 14, "the frame header's checksum byte"},
      {payload + chunk.header.payload_bytes / 2, "a compressed block"},
      {payload + chunk.header.payload_bytes - 1, "the frame's end mark"},
      {chunk.offset + 32, "the chunk's progress field"},
      {chunk.offset + 56, "the chunk's digest"},
  };
  for (const auto& [pos, what] : flips) {
    INFO("a flip in " << what << " (byte " << pos << ")");
    Bytes bad = s;
    bad[pos] ^= std::byte{0x10};
    MemoryFileSystem dst;
    auto r = Receive(dst, bad);
    REQUIRE(!r.ok());
    CHECK(r.error().code() == StatusCode::kCorruption);
    // The digest caught it, not lz4 (which never saw the frame)...
    CHECK(r.error().message() ==
          "chunk " + std::to_string(k) + ": digest mismatch (the stream is corrupt)");
    // ... and nothing of the chunk reached the delta: it holds what a
    // stream ending before the chunk leaves.
    CHECK(dst.Contents("dst/root.hds") == before);
    REQUIRE_ASSIGN(std::string token, ReceiveResumeToken(dst, kDst));
    REQUIRE_ASSIGN(stream::ResumeToken t, stream::DecodeToken(token));
    CHECK(t.next_seq == k);
    // The sender resumes at the chunk, and the disk completes.
    SendOptions o = Full(kS1);
    o.resume_token = token;
    REQUIRE_OK(Receive(dst, Send(src, o), true).status());
    RequireSameSnapshot(src, kSrc, dst, kDstDd, kS1);
  }
}

TEST_CASE("stream: a full stream whose content digests differ from its data is refused") {
  // An end record naming other content digests, properly chained (as a
  // sender that digested other data would make it): the receiver's own
  // digests of what arrived disagree, and no disk appears.
  TestRng rng;
  MemoryFileSystem src;
  MakeSource(src, rng);
  Bytes s = Send(src, Full(kS2));
  size_t end = 0;
  std::vector<ChunkAt> chunks = ChunksOf(s, &end);
  const Bytes chain(s.begin() + chunks.back().offset + 48, s.begin() + chunks.back().offset + 80);
  s[end + stream::kEndFixedBytes + 3] ^= std::byte{1};
  const size_t digested = s.size() - end - 32;
  const Bytes final_digest = RefSha256({chain, std::span(s).subspan(end, digested)});
  std::copy(final_digest.begin(), final_digest.end(), s.end() - 32);
  MemoryFileSystem dst;
  auto r = Receive(dst, s);
  REQUIRE(!r.ok());
  CHECK(r.error().code() == StatusCode::kCorruption);
  CHECK(r.error().message().find("content digest of layer " + kS2 + " differs") !=
        std::string::npos);
  CHECK(!Exists(dst, kDstDd));
}

TEST_CASE("stream: every sampled single-bit flip is rejected") {
  for (bool compress : {true, false}) {
    for (bool incremental : {false, true}) {
      INFO("compress " << compress << ", incremental " << incremental);
      MemoryFileSystem src;
      Bytes stream = SmallStream(src, compress, incremental);
      MemoryFileSystem base;
      if (incremental) REQUIRE_OK(Receive(base, Send(src, Full(kS1))).status());
      // The stream itself is fine.
      {
        MemoryFileSystem dst;
        PutFiles(dst, incremental ? Files(base, kDst) : std::map<std::string, Bytes>{}, kDst);
        REQUIRE_OK(Receive(dst, stream).status());
      }
      for (size_t pos : Positions(stream.size())) {
        Bytes bad = stream;
        bad[pos] ^= std::byte(1u << (pos % 8));
        RequireRejected(incremental ? &base : nullptr, bad,
                        "a flip at byte " + std::to_string(pos));
      }
    }
  }
}

// A tiny stream (about 1 KiB: compressible clusters, a hole record, two
// layers) for exhaustive checks.
Bytes TinyStream(MemoryFileSystem& src) {
  CreateOptions o;
  o.size_bytes = 4 * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(src, "src/root.hds", o));
  auto chain = OpenTop(src, kSrc);
  REQUIRE_OK(chain->Write(0, Pattern(kCb, 0x42)));
  REQUIRE_OK(chain->Write(2 * kCb, Pattern(kCb, 0x43)));
  REQUIRE_OK(chain->Close());
  REQUIRE_OK(CreateSnapshot(src, kSrc, kS1).status());
  chain = OpenTop(src, kSrc);
  REQUIRE_OK(chain->Write(0, Bytes(kCb)));
  REQUIRE_OK(chain->Write(3 * kCb, Pattern(kCb, 0x44)));
  REQUIRE_OK(chain->Close());
  return Send(src, Full("", StreamLayout::kLayers));
}

TEST_CASE("stream: every truncation point of a tiny stream is rejected") {
  MemoryFileSystem src;
  Bytes stream = TinyStream(src);
  REQUIRE(stream.size() < 4096);
  {
    MemoryFileSystem dst;
    REQUIRE_OK(Receive(dst, stream).status());
    RequireSameSnapshot(src, kSrc, dst, kDstDd, "");
  }
  for (size_t len = 0; len < stream.size(); ++len) {
    RequireRejected(nullptr, Bytes(stream.begin(), stream.begin() + len),
                    "a stream cut at " + std::to_string(len));
  }
  // And every bit of every byte, flipped.
  for (size_t pos = 0; pos < stream.size(); ++pos) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes bad = stream;
      bad[pos] ^= std::byte(1u << bit);
      RequireRejected(nullptr, bad,
                      "bit " + std::to_string(bit) + " of byte " + std::to_string(pos));
    }
  }
}

TEST_CASE("stream: every truncation and appended garbage is rejected") {
  MemoryFileSystem src;
  Bytes stream = SmallStream(src, true, false);
  for (size_t len : Positions(stream.size())) {
    RequireRejected(nullptr, Bytes(stream.begin(), stream.begin() + len),
                    "a stream cut at " + std::to_string(len));
  }
  Bytes longer = stream;
  longer.push_back(std::byte{0});
  RequireRejected(nullptr, longer, "a stream with a byte appended");
}

// --- Hostile headers and chunks ------------------------------------------------------

stream::StreamHeader ValidHeader() {
  stream::StreamHeader h;
  h.cluster_bytes = kCb;
  h.disk_size_bytes = 8 * kCb;
  h.heads = 16;
  h.cylinders = 1;
  h.total_bytes = 8 * kCb;
  h.base_guid = std::string(kNullGuid);
  h.layers.push_back(stream::LayerEntry{kS1, std::string(kNullGuid), 8 * kCb});
  return h;
}

// The receive of `bytes` fails with `code` and never allocates more than
// 1 MiB at once. A hostile header is refused before anything is written;
// a hostile chunk (`started`) after the receive began: then no disk
// appears.
void RequireHostileRefused(const Bytes& bytes, StatusCode code, const std::string& what,
                           bool started = false) {
  INFO(what);
  MemoryFileSystem dst;
  g_largest = 0;
  g_track = true;
  auto r = Receive(dst, bytes);
  g_track = false;
  REQUIRE(!r.ok());
  CHECK(r.error().code() == code);
  CHECK(r.error().message().find('\n') == std::string::npos);
  CHECK(g_largest.load() < (1u << 20));
  if (started) {
    CHECK(!Exists(dst, kDstDd));
  } else {
    auto names = dst.ListDir(kDst);
    CHECK((!names.ok() || names->empty()));
  }
}

TEST_CASE("stream: hostile headers are refused before any allocation or write") {
  auto encode = [](stream::StreamHeader h) { return stream::EncodeStreamHeader(h); };
  auto with = [&](auto change) {
    stream::StreamHeader h = ValidHeader();
    change(h);
    return encode(h);
  };
  const StatusCode kCorrupt = StatusCode::kCorruption;
  RequireHostileRefused(Bytes(), kCorrupt, "empty");
  RequireHostileRefused(Pattern(4096, 0), kCorrupt, "zeros");
  // Raw patches of the fixed part (the digest cannot be fixed up by an
  // attacker without also passing the checks below, but the size checks
  // come first).
  {
    Bytes b = encode(ValidHeader());
    StoreLe32(b.data() + 40, 0xffffffff);  // layer count
    RequireHostileRefused(b, kCorrupt, "4 billion layers");
    b = encode(ValidHeader());
    StoreLe32(b.data() + 12, 0x7fffffff);  // header size
    RequireHostileRefused(b, kCorrupt, "a 2 GiB header");
    // Another version: an older ploop's (1: SHA-256 per cluster) or a
    // newer one's.
    for (uint32_t version : {1u, stream::kVersion + 1}) {
      b = encode(ValidHeader());
      StoreLe32(b.data() + 8, version);
      RequireHostileRefused(b, StatusCode::kNotSupported, "version " + std::to_string(version));
    }
    b = encode(ValidHeader());
    b[200] ^= std::byte{1};
    RequireHostileRefused(b, kCorrupt, "a flipped layer byte");
  }
  // Well-digested headers with hostile values.
  RequireHostileRefused(with([](auto& h) { h.cluster_bytes = 3; }), kCorrupt, "3-byte clusters");
  RequireHostileRefused(with([](auto& h) { h.cluster_bytes = 1u << 31; }), kCorrupt,
                        "2 GiB clusters");
  RequireHostileRefused(with([](auto& h) { h.disk_size_bytes = 1ull << 62; }), kCorrupt,
                        "a 4 EiB disk");
  RequireHostileRefused(with([](auto& h) { h.disk_size_bytes = 0; }), kCorrupt, "an empty disk");
  RequireHostileRefused(with([](auto& h) { h.disk_size_bytes = 8 * kCb + 512; }), kCorrupt,
                        "a partial cluster");
  RequireHostileRefused(with([](auto& h) { h.total_bytes = UINT64_MAX; }), kCorrupt,
                        "a huge total");
  RequireHostileRefused(with([](auto& h) { h.layers[0].size_bytes = 1ull << 60; }), kCorrupt,
                        "a huge layer");
  RequireHostileRefused(
      with([](auto& h) { h.layers[0].guid = "../../../../etc/passwd/xxxxxxxxxxxxxx"; }), kCorrupt,
      "a path as a GUID");
  RequireHostileRefused(
      with([](auto& h) { h.layers[0].guid = "{11111111-1111-4111-8111-11111111111/}"; }), kCorrupt,
      "a GUID with a slash");
  RequireHostileRefused(
      with([](auto& h) { h.layers[0].guid = "{AAAAAAAA-1111-4111-8111-111111111111}"; }), kCorrupt,
      "an upper-case GUID");
  RequireHostileRefused(with([](auto& h) { h.layers[0].guid = std::string(kNullGuid); }), kCorrupt,
                        "the null GUID");
  RequireHostileRefused(with([](auto& h) { h.layers[0].parent_guid = kS2; }), kCorrupt,
                        "a parent that is not the base");
  RequireHostileRefused(with([](auto& h) {
                          h.layers.push_back(h.layers[0]);
                          h.layers[1].parent_guid = kS1;
                        }),
                        kCorrupt, "two layers in a flattened stream");
  RequireHostileRefused(
      with([](auto& h) {
        h.layered = true;
        h.layers[0].guid = std::string(kTopGuid);
        h.layers.push_back(stream::LayerEntry{kS2, std::string(kTopGuid), 8 * kCb});
      }),
      kCorrupt, "the top GUID below another layer");
  RequireHostileRefused(with([](auto& h) {
                          h.layered = true;
                          h.layers.push_back(stream::LayerEntry{kS1, kS1, 8 * kCb});
                        }),
                        kCorrupt, "a repeated GUID");
  RequireHostileRefused(
      with([](auto& h) {
        h.layered = true;
        h.cluster_bytes = 64 << 20;
        h.disk_size_bytes = 64ull << 20;
        h.layers[0].size_bytes = 64ull << 20;
        h.total_bytes = 0;
        for (int i = 0; i < 8; ++i) {
          char g[64];
          std::snprintf(g, sizeof(g), "{%08x-1111-4111-8111-111111111111}", i + 5);
          h.layers.push_back(stream::LayerEntry{g, h.layers.back().guid, 64ull << 20});
        }
      }),
      kCorrupt, "layers times clusters over the per-cluster limit");
  RequireHostileRefused(with([](auto& h) {
                          // 256 layers of 2 TiB in 128 KiB clusters: 4 billion BAT entries.
                          h.layered = true;
                          h.cluster_bytes = 128 << 10;
                          h.disk_size_bytes = 2ull << 40;
                          h.total_bytes = 0;
                          h.layers.clear();
                          std::string parent(kNullGuid);
                          for (int i = 0; i < 256; ++i) {
                            char g[64];
                            std::snprintf(g, sizeof(g), "{%08x-2222-4222-8222-222222222222}",
                                          i + 1);
                            h.layers.push_back(stream::LayerEntry{g, parent, 2ull << 40});
                            parent = g;
                          }
                        }),
                        kCorrupt, "BATs of 4 billion entries in all");
  RequireHostileRefused(with([](auto& h) { h.base_guid = kS2; }), kCorrupt,
                        "a full stream naming a base");
  RequireHostileRefused(with([](auto& h) {
                          h.incremental = true;
                          h.layers[0].parent_guid = std::string(kNullGuid);
                        }),
                        kCorrupt, "an incremental stream without a base");
}

TEST_CASE("stream: hostile chunks are refused before their sizes are believed") {
  // A valid stream; its first chunk is patched.
  MemoryFileSystem src;
  Bytes stream = SmallStream(src, true, false);
  REQUIRE_ASSIGN(size_t header_bytes, stream::StreamHeaderBytes(stream));
  const size_t chunk = header_bytes;
  REQUIRE(std::memcmp(stream.data() + chunk, "PLCK", 4) == 0);
  auto patched = [&](size_t offset, auto change) {
    Bytes b(stream.begin(), stream.begin() + chunk + stream::kChunkHeaderBytes);
    change(b.data() + chunk + offset);
    // Followed by plenty of bytes, so only the checks can stop it.
    b.resize(b.size() + (2 << 20));
    return b;
  };
  const StatusCode kCorrupt = StatusCode::kCorruption;
  RequireHostileRefused(patched(16, [](std::byte* p) { StoreLe32(p, 0xffffffff); }), kCorrupt,
                        "4 billion records", true);
  RequireHostileRefused(patched(20, [](std::byte* p) { StoreLe32(p, 0x7fffffff); }), kCorrupt,
                        "2 billion data clusters", true);
  RequireHostileRefused(patched(24, [](std::byte* p) { StoreLe64(p, 1ull << 60); }), kCorrupt,
                        "an exabyte payload", true);
  RequireHostileRefused(patched(4, [](std::byte* p) { StoreLe32(p, 0x80); }), kCorrupt,
                        "unknown chunk flags", true);
  RequireHostileRefused(patched(8, [](std::byte* p) { StoreLe64(p, 7); }), kCorrupt,
                        "a chunk out of sequence", true);
  RequireHostileRefused(patched(0, [](std::byte* p) { std::memcpy(p, "PLRS", 4); }),
                        StatusCode::kInvalidArgument, "a resume record in a plain receive");

  // Records: out of order, past the layer, an unknown layer or kind.
  auto record = [&](size_t r, auto change) {
    Bytes b = stream;
    change(b.data() + chunk + stream::kChunkHeaderBytes + r * stream::kRecordBytes);
    return b;
  };
  RequireHostileRefused(record(0, [](std::byte* p) { StoreLe64(p, 1ull << 40); }), kCorrupt,
                        "a cluster past the end", true);
  RequireHostileRefused(record(0, [](std::byte* p) { p[8] = std::byte{9}; }), kCorrupt,
                        "a layer that does not exist", true);
  RequireHostileRefused(record(0, [](std::byte* p) { p[10] = std::byte{7}; }), kCorrupt,
                        "an unknown record kind", true);
  RequireHostileRefused(record(2, [](std::byte* p) { StoreLe64(p, 0); }), kCorrupt,
                        "records out of order", true);
}

TEST_CASE("stream: an lz4 frame other than ours is refused") {
  // A frame with a content checksum and no content size decodes to the
  // right bytes but is not the format: refused before decoding.
  Bytes data = Pattern(kCb, 0x33);
  LZ4F_preferences_t prefs;
  std::memset(&prefs, 0, sizeof(prefs));
  prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  Bytes frame(LZ4F_compressFrameBound(data.size(), &prefs));
  size_t n = LZ4F_compressFrame(frame.data(), frame.size(), data.data(), data.size(), &prefs);
  REQUIRE(!LZ4F_isError(n));
  frame.resize(n);
  REQUIRE_ASSIGN(auto d, stream::Lz4Decompressor::Create());
  Bytes out(kCb);
  CHECK(d->Decompress(frame, out).code() == StatusCode::kCorruption);
  // Ours round-trips, and a frame declaring another size is refused.
  REQUIRE_ASSIGN(auto c, stream::Lz4Compressor::Create());
  Bytes ours(stream::Lz4Compressor::Bound(data.size()));
  REQUIRE_ASSIGN(size_t m, c->Compress(data, ours));
  ours.resize(m);
  REQUIRE_OK(d->Decompress(ours, out));
  CHECK(out == data);
  Bytes bigger(2 * kCb);
  CHECK(d->Decompress(ours, bigger).code() == StatusCode::kCorruption);
  Bytes smaller(kCb / 2);
  CHECK(d->Decompress(ours, smaller).code() == StatusCode::kCorruption);
}

// --- Crashes of the receiver ----------------------------------------------------------

// Finishes an interrupted receive in `mem` with the continuation that
// `send --resume` makes of `options` from its token; false (nothing done)
// when no receive was begun there.
bool ResumeInterrupted(MemoryFileSystem& mem, MemoryFileSystem& src, const SendOptions& options) {
  REQUIRE_ASSIGN(bool partial, HasInterruptedReceive(mem, kDst));
  if (!partial) return false;
  REQUIRE_ASSIGN(std::string token, ReceiveResumeToken(mem, kDst));
  SendOptions resumed = options;
  resumed.resume_token = token;
  REQUIRE_OK(Receive(mem, Send(src, resumed), true).status());
  return true;
}

// A receive on a FaultFileSystem cut after its k-th mutating operation, for
// every k, with the unsynced writes dropped (all of them, or a seeded
// random subset). After the crash: a new disk exists only if it is
// complete and right; a disk that was there is as it was or has the new
// snapshot, whole. Then the receive finishes with --resume (or afresh when
// it had not begun).
void CrashTest(bool incremental) {
  TestRng rng;
  MemoryFileSystem src;
  MakeSource(src, rng);
  const SendOptions options =
      incremental ? Incremental(kS1, kS2) : Full(kS2, StreamLayout::kLayers);
  const Bytes stream = Send(src, options);
  MemoryFileSystem seed;
  if (incremental) REQUIRE_OK(Receive(seed, Send(src, Full(kS1))).status());
  const auto seed_files = Files(seed, kDst);

  // How many mutating operations an uninterrupted receive makes.
  uint64_t total;
  {
    MemoryFileSystem mem;
    PutFiles(mem, seed_files, kDst);
    FaultFileSystem fault(mem);
    const uint64_t before = fault.mutation_count();
    REQUIRE_OK(Receive(fault, stream).status());
    total = fault.mutation_count() - before;
  }
  REQUIRE(total > 10);
  for (uint64_t k = 0; k <= total; ++k) {
    for (int mode = 0; mode < 2; ++mode) {
      INFO("cut after " << k << " of " << total << ", mode " << mode);
      MemoryFileSystem mem;
      PutFiles(mem, seed_files, kDst);
      FaultFileSystem fault(mem);
      fault.CutAfter(k, /*torn=*/mode == 1);
      auto r = Receive(fault, stream);
      REQUIRE_OK(fault.Crash(mode == 0 ? CrashMode::kDropAll : CrashMode::kRandom,
                             rng.Uniform(0, 1 << 30)));
      if (r.ok()) CHECK(k == total);
      const bool has_dd = Exists(mem, kDstDd);
      if (!incremental && has_dd) {
        // It looks complete: then it is.
        RequireSameSnapshot(src, kSrc, mem, kDstDd, kS2);
        RequireCleanDisk(mem, kDstDd);
      }
      if (incremental) {
        REQUIRE(has_dd);
        Descriptor dd = LoadDd(mem, kDstDd);
        RequireSameSnapshot(src, kSrc, mem, kDstDd, kS1);
        if (dd.FindImage(kS2) != nullptr) RequireSameSnapshot(src, kSrc, mem, kDstDd, kS2);
      }
      // Finish it.
      if (!ResumeInterrupted(mem, src, options) &&
          (incremental ? LoadDd(mem, kDstDd).FindImage(kS2) == nullptr : !has_dd)) {
        // Not begun: delta files a crash left unnamed are orphans.
        if (incremental) {
          REQUIRE_OK(CheckDisk(mem, kDstDd, /*repair=*/true).status());
        } else {
          for (const auto& [name, bytes] : Files(mem, kDst)) {
            REQUIRE_OK(mem.Remove(JoinPath(kDst, name)));
          }
        }
        REQUIRE_OK(Receive(mem, stream).status());
      }
      RequireSameSnapshot(src, kSrc, mem, kDstDd, kS2);
      RequireCleanDisk(mem, kDstDd);
      CHECK(!Exists(mem, "dst/" + std::string(kReceiveStateFileName)));
    }
  }
}

// The receiver's data writes run on its writer thread, behind the chunks
// being checked: a write that fails there (the host file system is full)
// must fail the receive, and no checkpoint may cover the clusters it did
// not write, whether the error shows at the next append, at a checkpoint or
// only at the end. After a power cut the receive resumes (or starts over)
// and ends identical.
TEST_CASE("stream: a failed data write on the receiver is never checkpointed") {
  TestRng rng;
  MemoryFileSystem src;
  MakeSource(src, rng);
  const SendOptions options = Full(kS2, StreamLayout::kLayers);
  const Bytes stream = Send(src, options);
  for (uint64_t checkpoint_bytes : {uint64_t{1}, uint64_t{1} << 40}) {
    bool ran_out = false;
    for (uint64_t k = 1; !ran_out; ++k) {
      INFO("checkpoint every " << checkpoint_bytes << " bytes, write " << k << " fails");
      MemoryFileSystem mem;
      FaultFileSystem fault(mem);
      fault.FailNth(FaultOp::kWrite, k, ENOSPC);
      MemReader in(stream);
      ReceiveOptions o;
      o.checkpoint_bytes = checkpoint_bytes;
      auto r = ReceiveStream(fault, kDst, in, o);
      if (r.ok()) {
        ran_out = true;  // the receive makes fewer than k writes
        REQUIRE(k > 3);
      } else {
        CHECK(r.error().code() == StatusCode::kNoSpace);
        CHECK(!Exists(mem, kDstDd));
      }
      REQUIRE_OK(fault.Crash(CrashMode::kDropAll));
      if (!ResumeInterrupted(mem, src, options) && !Exists(mem, kDstDd)) {
        for (const auto& [name, bytes] : Files(mem, kDst)) {
          REQUIRE_OK(mem.Remove(JoinPath(kDst, name)));
        }
        REQUIRE_OK(Receive(mem, stream).status());
      }
      RequireSameSnapshot(src, kSrc, mem, kDstDd, kS2);
      RequireCleanDisk(mem, kDstDd);
    }
  }
}

TEST_CASE("stream: a crashed full receive never leaves a disk that looks complete") {
  CrashTest(false);
}

TEST_CASE("stream: a crashed incremental receive leaves the old disk or the new one") {
  CrashTest(true);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
