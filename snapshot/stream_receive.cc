// The stream receiver.
//
// Goal: turn a stream back into a disk, trusting nothing in it before it is
// checked, never leaving a disk that looks complete but is not, and able to
// continue after an interruption with the same result as without one.
//
// Structure:
//
//   reader thread              workers (N)              calling thread
//   -------------              -----------              --------------
//   read and bound-check  -->  SHA-256 of the chunk's -> check the chunk
//   each chunk header and      bytes, its digest         follows the one
//   record table, read the     checked; then lz4         applied before it
//   payload into a buffer      decode (bounded) and      (chain), append the
//                              XXH3-128 per cluster      clusters to the new
//                              (full streams)            deltas, checkpoint
//
// Order of a receive:
//   1. header: size read in two bounded steps, every field validated, its
//      digest checked; for a continuation, the resume record must match the
//      saved state;
//   2. target: a full stream needs a folder without DiskDescriptor.xml; an
//      incremental one needs the base snapshot, with the content digest the
//      header names (the recorded <ContentDigest>, O(1); else computed from
//      the data, O(disk)), no delta already there under a stream GUID, and
//      a top holding no data (it is held open for writing meanwhile);
//      nothing has been written yet;
//   3. state: the state file (ploop-receive.state: the header, the file
//      names, the checkpoint) is written before the first delta file;
//   4. chunks: a chunk is decompressed only after its digest matched (so
//      lz4 only ever sees bytes the sender hashed), and written only after
//      that and after its place in the chain checked out: a worker checks
//      the digest against the previous chunk's digest field as read (so
//      chunks are checked in parallel), the calling thread checks that
//      this previous digest is the one it applied last; every
//      checkpoint_bytes the deltas are checkpointed (data, then BATs,
//      synced) and only then the state file records the new
//      position (atomic replace); meanwhile a background thread syncs the
//      deltas' data every 64 MiB (an optimisation only: durability comes
//      from the checkpoints);
//   5. end: the end record's counts and final digest, nothing after it,
//      the content digests (a full stream's are recomputed here and must
//      match); then the commit.
//
// Crash ordering and "never looks complete":
//   - until the commit, a full receive has no DiskDescriptor.xml (commands
//     refuse the folder) and an incremental one has only added delta files
//     the descriptor does not name (named like snapshot deltas, so check
//     --repair removes them as orphans); the deltas say "in use";
//   - commit: the state says "committing" (so a crash from here on is
//     finished by --resume without the stream); the deltas are finished
//     (clean header, synced); the new empty top is created; the descriptor
//     is saved atomically -- the one step that makes the received disk
//     exist; then the replaced old top and the state file are removed
//     (leftovers at worst);
//   - a checkpoint never records more than is durable, so a resume trims
//     each delta back to it (DeltaBuilder::Resume) and the sender re-sends
//     from there: the files end byte-identical to an uninterrupted receive.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "ploop/chain.h"
#include "ploop/delta.h"
#include "ploop/disk.h"
#include "ploop/path.h"
#include "snapshot/delta_builder.h"
#include "snapshot/sha256_lanes.h"
#include "snapshot/snapshot.h"
#include "snapshot/stream.h"
#include "snapshot/stream_format.h"
#include "snapshot/stream_pipeline.h"
#include "snapshot/stream_source.h"
#include "snapshot/write_behind.h"

namespace ploop {

namespace {

using namespace stream;

constexpr char kStateMagic[] = "PLRCVST1";
constexpr uint32_t kStateVersion = 1;
constexpr uint64_t kMaxStateBytes = 1 << 20;
constexpr size_t kMaxFileNameBytes = 255;

unsigned WorkerCount(unsigned requested) {
  if (requested != 0) return std::min(requested, 16u);
  return std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
}

// --- The state file --------------------------------------------------------------

enum class Phase : uint32_t { kReceiving = 0, kCommitting = 1 };

struct ReceiveState {
  Phase phase = Phase::kReceiving;
  std::vector<std::byte> header_bytes;
  std::vector<std::string> files;  // per layer, names in the folder
  std::string top_file;            // the new empty top, "" when a layer is the top
  std::string old_top_file;        // incremental: the top it replaces
  uint64_t next_seq = 0;
  uint64_t next_index = 0;
  uint64_t progress_bytes = 0;
  uint64_t record_count = 0;
  uint64_t data_count = 0;
  Digest chain{};
  std::vector<uint64_t> data_clusters;  // per layer, at the checkpoint
  std::vector<Digest> views;            // per layer (full streams)
  std::vector<Digest> final_digests;    // per layer, once committing
};

bool PlainName(const std::string& name) {
  return !name.empty() && name.size() <= kMaxFileNameBytes && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

void PutName(std::vector<std::byte>& out, const std::string& name) {
  PutLe32(out, static_cast<uint32_t>(name.size()));
  PutBytes(out, std::as_bytes(std::span(name.data(), name.size())));
}

std::vector<std::byte> EncodeState(const ReceiveState& s) {
  std::vector<std::byte> out;
  PutBytes(out, std::as_bytes(std::span(kStateMagic, 8)));
  PutLe32(out, kStateVersion);
  PutLe32(out, static_cast<uint32_t>(s.phase));
  PutLe32(out, static_cast<uint32_t>(s.header_bytes.size()));
  PutBytes(out, s.header_bytes);
  PutLe32(out, static_cast<uint32_t>(s.files.size()));
  for (const std::string& f : s.files) PutName(out, f);
  PutName(out, s.top_file);
  PutName(out, s.old_top_file);
  PutLe64(out, s.next_seq);
  PutLe64(out, s.next_index);
  PutLe64(out, s.progress_bytes);
  PutLe64(out, s.record_count);
  PutLe64(out, s.data_count);
  PutBytes(out, s.chain);
  for (size_t k = 0; k < s.files.size(); ++k) {
    PutLe64(out, s.data_clusters[k]);
    PutBytes(out, s.views[k]);
  }
  PutLe32(out, static_cast<uint32_t>(s.final_digests.size()));
  for (const Digest& d : s.final_digests) PutBytes(out, d);
  Digest check = Sha256::Of(out);
  PutBytes(out, check);
  return out;
}

// A bounds-checked cursor over the state file's bytes.
class Cursor {
 public:
  explicit Cursor(std::span<const std::byte> in) : in_(in) {}
  bool Take(size_t n, const std::byte** p) {
    if (in_.size() - pos_ < n) return false;
    *p = in_.data() + pos_;
    pos_ += n;
    return true;
  }
  bool U32(uint32_t* v) {
    const std::byte* p;
    if (!Take(4, &p)) return false;
    *v = LoadLe32(p);
    return true;
  }
  bool U64(uint64_t* v) {
    const std::byte* p;
    if (!Take(8, &p)) return false;
    *v = LoadLe64(p);
    return true;
  }
  bool D(Digest* d) {
    const std::byte* p;
    if (!Take(kDigestBytes, &p)) return false;
    std::memcpy(d->data(), p, kDigestBytes);
    return true;
  }
  bool Name(std::string* s, bool may_be_empty) {
    uint32_t n;
    const std::byte* p;
    if (!U32(&n) || n > kMaxFileNameBytes || !Take(n, &p)) return false;
    s->assign(reinterpret_cast<const char*>(p), n);
    return (may_be_empty && s->empty()) || PlainName(*s);
  }
  bool AtEnd() const { return pos_ == in_.size(); }

 private:
  std::span<const std::byte> in_;
  size_t pos_ = 0;
};

Result<ReceiveState> DecodeState(std::span<const std::byte> in, const std::string& path) {
  auto bad = [&] {
    return Status::Corruption(path +
                              " is damaged; discard the interrupted receive with "
                              "receive --abort");
  };
  if (in.size() < 8 + kDigestBytes || std::memcmp(in.data(), kStateMagic, 8) != 0) return bad();
  if (Sha256::Of(in.first(in.size() - kDigestBytes)) != [&] {
        Digest d;
        std::memcpy(d.data(), in.data() + in.size() - kDigestBytes, kDigestBytes);
        return d;
      }()) {
    return bad();
  }
  Cursor c(in.first(in.size() - kDigestBytes));
  const std::byte* p;
  c.Take(8, &p);
  ReceiveState s;
  uint32_t version, phase, header_len, files;
  if (!c.U32(&version) || version != kStateVersion || !c.U32(&phase) || phase > 1 ||
      !c.U32(&header_len) || header_len > kMaxStateBytes || !c.Take(header_len, &p)) {
    return bad();
  }
  s.phase = Phase(phase);
  s.header_bytes.assign(p, p + header_len);
  if (!c.U32(&files) || files == 0 || files > kMaxLayers) return bad();
  s.files.resize(files);
  for (std::string& f : s.files) {
    if (!c.Name(&f, false)) return bad();
  }
  if (!c.Name(&s.top_file, true) || !c.Name(&s.old_top_file, true) || !c.U64(&s.next_seq) ||
      !c.U64(&s.next_index) || !c.U64(&s.progress_bytes) || !c.U64(&s.record_count) ||
      !c.U64(&s.data_count) || !c.D(&s.chain)) {
    return bad();
  }
  s.data_clusters.resize(files);
  s.views.resize(files);
  for (uint32_t k = 0; k < files; ++k) {
    if (!c.U64(&s.data_clusters[k]) || !c.D(&s.views[k])) return bad();
  }
  uint32_t finals;
  if (!c.U32(&finals) || (finals != 0 && finals != files)) return bad();
  s.final_digests.resize(finals);
  for (Digest& d : s.final_digests) {
    if (!c.D(&d)) return bad();
  }
  if (!c.AtEnd()) return bad();
  return s;
}

std::string StatePath(const std::string& dir) { return JoinPath(dir, kReceiveStateFileName); }

Result<ReceiveState> LoadState(FileSystem& fs, const std::string& dir) {
  const std::string path = StatePath(dir);
  ASSIGN_OR_RETURN(auto file, fs.Open(path, OpenMode::kReadOnly));
  ASSIGN_OR_RETURN(uint64_t size, file->Size());
  if (size > kMaxStateBytes) {
    return Status::Corruption(path +
                              " is too large to be a receive state; discard it with "
                              "receive --abort");
  }
  std::vector<std::byte> bytes(size);
  TRY(file->ReadAt(0, bytes));
  return DecodeState(bytes, path);
}

// Atomic replace: tmp, sync, rename, sync the folder.
Status SaveState(FileSystem& fs, const std::string& dir, const ReceiveState& state) {
  const std::string path = StatePath(dir);
  const std::string tmp = path + ".tmp";
  std::vector<std::byte> bytes = EncodeState(state);
  Status s = [&]() -> Status {
    ASSIGN_OR_RETURN(auto file, fs.Create(tmp, /*exclusive=*/false));
    TRY(file->WriteAt(0, bytes));
    return file->Sync();
  }();
  if (s.ok()) s = fs.Rename(tmp, path);
  if (!s.ok()) {
    fs.Remove(tmp).IgnoreError();
    return std::move(s).WithContext("save the receive state");
  }
  return fs.SyncDir(dir.empty() ? "." : dir);
}

// --- Reading the stream -----------------------------------------------------------

class StreamIn {
 public:
  explicit StreamIn(StreamReader& in) : in_(in) {}

  // Reads exactly out.size() bytes; Corruption naming `what` at an early
  // end of the stream.
  Status ReadExact(std::span<std::byte> out, std::string_view what) {
    size_t done = 0;
    while (done < out.size()) {
      ASSIGN_OR_RETURN_CTX(size_t n, in_.Read(out.subspan(done)), "read the stream");
      if (n == 0) {
        return Status::Corruption("the stream is truncated (it ends inside " + std::string(what) +
                                  ", after " + std::to_string(bytes_ + done) + " bytes)");
      }
      done += n;
    }
    bytes_ += done;
    return Status::Ok();
  }

  // The stream must end here.
  Status ExpectEnd() {
    std::byte extra[1];
    ASSIGN_OR_RETURN_CTX(size_t n, in_.Read(extra), "read the stream");
    if (n != 0) return Status::Corruption("data after the end of the stream");
    return Status::Ok();
  }

  uint64_t bytes() const { return bytes_.load(); }

 private:
  StreamReader& in_;
  std::atomic<uint64_t> bytes_{0};
};

// Writes received data back to the disk while the stream goes on, for
// deltas written through the page cache: a
// thread that syncs the new deltas whenever the applier has written
// another kWritebackBytes. Durability still comes only from checkpoints;
// this only spreads the disk writes over the transfer instead of leaving
// them all to the final sync (which would otherwise add the time to write
// the whole disk after the last byte arrived). Errors are ignored here:
// the checkpoint's own sync reports them.
class BackgroundWriteback {
 public:
  explicit BackgroundWriteback(std::vector<DeltaBuilder*> builders)
      : builders_(std::move(builders)), thread_([this] { Loop(); }) {}
  ~BackgroundWriteback() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  // Asks for a sync of everything written so far; does not wait.
  void Kick() {
    {
      std::lock_guard lock(mu_);
      wanted_ = true;
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || wanted_; });
      if (stop_) return;
      wanted_ = false;
      lock.unlock();
      for (DeltaBuilder* b : builders_) b->SyncData().IgnoreError();
      lock.lock();
    }
  }

  std::vector<DeltaBuilder*> builders_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool wanted_ = false;
  bool stop_ = false;
  std::thread thread_;
};

constexpr uint64_t kWritebackBytes = 64ull << 20;
// Received data queued for the disk at most: enough to keep the device
// busy while the next chunks are checked, and to ride out a slow stretch
// of the disk without stopping the stream. Measured with send_bench
// (tools/bench/README.md, session 8), median times of 10 rounds each:
// 32 MiB 2.26 s, 64 MiB 2.23 s, 96 MiB 2.19 s, 160 MiB 2.17 s.
constexpr uint64_t kWriteBehindBytes = 96ull << 20;
// Writes in flight at once. One direct write at a time kept the writer
// busy for nearly the whole of send_bench's transfer (the chunk pipeline
// waited 0.8-1.0 s of 1.35 s for room in the queue); with four, the queue
// never filled and send | receive ran 7% faster (tools/bench/README.md,
// session 14). They overlap because the builders reserve the space ahead
// of them.
constexpr unsigned kWriterThreads = 4;

struct ChunkJob {
  std::array<std::byte, kChunkHeaderBytes> header_bytes;
  ChunkHeader header;
  // The chain value the chunk's digest claims to follow: the digest field
  // of the chunk before it as read (or the header's or resume record's).
  Digest chain_in{};
  std::vector<std::byte> record_bytes;
  std::vector<Record> records;
  AlignedBuffer payload;
  bool pooled_payload = false;
  // Filled by a worker:
  AlignedBuffer raw;                   // decoded data, or the payload itself when stored
  BufferPool* raw_home = nullptr;      // the pool `raw` goes back to, if any
  std::vector<ClusterDigest> digests;  // full streams: per data cluster, payload order
};

class Receiver {
 public:
  Receiver(FileSystem& fs, const std::string& dir, const ReceiveOptions& options)
      : fs_(fs),
        dir_(dir),
        dd_path_(JoinPath(dir, std::string(kDescriptorFileName))),
        options_(options),
        workers_(WorkerCount(options.threads)) {}

  Result<ReceiveSummary> Run(StreamReader& reader);
  // Finishes a commit a crash interrupted (phase kCommitting).
  Result<ReceiveSummary> FinishCommit(ReceiveState state);

 private:
  Status ReadHeader(StreamIn& in);
  Status CheckFullTarget();
  Status CheckIncrementalTarget();
  Status PrepareFresh();
  Status OpenBuilders();
  Status ReceiveChunks(StreamIn& in, StreamReader& reader,
                       const std::array<std::byte, kTagBytes>& first_tag,
                       std::vector<std::byte>* end_raw);
  Status ReadChunks(StreamIn& in, std::array<std::byte, kTagBytes> tag, Digest chain,
                    OrderedPipeline<ChunkJob>& pipe, std::vector<std::byte>* end_raw);
  // A worker's part of a chunk: check its digest, decompress, digest its
  // clusters. DecodePair does two, hashing them together.
  Status Decode(ChunkJob& job);
  std::pair<Status, Status> DecodePair(ChunkJob& a, ChunkJob& b);
  // Decode once the body digest is known.
  Status DecodeVerified(ChunkJob& job, const Digest& body);
  // The chunk's bytes its digest covers.
  static ChunkBody BodyOf(const ChunkJob& job);
  Status Apply(const ChunkJob& job);
  Status Checkpoint();
  Status Commit(const std::vector<std::byte>& end_raw);
  Status DoCommit();
  bool LowerHolds(size_t layer, uint64_t index) const;
  void Report(StreamProgress::Phase phase, uint64_t done, uint64_t total, uint64_t stream) {
    if (options_.progress) options_.progress(StreamProgress{phase, done, total, stream});
  }
  Result<ReceiveSummary> Summary(uint64_t stream_bytes) const;

  FileSystem& fs_;
  const std::string dir_;
  const std::string dd_path_;
  const ReceiveOptions& options_;
  const unsigned workers_;

  StreamHeader header_;
  ReceiveState state_;
  std::unique_ptr<Chain> base_;     // incremental: the base, read-only (locks, BAT lookups)
  std::unique_ptr<Image> old_top_;  // incremental: held for writing until the commit
  std::unique_ptr<SourceChain> base_source_;
  std::vector<std::unique_ptr<DeltaBuilder>> builders_;
  std::vector<ViewChain> views_;
  uint64_t bytes_since_checkpoint_ = 0;
  uint64_t zero_clusters_ = 0;
  uint64_t session_data_ = 0;
  std::string root_name_;
  // Buffers of the chunks in flight (set while ReceiveChunks runs).
  // Chunk buffers, received payloads and decompressed data alike: one
  // pool, so that a stream that mixes stored and compressed chunks keeps
  // one set of buffers, not one per kind.
  BufferPool* pool_ = nullptr;
};

Status Receiver::ReadHeader(StreamIn& in) {
  std::vector<std::byte> bytes(kHeaderFixedBytes);
  TRY(in.ReadExact(bytes, "the header"));
  ASSIGN_OR_RETURN(size_t size, StreamHeaderBytes(bytes));
  bytes.resize(size);
  TRY(in.ReadExact(std::span(bytes).subspan(kHeaderFixedBytes), "the header"));
  ASSIGN_OR_RETURN(header_, DecodeStreamHeader(bytes));
  if (state_.header_bytes.empty()) {
    state_.header_bytes = std::move(bytes);
  } else if (bytes != state_.header_bytes) {
    return Status::FailedPrecondition(
        "this stream is not the one " + dir_ +
        " was receiving (another snapshot, base or disk); continue with the stream made by "
        "send --resume from its token (receive --token)");
  }
  return Status::Ok();
}

Status Receiver::CheckFullTarget() {
  ASSIGN_OR_RETURN(bool exists, fs_.Exists(dd_path_));
  if (exists) {
    return Status::AlreadyExists(dir_ + " already holds a disk (" +
                                 std::string(kDescriptorFileName) +
                                 "); a full stream needs an empty folder, an incremental one "
                                 "applies to a disk");
  }
  return Status::Ok();
}

Status Receiver::CheckIncrementalTarget() {
  const std::string& base = header_.base_guid;
  ASSIGN_OR_RETURN(bool exists, fs_.Exists(dd_path_));
  if (!exists) {
    return Status::NotFound(dir_ + " holds no disk (" + std::string(kDescriptorFileName) +
                            "); an incremental stream applies over its base snapshot " + base);
  }
  TRY(FinishInterruptedMerges(fs_, dd_path_).status());
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs_, dd_path_));
  if (dd.cluster_bytes() != header_.cluster_bytes) {
    return Status::FailedPrecondition(
        "the disk in " + dir_ + " has " + std::to_string(dd.cluster_bytes()) +
        "-byte clusters, the stream " + std::to_string(header_.cluster_bytes));
  }
  const DescriptorShot* shot = dd.FindShot(base);
  if (shot == nullptr) {
    return Status::NotFound("the base snapshot " + base + " of this incremental stream is not in " +
                            dir_);
  }
  if (base == dd.top_guid()) {
    return Status::FailedPrecondition(base + " is the writable top of the disk in " + dir_ +
                                      "; the base must be a snapshot");
  }
  for (size_t k = 0; k < header_.layers.size(); ++k) {
    const std::string& g = header_.layers[k].guid;
    if (g == kTopGuid) continue;  // replaces the disk's top
    if (dd.FindImage(g) != nullptr) {
      return Status::AlreadyExists("the disk in " + dir_ + " already has snapshot " + g);
    }
  }
  // The old top: held for writing until the commit replaces it; it must
  // hold nothing, or its data would be lost.
  const DescriptorImage top = dd.top();
  if (!dd.Children(top.guid).empty() || top.kind == ImageKind::kRaw) {
    return Status::FailedPrecondition("the top of the disk in " + dir_ + " is not a plain delta");
  }
  if (BaseName(top.path) != top.file || !PlainName(top.file)) {
    return Status::NotSupported("the top of the disk in " + dir_ + " is not a file in it");
  }
  OpenOptions writable;
  writable.writable = true;
  ASSIGN_OR_RETURN_CTX(old_top_, OpenImage(fs_, top.path, writable), "delta " + top.guid);
  ASSIGN_OR_RETURN(ImageStats stats, old_top_->Stats());
  if (stats.allocated_clusters != 0) {
    return Status::FailedPrecondition(
        "the top of the disk in " + dir_ +
        " holds data written after its last snapshot; "
        "take a snapshot of it (it stays as a branch) or roll it back with snapshot-switch");
  }
  state_.old_top_file = top.file;
  OpenOptions read_only;
  ASSIGN_OR_RETURN(base_, Chain::Open(fs_, dd, base, read_only));
  base_source_ = std::make_unique<SourceChain>(*base_);
  // The base's content: the recorded digest when there is one (O(1)),
  // else a digest of the data (O(disk)).
  Digest have;
  if (!ParseContentDigest(shot->content_digest, &have)) {
    ASSIGN_OR_RETURN(have, ViewDigestOf(*base_, base_->size_bytes(), [&](uint64_t d, uint64_t t) {
                       Report(StreamProgress::Phase::kVerifyBase, d, t, 0);
                     }));
  }
  if (have != header_.base_digest) {
    return Status::FailedPrecondition("the base snapshot " + base + " in " + dir_ +
                                      " differs from the sender's (content digest " +
                                      Hex(std::span(have).first(8)) + "... against " +
                                      Hex(std::span(header_.base_digest).first(8)) +
                                      "...); it is not the same snapshot");
  }
  if (base_->size_bytes() > header_.layers[0].size_bytes) {
    return Status::FailedPrecondition("the base snapshot " + base + " is larger than the stream");
  }
  // Files are named as snapshot deltas are: "<root file>.{guid}".
  root_name_ = BaseName(dd.Chain().front().file);
  return Status::Ok();
}

Status Receiver::PrepareFresh() {
  const size_t layers = header_.layers.size();
  auto fresh_name = [&]() -> Result<std::string> {
    ASSIGN_OR_RETURN(std::string guid, NewRandomGuid());
    return root_name_ + "." + guid;
  };
  state_.files.clear();
  for (size_t k = 0; k < layers; ++k) {
    if (k == 0 && !header_.incremental) {
      state_.files.push_back(root_name_);
    } else {
      ASSIGN_OR_RETURN(std::string name, fresh_name());
      state_.files.push_back(name);
    }
  }
  if (header_.layers.back().guid != kTopGuid) {
    ASSIGN_OR_RETURN(state_.top_file, fresh_name());
  }
  for (const std::string& name : state_.files) {
    ASSIGN_OR_RETURN(bool exists, fs_.Exists(JoinPath(dir_, name)));
    if (exists) return Status::AlreadyExists(JoinPath(dir_, name) + " already exists");
  }
  state_.data_clusters.assign(layers, 0);
  state_.views.assign(layers, Digest{});
  for (size_t k = 0; k < layers && !header_.incremental; ++k) {
    ViewChain v;
    v.Init(header_.layers[k].size_bytes, header_.cluster_bytes);
    state_.views[k] = v.state();
  }
  state_.chain = header_.digest;
  // The state first: whatever is created after it, --abort can find.
  TRY(SaveState(fs_, dir_, state_));
  return OpenBuilders();
}

Status Receiver::OpenBuilders() {
  builders_.clear();
  for (size_t k = 0; k < header_.layers.size(); ++k) {
    const std::string path = JoinPath(dir_, state_.files[k]);
    ASSIGN_OR_RETURN(bool exists, fs_.Exists(path));
    std::unique_ptr<DeltaBuilder> b;
    if (state_.data_clusters[k] == 0) {
      // Nothing of it was checkpointed: start it afresh (a crash may have
      // cut its creation short).
      if (exists) TRY(fs_.Remove(path));
      ASSIGN_OR_RETURN(
          b, DeltaBuilder::Create(fs_, path, header_.layers[k].size_bytes, header_.cluster_bytes));
    } else {
      ASSIGN_OR_RETURN(b, DeltaBuilder::Resume(fs_, path, header_.layers[k].size_bytes,
                                               header_.cluster_bytes, state_.data_clusters[k]));
    }
    builders_.push_back(std::move(b));
  }
  return fs_.SyncDir(dir_.empty() ? "." : dir_);
}

Status Receiver::ReadChunks(StreamIn& in, std::array<std::byte, kTagBytes> tag, Digest chain,
                            OrderedPipeline<ChunkJob>& pipe, std::vector<std::byte>* end_raw) {
  uint64_t seq = state_.next_seq;
  uint64_t min_index = state_.next_index;
  for (;;) {
    if (std::memcmp(tag.data(), kEndTag, kTagBytes) == 0) {
      end_raw->resize(EndRecordBytes(header_));
      std::memcpy(end_raw->data(), tag.data(), kTagBytes);
      TRY(in.ReadExact(std::span(*end_raw).subspan(kTagBytes), "the end record"));
      return in.ExpectEnd();
    }
    if (std::memcmp(tag.data(), kChunkTag, kTagBytes) != 0) {
      return Status::Corruption("expected chunk " + std::to_string(seq) +
                                " or the end of the stream, found other bytes");
    }
    auto job = std::make_unique<ChunkJob>();
    std::array<std::byte, kChunkHeaderBytes>& raw = job->header_bytes;
    std::memcpy(raw.data(), tag.data(), kTagBytes);
    TRY(in.ReadExact(std::span(raw).subspan(kTagBytes), "a chunk header"));
    ASSIGN_OR_RETURN(job->header, DecodeChunkHeader(raw, header_));
    if (job->header.seq != seq) {
      return Status::Corruption("chunk " + std::to_string(job->header.seq) + " where chunk " +
                                std::to_string(seq) + " was due");
    }
    job->chain_in = chain;
    chain = job->header.digest;
    job->record_bytes.resize(size_t{job->header.record_count} * kRecordBytes);
    TRY(in.ReadExact(job->record_bytes, "a record table"));
    ASSIGN_OR_RETURN_CTX(
        job->records, DecodeRecords(job->record_bytes, header_, min_index, job->header.data_count),
        "chunk " + std::to_string(seq));
    min_index = job->records.back().index + 1;
    if (job->header.payload_bytes > 0) {
      job->pooled_payload = job->header.payload_bytes <= pool_->buffer_bytes();
      job->payload =
          job->pooled_payload ? pool_->Get() : NewAlignedBuffer(job->header.payload_bytes);
      TRY(in.ReadExact(std::span(job->payload.get(), job->header.payload_bytes), "a chunk's data"));
    }
    if (!pipe.Submit(std::move(job)).ok()) return Status::Ok();  // the consumer stopped
    ++seq;
    TRY(in.ReadExact(tag, "the stream (chunk or end record expected)"));
  }
}

ChunkBody Receiver::BodyOf(const ChunkJob& job) {
  ChunkBody body;
  body.header_prefix = std::span(job.header_bytes).first(kChunkHeaderDigestedBytes);
  body.records = job.record_bytes;
  body.payload = std::span<const std::byte>(job.payload.get(), job.header.payload_bytes);
  return body;
}

Status Receiver::Decode(ChunkJob& job) {
  // Integrity first: the chunk's bytes as they travelled, before lz4 or
  // anything else looks at the payload.
  return DecodeVerified(job, ChunkBodyDigest(BodyOf(job)));
}

std::pair<Status, Status> Receiver::DecodePair(ChunkJob& a, ChunkJob& b) {
  // The two chunks' SHA-256 together (sha256_lanes.h): the receiver's
  // largest cost, in about 0.65 of the time of one after the other.
  const std::array<Digest, 2> body = ChunkBodyDigests(BodyOf(a), BodyOf(b));
  Status sa = DecodeVerified(a, body[0]);
  Status sb = DecodeVerified(b, body[1]);
  return {std::move(sa), std::move(sb)};
}

Status Receiver::DecodeVerified(ChunkJob& job, const Digest& body) {
  const uint64_t cb = header_.cluster_bytes;
  const uint64_t raw_bytes = uint64_t{job.header.data_count} * cb;
  if (ChainDigest(job.chain_in, body) != job.header.digest) {
    return Status::Corruption("chunk " + std::to_string(job.header.seq) +
                              ": digest mismatch (the stream is corrupt)");
  }
  if (job.header.flags & kChunkLz4) {
    thread_local std::unique_ptr<Lz4Decompressor> decompressor;
    if (decompressor == nullptr) {
      ASSIGN_OR_RETURN(decompressor, Lz4Decompressor::Create());
    }
    const bool pooled = raw_bytes <= pool_->buffer_bytes();
    job.raw = pooled ? pool_->Get() : NewAlignedBuffer(raw_bytes);
    job.raw_home = pooled ? pool_ : nullptr;
    TRY_CTX(decompressor->Decompress(std::span(job.payload.get(), job.header.payload_bytes),
                                     std::span(job.raw.get(), raw_bytes)),
            "chunk " + std::to_string(job.header.seq));
    if (job.pooled_payload) pool_->Put(std::move(job.payload));
    job.payload.reset();
  } else {
    job.raw = std::move(job.payload);
    job.raw_home = job.pooled_payload ? pool_ : nullptr;
  }
  if (!header_.incremental) {
    // The content digests are checked against the end record; an
    // incremental stream's come from the end record alone.
    job.digests.resize(job.header.data_count);
    for (uint32_t j = 0; j < job.header.data_count; ++j) {
      job.digests[j] = ClusterDigestOf(std::span<const std::byte>(job.raw.get() + j * cb, cb));
    }
  }
  return Status::Ok();
}

bool Receiver::LowerHolds(size_t layer, uint64_t index) const {
  for (size_t j = 0; j < layer; ++j) {
    if (builders_[j]->Holds(index)) return true;
  }
  return base_source_ != nullptr && base_source_->Highest(index, base_source_->levels() - 1) >= 0;
}

Status Receiver::Apply(const ChunkJob& job) {
  const uint64_t cb = header_.cluster_bytes;
  const std::vector<Record>& records = job.records;
  // Payload order is (layer, index): each layer's data is one piece.
  std::vector<uint64_t> layer_offset(header_.layers.size() + 1, 0);
  for (const Record& r : records) {
    if (r.kind == RecordKind::kData) layer_offset[r.layer + 1] += cb;
  }
  for (size_t k = 1; k < layer_offset.size(); ++k) layer_offset[k] += layer_offset[k - 1];
  std::vector<uint32_t> slot(records.size(), 0);  // record -> payload cluster
  std::vector<uint64_t> run;
  for (size_t k = 0; k < header_.layers.size(); ++k) {
    if (layer_offset[k + 1] == layer_offset[k] &&
        std::none_of(records.begin(), records.end(),
                     [&](const Record& r) { return r.layer == k; })) {
      continue;
    }
    uint64_t offset = layer_offset[k];
    uint64_t run_start = offset;
    run.clear();
    auto flush = [&]() -> Status {
      if (run.empty()) return Status::Ok();
      TRY(builders_[k]->Append(
          run, std::span<const std::byte>(job.raw.get() + run_start, run.size() * cb)));
      run.clear();
      return Status::Ok();
    };
    for (size_t r = 0; r < records.size(); ++r) {
      if (records[r].layer != k) continue;
      if (records[r].kind == RecordKind::kData) {
        if (run.empty()) run_start = offset;
        run.push_back(records[r].index);
        slot[r] = static_cast<uint32_t>(offset / cb);
        offset += cb;
      } else {
        TRY(flush());
        ++zero_clusters_;
        // A hole only needs writing where a lower layer could show through.
        if (LowerHolds(k, records[r].index)) TRY(builders_[k]->AppendZero(records[r].index));
      }
    }
    TRY(flush());
  }
  session_data_ += job.header.data_count;
  if (!header_.incremental) {
    // Content digests, index by index: layer k reads the highest record at
    // or below it (a hole reads zeros).
    for (size_t r = 0; r < records.size();) {
      size_t end = r;
      while (end < records.size() && records[end].index == records[r].index) ++end;
      const ClusterDigest* current = nullptr;
      size_t next = r;
      for (size_t k = 0; k < views_.size(); ++k) {
        while (next < end && records[next].layer == k) {
          current = records[next].kind == RecordKind::kData ? &job.digests[slot[next]] : nullptr;
          ++next;
        }
        if (current != nullptr) views_[k].Add(records[r].index, *current);
      }
      r = end;
    }
  }
  return Status::Ok();
}

Status Receiver::Checkpoint() {
  for (size_t k = 0; k < builders_.size(); ++k) {
    TRY(builders_[k]->Checkpoint());
    state_.data_clusters[k] = builders_[k]->data_clusters();
    if (!header_.incremental) state_.views[k] = views_[k].state();
  }
  TRY(SaveState(fs_, dir_, state_));
  bytes_since_checkpoint_ = 0;
  return Status::Ok();
}

Status Receiver::ReceiveChunks(StreamIn& in, StreamReader& reader,
                               const std::array<std::byte, kTagBytes>& first_tag,
                               std::vector<std::byte>* end_raw) {
  const uint64_t cb = header_.cluster_bytes;
  const uint64_t pooled = std::min<uint64_t>(header_.max_chunk_data_bytes(), kChunkDataBytes);
  BufferPool pool(std::max<uint64_t>(Lz4Compressor::Bound(pooled), cb));
  pool_ = &pool;
  // Destroyed (its workers joined) before the pools above go away.
  // Chunks are paired only where hashing two at once is faster.
  OrderedPipeline<ChunkJob>::PairWork pair;
  if (Sha256TwoLanes()) pair = [this](ChunkJob& a, ChunkJob& b) { return DecodePair(a, b); };
  auto pipe_owner = std::make_unique<OrderedPipeline<ChunkJob>>(
      workers_, workers_ + 2, [this](ChunkJob& j) { return Decode(j); }, std::move(pair));
  OrderedPipeline<ChunkJob>& pipe = *pipe_owner;
  Status read_status;
  std::thread producer([&, chain = state_.chain] {
    read_status = ReadChunks(in, first_tag, chain, pipe, end_raw);
    pipe.Finish();
  });
  // Destroyed before the pools: its After() functions give buffers back.
  WriteBehind writer(kWriteBehindBytes, kWriterThreads);
  std::vector<DeltaBuilder*> buffered;
  for (auto& b : builders_) {
    b->UseWriteBehind(&writer, options_.direct_io);
    if (!b->direct()) buffered.push_back(b.get());
  }
  auto writeback = std::make_unique<BackgroundWriteback>(buffered);
  uint64_t written_since_kick = 0;
  Status failed;
  bool at_boundary = true;  // everything applied is whole chunks
  while (auto next = pipe.Next()) {
    auto& [job, status] = *next;
    if (!status.ok()) {
      failed = status;
      break;
    }
    // The worker checked the chunk's digest against job->chain_in; the
    // chain holds when that is the digest of the chunk applied last.
    const ChunkHeader& h = job->header;
    if (job->chain_in != state_.chain) {
      failed = Status::Corruption("chunk " + std::to_string(h.seq) +
                                  ": digest mismatch (the stream is corrupt)");
      break;
    }
    if (h.progress_bytes < state_.progress_bytes) {
      failed = Status::Corruption("chunk " + std::to_string(h.seq) + ": progress goes backwards");
      break;
    }
    at_boundary = false;
    failed = Apply(*job);
    if (!failed.ok()) {
      writer.Drain().IgnoreError();  // writes queued from job->raw
      break;
    }
    at_boundary = true;
    state_.chain = h.digest;
    state_.next_seq = h.seq + 1;
    state_.next_index = job->records.back().index + 1;
    state_.progress_bytes = h.progress_bytes;
    state_.record_count += h.record_count;
    state_.data_count += h.data_count;
    bytes_since_checkpoint_ += uint64_t{h.data_count} * cb;
    written_since_kick += uint64_t{h.data_count} * cb;
    if (written_since_kick >= kWritebackBytes) {
      writeback->Kick();
      written_since_kick = 0;
    }
    // The buffer goes home once the writes queued from it are done.
    writer.After(
        [buf = std::make_shared<AlignedBuffer>(std::move(job->raw)), home = job->raw_home] {
          if (home != nullptr) home->Put(std::move(*buf));
        });
    if (bytes_since_checkpoint_ >= options_.checkpoint_bytes) {
      at_boundary = false;  // a failed checkpoint leaves the older one in force
      failed = Checkpoint();
      if (!failed.ok()) break;
      at_boundary = true;
    }
    Report(StreamProgress::Phase::kTransfer, h.progress_bytes, header_.total_bytes, in.bytes());
  }
  pipe.Cancel();
  reader.Cancel();
  producer.join();
  pipe_owner.reset();
  writeback.reset();
  Status written = writer.Drain();
  for (auto& b : builders_) b->UseWriteBehind(nullptr);
  if (!written.ok()) {
    // Chunks applied since the last checkpoint may lack their data: that
    // checkpoint stays in force.
    at_boundary = false;
    if (failed.ok()) failed = written;
  }
  pool_ = nullptr;
  if (failed.ok()) failed = read_status;
  if (failed.ok() && end_raw->empty()) failed = Status::Corruption("the stream ended early");
  if (!failed.ok()) {
    // Keep what arrived whole: the sender resumes after it.
    if (at_boundary) Checkpoint().IgnoreError();
    return failed;
  }
  return Status::Ok();
}

Status Receiver::DoCommit() {
  const std::string top_file = state_.top_file;
  const std::string new_top_file = top_file.empty() ? state_.files.back() : top_file;
  if (builders_.empty()) TRY(OpenBuilders());
  for (auto& b : builders_) TRY(b->Finish());
  builders_.clear();
  TRY(fs_.SyncDir(dir_.empty() ? "." : dir_));
  const LayerEntry& last = header_.layers.back();
  bool committed = false;
  ASSIGN_OR_RETURN(bool dd_exists, fs_.Exists(dd_path_));
  std::optional<Descriptor> dd;
  if (dd_exists) {
    ASSIGN_OR_RETURN(Descriptor loaded, Descriptor::Load(fs_, dd_path_));
    committed = loaded.top().file == new_top_file;
    if (!committed && !header_.incremental) {
      return Status::AlreadyExists(dir_ + " already holds a disk");
    }
    dd.emplace(std::move(loaded));
  }
  if (!committed) {
    if (!top_file.empty()) {
      // An empty top over the received snapshot (a crashed commit may have
      // left one half-made).
      const std::string path = JoinPath(dir_, top_file);
      ASSIGN_OR_RETURN(bool exists, fs_.Exists(path));
      if (exists) TRY(fs_.Remove(path));
      CreateOptions o;
      o.size_bytes = header_.disk_size_bytes;
      o.cluster_bytes = header_.cluster_bytes;
      ASSIGN_OR_RETURN(auto top, Delta::Create(fs_, path, o));
      TRY(top->Close());
    }
    if (!header_.incremental) {
      ASSIGN_OR_RETURN(
          Descriptor fresh,
          Descriptor::NewSingle(dd_path_, header_.disk_size_bytes, header_.cluster_bytes,
                                ImageKind::kExpanded, state_.files[0], header_.layers[0].guid,
                                false, header_.cylinders, header_.heads));
      dd.emplace(std::move(fresh));
      for (size_t k = 1; k < header_.layers.size(); ++k) {
        TRY(dd->AddImage(header_.layers[k].guid, ImageKind::kExpanded, state_.files[k],
                         header_.layers[k].parent_guid));
      }
      if (!top_file.empty()) TRY(dd->AddImage(kTopGuid, ImageKind::kExpanded, top_file, last.guid));
    } else {
      if (dd->top().file != state_.old_top_file) {
        return Status::FailedPrecondition("the top of the disk in " + dir_ +
                                          " changed during the receive");
      }
      for (const LayerEntry& layer : header_.layers) {
        if (layer.guid == kTopGuid) continue;
        const size_t k = &layer - header_.layers.data();
        TRY(dd->AddImage(layer.guid, ImageKind::kExpanded, state_.files[k], layer.parent_guid));
      }
      // As snapshot-switch does: park the old top's GUID, add the new top,
      // drop the old one.
      ASSIGN_OR_RETURN(std::string parked, NewRandomGuid());
      TRY(dd->RenameGuid(dd->top_guid(), parked));
      TRY(dd->AddImage(kTopGuid, ImageKind::kExpanded, new_top_file,
                       top_file.empty() ? last.parent_guid : last.guid));
      TRY(dd->SetTop(kTopGuid));
      TRY(dd->RemoveImage(parked));
      TRY(dd->SetDiskSize(header_.disk_size_bytes, header_.cylinders, header_.heads));
    }
    TRY(dd->SetTop(kTopGuid));
    for (size_t k = 0; k < header_.layers.size(); ++k) {
      if (header_.layers[k].guid == kTopGuid) continue;
      TRY(dd->SetContentDigest(header_.layers[k].guid, ContentDigestText(state_.final_digests[k])));
    }
    // The one step that makes the received disk exist.
    TRY(dd->Save(fs_));
  }
  base_source_.reset();
  base_.reset();
  old_top_.reset();
  if (header_.incremental && !state_.old_top_file.empty()) {
    bool named = false;
    for (const auto& image : dd->images()) named |= image.file == state_.old_top_file;
    if (!named) fs_.Remove(JoinPath(dir_, state_.old_top_file)).IgnoreError();
  }
  TRY(fs_.Remove(StatePath(dir_)));
  return fs_.SyncDir(dir_.empty() ? "." : dir_);
}

Status Receiver::Commit(const std::vector<std::byte>& end_raw) {
  ASSIGN_OR_RETURN(EndRecord end, DecodeEndRecord(end_raw, header_, state_.chain));
  if (end.chunk_count != state_.next_seq || end.record_count != state_.record_count ||
      end.data_count != state_.data_count) {
    return Status::Corruption("the end record's counts disagree with the chunks received");
  }
  if (!header_.incremental) {
    for (size_t k = 0; k < views_.size(); ++k) {
      if (views_[k].state() != end.layer_digests[k]) {
        return Status::Corruption("the content digest of layer " + header_.layers[k].guid +
                                  " differs from the sender's");
      }
    }
  }
  state_.final_digests = end.layer_digests;
  state_.phase = Phase::kCommitting;
  TRY(Checkpoint());
  return DoCommit();
}

Result<ReceiveSummary> Receiver::Summary(uint64_t stream_bytes) const {
  ReceiveSummary s;
  s.incremental = header_.incremental;
  for (const LayerEntry& layer : header_.layers) s.guids.push_back(layer.guid);
  s.stream_bytes = stream_bytes;
  s.data_clusters = session_data_;
  s.zero_clusters = zero_clusters_;
  return s;
}

Result<ReceiveSummary> Receiver::FinishCommit(ReceiveState state) {
  state_ = std::move(state);
  ASSIGN_OR_RETURN(header_, DecodeStreamHeader(state_.header_bytes));
  if (state_.final_digests.size() != header_.layers.size() ||
      state_.files.size() != header_.layers.size()) {
    return Status::Corruption(StatePath(dir_) + " is damaged; discard it with receive --abort");
  }
  TRY_CTX(DoCommit(), "finish the interrupted commit");
  return Summary(0);
}

Result<ReceiveSummary> Receiver::Run(StreamReader& reader) {
  const std::string state_path = StatePath(dir_);
  ASSIGN_OR_RETURN(bool has_state, fs_.Exists(state_path));
  if (!options_.resume && has_state) {
    return Status::FailedPrecondition(
        dir_ +
        " holds an interrupted receive: continue it with receive --resume (the sender "
        "needs the token from receive --token) or discard it with receive --abort");
  }
  if (options_.resume) {
    if (!has_state) return Status::NotFound("there is no interrupted receive in " + dir_);
    ASSIGN_OR_RETURN(state_, LoadState(fs_, dir_));
    if (state_.phase == Phase::kCommitting) return FinishCommit(std::move(state_));
  }
  StreamIn in(reader);
  TRY(ReadHeader(in));
  if (options_.resume && (state_.files.size() != header_.layers.size() ||
                          state_.data_clusters.size() != header_.layers.size())) {
    return Status::Corruption(state_path + " is damaged; discard it with receive --abort");
  }
  std::array<std::byte, kTagBytes> tag;
  TRY(in.ReadExact(tag, "the stream"));
  const bool continuation = std::memcmp(tag.data(), kResumeTag, kTagBytes) == 0;
  if (options_.resume) {
    if (!continuation) {
      return Status::FailedPrecondition(
          "this stream starts from the beginning; to continue the receive in " + dir_ +
          " use the stream send --resume makes from its token (receive --token)");
    }
    std::array<std::byte, kResumeRecordBytes> raw;
    std::memcpy(raw.data(), tag.data(), kTagBytes);
    TRY(in.ReadExact(std::span(raw).subspan(kTagBytes), "the resume record"));
    ASSIGN_OR_RETURN(ResumeRecord r, DecodeResumeRecord(raw));
    if (r.next_seq != state_.next_seq || r.next_index != state_.next_index ||
        r.chain != state_.chain) {
      return Status::FailedPrecondition(
          "the stream continues at chunk " + std::to_string(r.next_seq) + ", the receive in " +
          dir_ + " stopped before chunk " + std::to_string(state_.next_seq) +
          "; make the stream with the token receive --token prints now");
    }
    TRY(in.ReadExact(tag, "the stream"));
  } else if (continuation) {
    return Status::InvalidArgument(
        "this stream continues an interrupted transfer; receive it with --resume");
  }
  if (header_.incremental) {
    TRY(CheckIncrementalTarget());
  } else {
    TRY(CheckFullTarget());
    root_name_ = "root.hds";
  }
  if (options_.resume) {
    TRY(OpenBuilders());
  } else {
    TRY(PrepareFresh());
  }
  views_.assign(header_.layers.size(), ViewChain());
  for (size_t k = 0; k < views_.size(); ++k) views_[k].set_state(state_.views[k]);
  std::vector<std::byte> end_raw;
  TRY(ReceiveChunks(in, reader, tag, &end_raw));
  TRY(Commit(end_raw));
  Report(StreamProgress::Phase::kTransfer, header_.total_bytes, header_.total_bytes, in.bytes());
  return Summary(in.bytes());
}

}  // namespace

Result<ReceiveSummary> ReceiveStream(FileSystem& fs, const std::string& dir, StreamReader& in,
                                     const ReceiveOptions& options) {
  Receiver receiver(fs, dir, options);
  return receiver.Run(in);
}

Result<bool> HasInterruptedReceive(FileSystem& fs, const std::string& dir) {
  return fs.Exists(StatePath(dir));
}

Result<std::string> ReceiveResumeToken(FileSystem& fs, const std::string& dir) {
  ASSIGN_OR_RETURN(bool exists, fs.Exists(StatePath(dir)));
  if (!exists) return Status::NotFound("there is no interrupted receive in " + dir);
  ASSIGN_OR_RETURN(ReceiveState state, LoadState(fs, dir));
  ASSIGN_OR_RETURN(StreamHeader header, DecodeStreamHeader(state.header_bytes));
  ResumeToken t;
  t.header_digest = header.digest;
  t.next_seq = state.next_seq;
  t.next_index = state.next_index;
  t.progress_bytes = state.progress_bytes;
  t.record_count = state.record_count;
  t.data_count = state.data_count;
  t.chain = state.chain;
  if (!header.incremental) t.views = state.views;
  return EncodeToken(t);
}

Status AbortReceive(FileSystem& fs, const std::string& dir) {
  ASSIGN_OR_RETURN(bool exists, fs.Exists(StatePath(dir)));
  if (!exists) return Status::NotFound("there is no interrupted receive in " + dir);
  auto state = LoadState(fs, dir);
  if (state.ok()) {
    // Only the files this receive created; a committing receive's files
    // may already belong to the disk.
    std::set<std::string> keep;
    const std::string dd_path = JoinPath(dir, std::string(kDescriptorFileName));
    if (auto dd = Descriptor::Load(fs, dd_path); dd.ok()) {
      for (const auto& image : dd->images()) keep.insert(image.file);
    }
    std::vector<std::string> names = state->files;
    if (!state->top_file.empty()) names.push_back(state->top_file);
    for (const std::string& name : names) {
      if (keep.count(name)) continue;
      const std::string path = JoinPath(dir, name);
      ASSIGN_OR_RETURN(bool present, fs.Exists(path));
      if (present) TRY(fs.Remove(path));
    }
  }
  TRY(fs.Remove(StatePath(dir)));
  return fs.SyncDir(dir.empty() ? "." : dir);
}

}  // namespace ploop
