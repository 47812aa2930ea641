// The stream sender.
//
// Goal: write a snapshot (or the changes between two snapshots) of a disk
// as a stream at least as fast as the disk can be read, with bounded
// memory, so that `ploop send | ploop receive` keeps up with a plain copy.
//
// Structure (three stages, bounded queues between them):
//
//   reader thread            workers (N)                 calling thread
//   -------------            -----------                 --------------
//   walk indices, read  -->  XXH3-128 per cluster   -->  chain the chunk
//   windows of clusters      (full streams), lz4         digest (one small
//   (one read per run),      frame per chunk, the        SHA-256), content
//   decide records, cut      SHA-256 of the chunk's      digests, write in
//   chunks                   bytes as they travel        order
//
// What is sent, per cluster index i (STREAM.md, "Records"):
//   flatten, full         the snapshot's data at i, unless it is all zeros;
//   flatten, incremental  for i held by a delta above the base: the data,
//                         or a hole when it is zeros; nothing when it equals
//                         what the base reads at i (unchanged);
//   layers                each layer's own cluster at i; an all-zero one is
//                         a hole when a lower layer holds i, else nothing.
// Records go out in (index, layer) order and a chunk always ends at an
// index boundary, so a chunk boundary is fully described by the next index
// and a resumed sender (which starts at the receiver's next index with the
// chain value from the token) cuts the same chunks as an uninterrupted one.
//
// Where the data comes from: the flattened producer takes the snapshot's
// clusters from a ReadAhead (stream_source.h): blocks of up to 4 MiB read
// with direct I/O on reader threads ahead of it, so the disk always has
// the next reads while this process hashes and writes the current ones.
// The workers check, hash and compress the clusters where they lie in the
// blocks; a chunk holds at most kMaxHeldBlocks blocks (a cluster from a
// further one is copied into its payload buffer). With
// SendOptions::map_source the producer maps the chain's files read-only
// instead (MappedSource) and hands the workers pointers into the page
// cache, for a snapshot that is in the cache. Files that do not map (the
// in-memory file system, a fault-injecting one) are then read with pread
// into the chunk's payload buffer. An incremental stream compares each
// cluster with its base's, mapped or read into a buffer. Every way sends
// the same bytes.
//
// Lending: a chunk's payload is written where it lies -- stored clusters
// in read-ahead blocks, the payload buffer or mappings, an lz4 frame in
// its buffer -- with WriteStable, which into a pipe is vmsplice: the pipe
// refers to our pages, and the receiver's read is the only copy of those
// bytes on the way. A write() into a pipe copies them into new pipe pages,
// which the reader then frees, and holds the pipe's lock while it copies,
// so the reader spins; on two cores that cost more than the hashing left
// (tools/bench/README.md, sessions 11 and 12). The reader may pass the
// pages on (splice) and keep them as long as it likes, so they are never
// written again: a read-ahead block, payload buffer or frame buffer lent
// this way has its pages dropped (fresh zeroed ones come at the next use,
// which costs less than the copies saved) before it is reused. Mapped
// pages belong to the chain's files, which stay locked until the writer is
// drained.
//
// Digests: a worker hashes each chunk's bytes as they will travel (header
// fields, records, the payload after compression: fewer bytes than the
// data when lz4 helped) with SHA-256 -- two chunks together when they
// queue up for the workers (sha256_lanes.h: OpenSSL interleaves the two
// messages, about 1.55 times the speed of one); the calling thread only
// chains that body digest to the previous chunk's, so the one sequential
// step is a 64-byte hash. Content digests use XXH3-128 per cluster (an order of
// magnitude cheaper than SHA-256) folded into a SHA-256 chain: a full
// stream's are computed from the records as they go by (workers digest
// the clusters, the calling thread chains them in index order); an
// incremental stream needs its base's digest in the header, before any
// data: taken from the descriptor when the disk recorded it (it received
// those snapshots), else computed by a first pass over the data (phase
// kDigest), and its workers digest no clusters.
//
// Invariants: the chain is open read-only with reader locks for the whole
// send (nobody writes to it meanwhile); memory is a few windows and chunks
// in flight, independent of the disk's size (the BATs excepted, which the
// deltas hold anyway).
//
// Crash ordering: the sender writes nothing but the stream.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "ploop/chain.h"
#include "ploop/delta.h"
#include "ploop/disk.h"
#include "snapshot/sha256_lanes.h"
#include "snapshot/stream.h"
#include "snapshot/stream_format.h"
#include "snapshot/stream_pipeline.h"
#include "snapshot/stream_source.h"

namespace ploop {

namespace {

using namespace stream;

constexpr uint64_t kWindowBytes = 8ull << 20;
// Read-ahead blocks one chunk may hold (ProduceFlat).
constexpr size_t kMaxHeldBlocks = 2;

unsigned WorkerCount(unsigned requested) {
  if (requested != 0) return std::min(requested, 16u);
  return std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
}

// Counts what goes out.
class CountingWriter {
 public:
  explicit CountingWriter(StreamWriter& out) : out_(out) {}
  Status Write(std::span<const std::byte> data) {
    TRY_CTX(out_.Write(data), "write the stream");
    bytes_ += data.size();
    return Status::Ok();
  }
  Status WriteStable(std::span<const std::byte> data) {
    TRY_CTX(out_.WriteStable(data), "write the stream");
    bytes_ += data.size();
    return Status::Ok();
  }
  uint64_t bytes() const { return bytes_; }
  uint64_t referenced_bytes() const { return out_.referenced_bytes(); }

 private:
  StreamWriter& out_;
  uint64_t bytes_ = 0;
};

struct Plan {
  int f = -1;  // level of the base; -1 for a full stream
  int m = 0;   // level of the snapshot sent
  bool layered = false;
  std::vector<int> stream_levels;  // per stream layer, its level in the chain
  StreamHeader header;
  // Content digests of the base and of each stream layer, when the
  // descriptor had them all (incremental streams).
  bool recorded = false;
  std::vector<Digest> layer_digests;
};

struct ChunkJob {
  uint64_t seq = 0;
  std::vector<Record> records;
  uint32_t data_count = 0;
  uint64_t progress_bytes = 0;
  // Where each data cluster's bytes are, in payload order (layer, index):
  // in `payload` (read or copied there) or in a mapping of the source.
  std::vector<const std::byte*> clusters;
  AlignedBuffer payload;  // slot j holds data cluster j when it was read
  // What `clusters` points into outside `payload` (source mappings or
  // read-ahead blocks), kept until the chunk was written; where the
  // read-ahead blocks' bytes that went out by reference are marked.
  std::vector<std::shared_ptr<const void>> holds;
  std::vector<LentPages*> lend_marks;  // of the read-ahead blocks held
  // Per record: its data's position in the payload (data records only).
  std::vector<uint32_t> payload_slot;
  // Filled by a worker:
  std::vector<ClusterDigest> digests;  // payload order (full streams only)
  AlignedBuffer compressed;
  size_t compressed_bytes = 0;
  bool lz4 = false;
  // A stored payload as it travels: `clusters` merged where adjacent.
  std::vector<std::span<const std::byte>> stored;
  // The chunk header (its digest field zero until Emit) and the record
  // table, as they will go out; the SHA-256 of them with the payload.
  std::vector<std::byte> head;
  Digest body{};
};

class Sender {
 public:
  Sender(Chain& chain, const Plan& plan, const SendOptions& options, CountingWriter& out)
      : source_(chain),
        plan_(plan),
        options_(options),
        out_(out),
        cb_(chain.cluster_bytes()),
        workers_(WorkerCount(options.threads)),
        payload_pool_(plan.header.max_chunk_data_bytes()),
        compressed_pool_(Lz4Compressor::Bound(plan.header.max_chunk_data_bytes())) {}

  // The first pass of an incremental stream without recorded digests: the
  // content digests of the base and of every stream layer.
  Status DigestPass(Digest* base, std::vector<Digest>* layers);

  // Writes chunks for indices from `start.next_index` on and the end
  // record.
  Status StreamPass(const ResumeToken& start, SendSummary* summary);

 private:
  // The levels whose own data index i needs in a layered stream.
  uint64_t StreamNeeds(uint64_t index, std::vector<int>& levels) const;
  uint64_t DigestNeeds(uint64_t index, std::vector<int>& levels) const;
  // Appends index i's records of a layered stream (from window `w`) to
  // the chunk being built.
  void AddGroup(const std::shared_ptr<Window>& w, const WindowEntry& e);
  // The layered layout's producer: windows of every layer's clusters.
  Status Produce(const ResumeToken& start, OrderedPipeline<ChunkJob>& pipe);
  // The flattened layout's producer: reads runs of the snapshot straight
  // into chunk payloads (no window, no copy for the common case).
  Status ProduceFlat(const ResumeToken& start, OrderedPipeline<ChunkJob>& pipe);
  Status CutChunk(OrderedPipeline<ChunkJob>& pipe);
  // A worker's part of a chunk: cluster digests, compression, the digest
  // of the chunk's bytes; WorkPair does two chunks, hashing them together.
  Status Work(ChunkJob& job);
  std::pair<Status, Status> WorkPair(ChunkJob& a, ChunkJob& b);
  // All of Work but the digest.
  Status Prepare(ChunkJob& job);
  // The chunk's bytes that its digest covers.
  static ChunkBody BodyOf(const ChunkJob& job);
  // Feeds the measured SHA-256 speed to compress_if's estimates.
  void NoteHashTime(std::chrono::steady_clock::time_point start, uint64_t hashed);
  Status Compress(ChunkJob& job);
  // Fills job.stored from job.clusters.
  void StoredSpans(ChunkJob& job) const;
  Status Emit(ChunkJob& job, Digest* chain);
  void Report(StreamProgress::Phase phase, uint64_t done, uint64_t total) {
    if (options_.progress) options_.progress(StreamProgress{phase, done, total, out_.bytes()});
  }

  SourceChain source_;
  const Plan& plan_;
  const SendOptions& options_;
  CountingWriter& out_;
  const uint64_t cb_;
  const unsigned workers_;
  BufferPool payload_pool_;
  BufferPool compressed_pool_;
  // SHA-256's cost here so far, in picoseconds per byte (a moving average
  // over the chunks hashed; 0 before the first), for compress_if.
  std::atomic<uint64_t> sha_ps_per_byte_{0};

  // The chunk being built by the reader thread.
  struct PendingData {
    uint16_t layer;
    uint64_t index;
    uint32_t record;
    const std::byte* src;
  };
  std::vector<Record> records_;
  std::vector<PendingData> pending_;
  std::vector<std::shared_ptr<Window>> held_windows_;
  uint64_t next_seq_ = 0;
  uint64_t progress_ = 0;        // through the last index added
  uint64_t chunk_progress_ = 0;  // through the chunk's last group

  // Consumer side: per-layer content digest chains (full streams).
  std::vector<ViewChain> views_;
  SendSummary counts_;
};

uint64_t Sender::StreamNeeds(uint64_t i, std::vector<int>& levels) const {
  // Layers: each stream layer's own cluster at i, where it holds one.
  for (int level : plan_.stream_levels) {
    if (source_.Holds(level, i)) levels.push_back(level);
  }
  return levels.size() * cb_;
}

uint64_t Sender::DigestNeeds(uint64_t i, std::vector<int>& levels) const {
  const int hs = source_.Highest(i, plan_.m);
  if (hs < 0) return 0;
  const int hf = source_.Highest(i, plan_.f);
  if (hf >= 0) levels.push_back(hf);
  if (plan_.layered) {
    for (int level : plan_.stream_levels) {
      if (source_.Holds(level, i)) levels.push_back(level);
    }
  } else if (hs != hf) {
    levels.push_back(hs);
  }
  return cb_;
}

Status Sender::DigestPass(Digest* base, std::vector<Digest>* layers) {
  const StreamHeader& h = plan_.header;
  const uint64_t total = source_.CountHeld(0, plan_.m) * cb_;
  ViewChain base_view;
  base_view.Init(source_.level_clusters(plan_.f) * cb_, cb_);
  std::vector<ViewChain> views(h.layers.size());
  for (size_t k = 0; k < views.size(); ++k) views[k].Init(h.layers[k].size_bytes, cb_);

  WindowReader reader(
      source_, [this](uint64_t i, std::vector<int>& levels) { return DigestNeeds(i, levels); }, 0,
      h.disk_clusters(), kWindowBytes);
  struct Job {
    std::unique_ptr<Window> w;
  };
  OrderedPipeline<Job> pipe(workers_, workers_ + 2, [this](Job& job) {
    for (WindowVersion& v : job.w->versions) {
      auto data = job.w->Data(v, cb_);
      v.zero = IsZero(data);
      if (!v.zero) v.digest = ClusterDigestOf(data);
    }
    return Status::Ok();
  });
  Status produced;
  std::thread producer([&] {
    for (;;) {
      auto w = reader.Next();
      if (!w.ok()) {
        produced = w.error();
        break;
      }
      if (*w == nullptr) break;
      auto job = std::make_unique<Job>();
      job->w = std::move(*w);
      if (!pipe.Submit(std::move(job)).ok()) break;
    }
    pipe.Finish();
  });
  Status consumed;
  uint64_t done = 0;
  while (auto next = pipe.Next()) {
    auto& [job, status] = *next;
    if (!status.ok()) {
      consumed = status;
      break;
    }
    const Window& w = *job->w;
    for (const WindowEntry& e : w.entries) {
      const int hf = source_.Highest(e.index, plan_.f);
      if (hf >= 0) {
        const WindowVersion* v = w.Find(e, hf);
        if (!v->zero) base_view.Add(e.index, v->digest);
      }
      for (size_t k = 0; k < views.size(); ++k) {
        const int src = source_.Highest(e.index, plan_.stream_levels[k]);
        if (src < 0) continue;
        const WindowVersion* v = w.Find(e, src);
        if (!v->zero) views[k].Add(e.index, v->digest);
      }
    }
    done += w.progress_bytes;
    Report(StreamProgress::Phase::kDigest, done, total);
    reader.Recycle(std::move(job->w));
  }
  pipe.Cancel();
  producer.join();
  TRY(consumed);
  TRY(produced);
  *base = base_view.state();
  layers->clear();
  for (const ViewChain& v : views) layers->push_back(v.state());
  return Status::Ok();
}

void Sender::AddGroup(const std::shared_ptr<Window>& w, const WindowEntry& e) {
  const uint64_t i = e.index;
  for (size_t k = 0; k < plan_.stream_levels.size(); ++k) {
    const int level = plan_.stream_levels[k];
    const WindowVersion* v = w->Find(e, level);
    if (v == nullptr) continue;
    auto data = w->Data(*v, cb_);
    const auto layer = static_cast<uint16_t>(k);
    if (!IsZero(data)) {
      pending_.push_back(
          PendingData{layer, i, static_cast<uint32_t>(records_.size()), data.data()});
      records_.push_back(Record{i, layer, RecordKind::kData});
    } else if (source_.Highest(i, level - 1) >= 0) {
      records_.push_back(Record{i, layer, RecordKind::kZero});  // hides data below
    }
  }
  if (held_windows_.empty() || held_windows_.back() != w) held_windows_.push_back(w);
}

Status Sender::CutChunk(OrderedPipeline<ChunkJob>& pipe) {
  if (records_.empty()) return Status::Ok();
  auto job = std::make_unique<ChunkJob>();
  job->seq = next_seq_++;
  job->progress_bytes = chunk_progress_;
  job->data_count = static_cast<uint32_t>(pending_.size());
  job->payload_slot.assign(records_.size(), 0);
  // Payload order: by layer, then index (records are by index, then layer).
  std::stable_sort(pending_.begin(), pending_.end(),
                   [](const PendingData& a, const PendingData& b) { return a.layer < b.layer; });
  if (!pending_.empty()) {
    job->payload = payload_pool_.Get();
    for (size_t j = 0; j < pending_.size(); ++j) {
      std::memcpy(job->payload.get() + j * cb_, pending_[j].src, cb_);
      job->clusters.push_back(job->payload.get() + j * cb_);
      job->payload_slot[pending_[j].record] = static_cast<uint32_t>(j);
    }
  }
  job->records = std::move(records_);
  records_.clear();
  pending_.clear();
  held_windows_.clear();
  return pipe.Submit(std::move(job));
}

Status Sender::Produce(const ResumeToken& start, OrderedPipeline<ChunkJob>& pipe) {
  const StreamHeader& h = plan_.header;
  WindowReader reader(
      source_, [this](uint64_t i, std::vector<int>& levels) { return StreamNeeds(i, levels); },
      start.next_index, h.disk_clusters(), kWindowBytes);
  next_seq_ = start.next_seq;
  progress_ = start.progress_bytes;
  chunk_progress_ = progress_;
  for (;;) {
    ASSIGN_OR_RETURN(auto next, reader.Next());
    if (next == nullptr) break;
    std::shared_ptr<Window> w(next.release(),
                              [&reader](Window* p) { reader.Recycle(std::unique_ptr<Window>(p)); });
    for (const WindowEntry& e : w->entries) {
      const size_t records_before = records_.size();
      const size_t data_before = pending_.size();
      // Decide the group's records first, then cut the chunk before it if
      // it does not fit: chunks end at index boundaries.
      AddGroup(w, e);
      const size_t group_records = records_.size() - records_before;
      const size_t group_data = pending_.size() - data_before;
      if (records_before > 0 &&
          (records_.size() > kMaxChunkRecords || pending_.size() * cb_ > kChunkDataBytes)) {
        // Move the group out, cut, and put it back as the next chunk's start.
        std::vector<Record> group(records_.end() - group_records, records_.end());
        std::vector<PendingData> group_data_v(pending_.end() - group_data, pending_.end());
        records_.resize(records_before);
        pending_.resize(data_before);
        TRY(CutChunk(pipe));
        held_windows_.push_back(w);  // the group's data is in this window
        for (PendingData& d : group_data_v) d.record -= static_cast<uint32_t>(records_before);
        records_ = std::move(group);
        pending_ = std::move(group_data_v);
      }
      progress_ += e.progress_bytes;
      if (group_records > 0) chunk_progress_ = progress_;
    }
  }
  return CutChunk(pipe);
}

Status Sender::ProduceFlat(const ResumeToken& start, OrderedPipeline<ChunkJob>& pipe) {
  const StreamHeader& h = plan_.header;
  const uint64_t clusters = h.disk_clusters();
  const uint64_t slots = std::max<uint64_t>(1, kChunkDataBytes / cb_);
  const bool incremental = plan_.f >= 0;
  // The level of the snapshot's cluster i when a delta above the base (any
  // delta, for a full stream) holds it, else -1; such an index is a
  // candidate.
  auto level_above_base = [&](uint64_t i) {
    const int level = source_.Highest(i, plan_.m);
    return level > plan_.f ? level : -1;
  };
  auto candidate = [&](uint64_t i) { return level_above_base(i) >= 0; };
  AlignedBuffer base;  // the base's run, read where it does not map
  MappedSource mapped(source_, options_.map_source);
  // The snapshot's clusters come from the read-ahead (direct reads, ahead
  // of this thread) unless the caller asked for mappings.
  std::optional<ReadAhead> ahead;
  if (!options_.map_source) {
    ahead.emplace(source_, level_above_base, start.next_index, clusters);
  }
  // A cluster where it lies (data nullptr: no layer holds it, zeros), with
  // what keeps it there.
  using Piece = ReadAhead::Piece;
  // Clusters [i, j) of the view at `max_level`, mapped: one piece each.
  // False, `out` empty, when one does not map; the run is then read
  // instead (one read per piece of it that is contiguous in a file).
  auto map_run = [&](int max_level, uint64_t i, uint64_t j, std::vector<Piece>& out) {
    out.clear();
    for (uint64_t k = i; k < j; ++k) {
      const int level = source_.Highest(k, max_level);
      if (level < 0) {
        out.emplace_back();
        continue;
      }
      MappedSource::Piece piece = mapped.Cluster(level, k);
      if (piece.data == nullptr) {
        out.clear();
        return false;
      }
      out.push_back(Piece{piece.data, std::move(piece.mapping)});
    }
    return true;
  };
  // The snapshot's clusters [i, j) (every one a candidate): from the
  // read-ahead, or mapped; false when they must be read here.
  auto take_run = [&](uint64_t i, uint64_t j, std::vector<Piece>& out) -> Result<bool> {
    if (!ahead) return map_run(plan_.m, i, j, out);
    out.clear();
    for (uint64_t k = i; k < j; ++k) {
      ASSIGN_OR_RETURN(ReadAhead::Piece piece, ahead->Cluster(k));
      out.push_back(Piece{piece.data, std::move(piece.hold), piece.lent});
    }
    return true;
  };
  std::vector<Piece> pieces;       // the run's clusters
  std::vector<Piece> base_pieces;  // the base's (incremental)
  next_seq_ = start.next_seq;
  progress_ = start.progress_bytes;
  std::unique_ptr<ChunkJob> job;
  uint64_t used = 0;  // data clusters of the chunk so far (its payload slots)
  auto cut = [&]() -> Status {
    if (job == nullptr) return Status::Ok();
    std::unique_ptr<ChunkJob> done = std::move(job);
    if (done->records.empty()) {
      payload_pool_.Put(std::move(done->payload));
      return Status::Ok();
    }
    done->seq = next_seq_++;
    done->progress_bytes = chunk_progress_;
    done->data_count = static_cast<uint32_t>(used);
    used = 0;
    return pipe.Submit(std::move(done));
  };
  for (uint64_t i = start.next_index; i < clusters;) {
    if (!candidate(i)) {
      ++i;
      continue;
    }
    if (job == nullptr) job = std::make_unique<ChunkJob>();
    // A run of candidates, no longer than the free slots and records.
    const uint64_t room = std::min<uint64_t>(slots - used, kMaxChunkRecords - job->records.size());
    uint64_t j = i + 1;
    while (j < clusters && j - i < room && candidate(j)) ++j;
    // The run's clusters (every one held above the base), mapped or read
    // into the payload buffer.
    ASSIGN_OR_RETURN(const bool run_mapped, take_run(i, j, pieces));
    std::byte* first = nullptr;
    if (!run_mapped) {
      if (job->payload == nullptr) job->payload = payload_pool_.Get();
      first = job->payload.get() + used * cb_;
      TRY(source_.ReadView(plan_.m, i, j - i, std::span<std::byte>(first, (j - i) * cb_)));
    }
    // What the base reads there, likewise.
    const bool base_mapped = incremental && map_run(plan_.f, i, j, base_pieces);
    if (incremental && !base_mapped) {
      if (base == nullptr) base = NewAlignedBuffer(slots * cb_);
      TRY(source_.ReadView(plan_.f, i, j - i, std::span<std::byte>(base.get(), (j - i) * cb_)));
    }
    for (uint64_t k = i; k < j; ++k) {
      const std::byte* data = run_mapped ? pieces[k - i].data : first + (k - i) * cb_;
      const bool zero = IsZero(std::span<const std::byte>(data, cb_));
      RecordKind kind = RecordKind::kData;
      bool send = !zero;
      if (incremental) {
        // Unchanged clusters stay home.
        const std::byte* old = base_mapped ? base_pieces[k - i].data : base.get() + (k - i) * cb_;
        send = old == nullptr ? !zero : std::memcmp(data, old, cb_) != 0;
        if (zero) kind = RecordKind::kZero;
      }
      progress_ += cb_;
      if (!send) continue;
      if (kind == RecordKind::kData) {
        if (!run_mapped) {
          // Compact: the slot of this cluster may be past the first free one.
          std::byte* slot = job->payload.get() + used * cb_;
          if (slot != data) std::memmove(slot, data, cb_);
          data = slot;
        } else if (const auto& hold = pieces[k - i].hold;
                   job->holds.empty() || job->holds.back() != hold) {
          if (ahead && job->holds.size() >= kMaxHeldBlocks) {
            // A chunk that gathers its data from many read-ahead blocks
            // (few data clusters among zeros) copies it instead of holding
            // them all: memory stays a few blocks per chunk in flight.
            if (job->payload == nullptr) job->payload = payload_pool_.Get();
            std::byte* slot = job->payload.get() + used * cb_;
            std::memcpy(slot, data, cb_);
            data = slot;
          } else {
            job->holds.push_back(hold);
            if (pieces[k - i].lent != nullptr) job->lend_marks.push_back(pieces[k - i].lent);
          }
        }
        job->clusters.push_back(data);
        job->payload_slot.push_back(static_cast<uint32_t>(used));
        ++used;
      } else {
        job->payload_slot.push_back(0);
      }
      job->records.push_back(Record{k, 0, kind});
      chunk_progress_ = progress_;
    }
    i = j;
    if (used == slots || job->records.size() == kMaxChunkRecords) TRY(cut());
  }
  return cut();
}

Status Sender::Prepare(ChunkJob& job) {
  const uint64_t raw = uint64_t{job.data_count} * cb_;
  if (!plan_.header.incremental) {
    // A full stream's content digests come from the data it carries.
    job.digests.resize(job.data_count);
    for (uint32_t j = 0; j < job.data_count; ++j) {
      job.digests[j] = ClusterDigestOf(std::span<const std::byte>(job.clusters[j], cb_));
    }
  }
  TRY(Compress(job));
  if (!job.lz4) StoredSpans(job);
  ChunkHeader ch;
  ch.flags = job.lz4 ? kChunkLz4 : 0;
  ch.seq = job.seq;
  ch.record_count = static_cast<uint32_t>(job.records.size());
  ch.data_count = job.data_count;
  ch.payload_bytes = job.lz4 ? job.compressed_bytes : raw;
  ch.progress_bytes = job.progress_bytes;
  EncodeRecords(job.records, job.head);
  job.head.insert(job.head.begin(), kChunkHeaderBytes, std::byte{0});
  EncodeChunkHeader(ch, std::span(job.head).first<kChunkHeaderBytes>());
  return Status::Ok();
}

ChunkBody Sender::BodyOf(const ChunkJob& job) {
  ChunkBody body;
  body.header_prefix = std::span(job.head).first(kChunkHeaderDigestedBytes);
  body.records = std::span(job.head).subspan(kChunkHeaderBytes);
  if (job.lz4) {
    body.payload = std::span<const std::byte>(job.compressed.get(), job.compressed_bytes);
  } else {
    body.payload_pieces = job.stored;
  }
  return body;
}

void Sender::NoteHashTime(std::chrono::steady_clock::time_point start, uint64_t hashed) {
  if (!options_.compress_if || hashed < (256u << 10)) return;
  const uint64_t ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count());
  const uint64_t ps = ns * 1000 / hashed;
  // Racy between workers, and harmless: an average either way.
  const uint64_t old = sha_ps_per_byte_.load(std::memory_order_relaxed);
  sha_ps_per_byte_.store(old == 0 ? ps : (old * 7 + ps) / 8, std::memory_order_relaxed);
}

Status Sender::Work(ChunkJob& job) {
  TRY(Prepare(job));
  const auto start = std::chrono::steady_clock::now();
  const ChunkBody body = BodyOf(job);
  job.body = ChunkBodyDigest(body);
  NoteHashTime(start, body.bytes());
  return Status::Ok();
}

std::pair<Status, Status> Sender::WorkPair(ChunkJob& a, ChunkJob& b) {
  Status sa = Prepare(a);
  Status sb = Prepare(b);
  if (!sa.ok() || !sb.ok()) {
    if (sa.ok()) a.body = ChunkBodyDigest(BodyOf(a));
    if (sb.ok()) b.body = ChunkBodyDigest(BodyOf(b));
    return {std::move(sa), std::move(sb)};
  }
  // The two chunks' SHA-256 together: the one step that dominates the
  // sender's CPU time, in about 0.65 of the time of one after the other.
  const auto start = std::chrono::steady_clock::now();
  const ChunkBody body_a = BodyOf(a);
  const ChunkBody body_b = BodyOf(b);
  const std::array<Digest, 2> d = ChunkBodyDigests(body_a, body_b);
  a.body = d[0];
  b.body = d[1];
  NoteHashTime(start, body_a.bytes() + body_b.bytes());
  return {std::move(sa), std::move(sb)};
}

Status Sender::Compress(ChunkJob& job) {
  if (!options_.compress || job.data_count == 0) return Status::Ok();
  thread_local std::unique_ptr<Lz4Compressor> compressor;
  if (compressor == nullptr) {
    ASSIGN_OR_RETURN(compressor, Lz4Compressor::Create());
  }
  const size_t raw = uint64_t{job.data_count} * cb_;
  const Lz4Compressor::Sample sample = compressor->SampleCompression(job.clusters, cb_);
  if (!Lz4Compressor::Shrinks(sample)) return Status::Ok();
  if (options_.compress_if) {
    CompressionEstimate e;
    e.sampled_bytes = sample.raw;
    e.packed_bytes = sample.packed;
    e.sample_ns = sample.ns;
    e.sha_ns_per_byte =
        static_cast<double>(sha_ps_per_byte_.load(std::memory_order_relaxed)) / 1000.0;
    if (!options_.compress_if(e)) return Status::Ok();
  }
  // lz4 takes one buffer: the clusters where they lie when they follow
  // each other (one run of a file, or the payload buffer), else gathered
  // into the payload buffer (slot j for cluster j; a cluster read there
  // already is in its slot).
  const std::byte* data = job.clusters[0];
  for (uint32_t j = 1; j < job.data_count && data != nullptr; ++j) {
    if (job.clusters[j] != data + j * cb_) data = nullptr;
  }
  if (data == nullptr) {
    if (job.payload == nullptr) job.payload = payload_pool_.Get();
    for (uint32_t j = 0; j < job.data_count; ++j) {
      std::byte* slot = job.payload.get() + j * cb_;
      if (job.clusters[j] != slot) std::memcpy(slot, job.clusters[j], cb_);
    }
    data = job.payload.get();
  }
  job.compressed = compressed_pool_.Get();
  ASSIGN_OR_RETURN(size_t n, compressor->Compress(std::span<const std::byte>(data, raw),
                                                  std::span<std::byte>(job.compressed.get(),
                                                                       Lz4Compressor::Bound(raw))));
  if (n < raw) {
    job.lz4 = true;
    job.compressed_bytes = n;
  } else {
    compressed_pool_.Put(std::move(job.compressed));
  }
  return Status::Ok();
}

void Sender::StoredSpans(ChunkJob& job) const {
  job.stored.clear();
  for (uint32_t j = 0; j < job.data_count; ++j) {
    const std::byte* p = job.clusters[j];
    if (!job.stored.empty()) {
      std::span<const std::byte>& last = job.stored.back();
      // Merge with the span before when adjacent.
      if (last.data() + last.size() == p) {
        last = std::span<const std::byte>(last.data(), last.size() + cb_);
        continue;
      }
    }
    job.stored.emplace_back(p, cb_);
  }
}

Status Sender::Emit(ChunkJob& job, Digest* chain) {
  const Digest digest = ChainDigest(*chain, job.body);
  std::memcpy(job.head.data() + kChunkHeaderDigestedBytes, digest.data(), kDigestBytes);
  *chain = digest;
  // Header and records in one write, the payload (up to 4 MiB) straight
  // from where it lies, by reference into a pipe (see "Lending" above).
  TRY(out_.Write(job.head));
  // The pipe may refer to what went by reference for as long as it likes,
  // even after a failed write: those pages are dropped before their
  // buffers are written into again. A buffer whose pages could not be
  // dropped is unmapped, not reused.
  const uint64_t referenced = out_.referenced_bytes();
  Status written;
  if (job.lz4) {
    written =
        out_.WriteStable(std::span<const std::byte>(job.compressed.get(), job.compressed_bytes));
    if (out_.referenced_bytes() != referenced) {
      // Only the huge pages the frame used.
      LentPages frame;
      frame.Attach(job.compressed.get(), compressed_pool_.buffer_bytes());
      frame.Mark(job.compressed.get(), job.compressed_bytes);
      if (!frame.Drop()) job.compressed.reset();
    }
  } else {
    for (std::span<const std::byte> span : job.stored) {
      written = out_.WriteStable(span);
      if (!written.ok()) break;
    }
    if (out_.referenced_bytes() != referenced) {
      // Clusters in read-ahead blocks: the pages under them, when the
      // block is let go.
      for (LentPages* lent : job.lend_marks) {
        for (std::span<const std::byte> span : job.stored) lent->Mark(span.data(), span.size());
      }
      // Clusters in the payload buffer: all of it, now.
      if (job.payload != nullptr &&
          !DropIoMemoryPages(job.payload.get(), payload_pool_.buffer_bytes())) {
        job.payload.reset();
      }
    }
  }
  TRY(written);
  job.lend_marks.clear();  // they point into the blocks held
  job.holds.clear();
  // Content digests of a full stream, index by index: layer k reads the
  // highest record at or below k (a hole reads zeros), or zeros.
  if (!plan_.header.incremental) {
    for (size_t r = 0; r < job.records.size();) {
      size_t end = r;
      while (end < job.records.size() && job.records[end].index == job.records[r].index) ++end;
      const ClusterDigest* current = nullptr;
      size_t next = r;
      for (size_t k = 0; k < views_.size(); ++k) {
        while (next < end && job.records[next].layer == k) {
          current = job.records[next].kind == RecordKind::kData
                        ? &job.digests[job.payload_slot[next]]
                        : nullptr;
          ++next;
        }
        if (current != nullptr) views_[k].Add(job.records[r].index, *current);
      }
      r = end;
    }
  }
  for (const Record& rec : job.records) {
    if (rec.kind == RecordKind::kData) {
      ++counts_.data_clusters;
    } else {
      ++counts_.zero_clusters;
    }
  }
  ++counts_.chunks;
  payload_pool_.Put(std::move(job.payload));
  compressed_pool_.Put(std::move(job.compressed));
  Report(StreamProgress::Phase::kTransfer, job.progress_bytes, plan_.header.total_bytes);
  return Status::Ok();
}

Status Sender::StreamPass(const ResumeToken& start, SendSummary* summary) {
  const StreamHeader& h = plan_.header;
  views_.assign(h.layers.size(), ViewChain());
  for (size_t k = 0; k < views_.size(); ++k) {
    views_[k].Init(h.layers[k].size_bytes, cb_);
    if (k < start.views.size()) views_[k].set_state(start.views[k]);
  }
  Digest chain = start.chain;
  uint64_t record_count = start.record_count;
  uint64_t data_count = start.data_count;
  uint64_t chunk_count = start.next_seq;

  // Chunks are paired only where hashing two at once is faster.
  OrderedPipeline<ChunkJob>::PairWork pair;
  if (Sha256TwoLanes()) pair = [this](ChunkJob& a, ChunkJob& b) { return WorkPair(a, b); };
  OrderedPipeline<ChunkJob> pipe(
      workers_, workers_ + 2, [this](ChunkJob& j) { return Work(j); }, std::move(pair));
  Status produced;
  std::thread producer([&] {
    produced = plan_.layered ? Produce(start, pipe) : ProduceFlat(start, pipe);
    pipe.Finish();
  });
  Status consumed;
  while (auto next = pipe.Next()) {
    auto& [job, status] = *next;
    consumed = status.ok() ? Emit(*job, &chain) : status;
    if (!consumed.ok()) break;
    record_count += job->records.size();
    data_count += job->data_count;
    ++chunk_count;
  }
  pipe.Cancel();
  producer.join();
  TRY(consumed);
  TRY(produced);

  EndRecord end;
  end.chunk_count = chunk_count;
  end.record_count = record_count;
  end.data_count = data_count;
  if (h.incremental) {
    end.layer_digests = plan_.layer_digests;
  } else {
    for (const ViewChain& v : views_) end.layer_digests.push_back(v.state());
  }
  TRY(out_.Write(EncodeEndRecord(end, chain)));
  Report(StreamProgress::Phase::kTransfer, h.total_bytes, h.total_bytes);
  *summary = counts_;
  summary->stream_bytes = out_.bytes();
  return Status::Ok();
}

// Resolves the snapshots and builds the header (without the incremental
// digests, which need the chain open).
Result<Plan> MakePlan(const Descriptor& dd, const std::vector<DescriptorImage>& images,
                      Chain& chain, const SendOptions& options, const std::string& base_guid) {
  Plan plan;
  plan.m = static_cast<int>(images.size()) - 1;
  plan.layered = options.layout == StreamLayout::kLayers;
  const uint64_t cb = chain.cluster_bytes();
  if (!base_guid.empty()) {
    for (int level = 0; level < plan.m; ++level) {
      if (images[level].guid == base_guid) plan.f = level;
    }
  }
  StreamHeader& h = plan.header;
  h.incremental = plan.f >= 0;
  h.layered = plan.layered;
  h.cluster_bytes = static_cast<uint32_t>(cb);
  h.disk_size_bytes = chain.size_bytes();
  for (size_t level = 0; level < chain.depth(); ++level) {
    if (chain.layer(level).size_bytes() % cb != 0) {
      return Status::NotSupported("delta " + images[level].guid + " (" + images[level].file +
                                  ") is not a whole number of clusters; streams carry whole "
                                  "clusters");
    }
  }
  h.cylinders = dd.cylinders();
  h.heads = dd.heads();
  if (h.cylinders == 0 || h.heads == 0) {
    ASSIGN_OR_RETURN(ploop::Header chs, MakeHeader(h.disk_size_bytes, cb));
    h.cylinders = chs.cylinders;
    h.heads = chs.heads;
  }
  h.base_guid = h.incremental ? images[plan.f].guid : std::string(kNullGuid);
  if (plan.layered) {
    for (int level = plan.f + 1; level <= plan.m; ++level) plan.stream_levels.push_back(level);
  } else {
    plan.stream_levels.push_back(plan.m);
  }
  if (plan.stream_levels.size() > kMaxLayers ||
      plan.stream_levels.size() * cb > kMaxIndexGroupBytes) {
    return Status::NotSupported(std::to_string(plan.stream_levels.size()) + " layers of " +
                                std::to_string(cb) +
                                "-byte clusters are more than a stream carries; use --flatten");
  }
  std::string parent = h.base_guid;
  for (int level : plan.stream_levels) {
    LayerEntry layer;
    layer.guid = images[level].guid;
    layer.parent_guid = parent;
    layer.size_bytes = chain.layer(level).size_bytes();
    parent = layer.guid;
    h.layers.push_back(layer);
  }
  // The flattened layer has the snapshot's size (its top delta's).
  h.layers.back().size_bytes = h.disk_size_bytes;
  uint64_t entries = 0;
  for (size_t k = 0; k < h.layers.size(); ++k) {
    h.layers[k].size_bytes = std::min(h.layers[k].size_bytes, h.disk_size_bytes);
    entries += h.layers[k].size_bytes / cb;
  }
  if (entries > kMaxBatEntries) {
    return Status::NotSupported("the layers have more clusters together than a receiver holds (" +
                                std::to_string(kMaxBatEntries) + "); use --flatten");
  }
  return plan;
}

}  // namespace

bool CompressionPaysOff(const CompressionEstimate& e) {
  if (e.sampled_bytes == 0 || e.sample_ns == 0 || e.sha_ns_per_byte <= 0) return true;
  if (e.packed_bytes >= e.sampled_bytes) return false;
  const double saved =
      static_cast<double>(e.sampled_bytes - e.packed_bytes) / static_cast<double>(e.sampled_bytes);
  const double lz4_ns = static_cast<double>(e.sample_ns) / static_cast<double>(e.sampled_bytes);
  return saved * 2 * e.sha_ns_per_byte > lz4_ns * 1.25;
}

Result<SendSummary> SendStream(FileSystem& fs, const std::string& dd_path, StreamWriter& out,
                               const SendOptions& options, const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  std::string guid = dd.top_guid();
  if (!options.guid.empty()) {
    ASSIGN_OR_RETURN(guid, ParseGuid(options.guid));
  }
  if (dd.FindImage(guid) == nullptr) return Status::NotFound("no snapshot " + guid);
  ASSIGN_OR_RETURN(std::vector<DescriptorImage> images, dd.ChainTo(guid));
  for (const DescriptorImage& image : images) {
    if (dd.FindShot(image.guid)->temporary) {
      return Status::FailedPrecondition("a merge into " + image.guid +
                                        " was interrupted; run check --repair first");
    }
  }
  std::string base_guid;
  if (!options.from_guid.empty()) {
    ASSIGN_OR_RETURN(base_guid, ParseGuid(options.from_guid));
    if (dd.FindImage(base_guid) == nullptr) return Status::NotFound("no snapshot " + base_guid);
    if (base_guid == guid) {
      return Status::InvalidArgument("--from names the snapshot being sent; nothing to send");
    }
    bool below = false;
    for (size_t i = 0; i + 1 < images.size(); ++i) below |= images[i].guid == base_guid;
    if (!below) {
      return Status::InvalidArgument(base_guid + " is not an ancestor of " + guid +
                                     "; an incremental stream starts from an older snapshot "
                                     "of the same chain");
    }
  }
  OpenOptions open;
  ASSIGN_OR_RETURN(auto chain, Chain::Open(fs, dd, guid, open));
  // A mapped source puts the chain's own pages into the pipe (WriteStable):
  // wait until the receiver took them before the chain (and its locks)
  // goes, on every way out, so nobody can change them meanwhile. Pages of
  // our read-ahead buffers need no wait: those buffers are never written
  // again in place (see "Lending").
  struct DrainFirst {
    StreamWriter& out;
    bool mapped;
    ~DrainFirst() {
      if (mapped) out.Drain().IgnoreError();
    }
  } drain_first{out, options.map_source};
  ASSIGN_OR_RETURN(Plan plan, MakePlan(dd, images, *chain, options, base_guid));
  StreamHeader& h = plan.header;
  SourceChain counter(*chain);
  uint64_t total = 0;
  if (plan.layered) {
    for (int level : plan.stream_levels) total += counter.CountHeld(level, level);
  } else {
    total = counter.CountHeld(plan.f + 1, plan.m);
  }
  h.total_bytes = total * h.cluster_bytes;

  CountingWriter writer(out);
  std::unique_ptr<Sender> sender(new Sender(*chain, plan, options, writer));
  if (h.incremental) {
    // The base's and the layers' content digests: recorded ones when the
    // descriptor has all of them, else a pass over the data.
    plan.recorded = ParseContentDigest(dd.FindShot(h.base_guid)->content_digest, &h.base_digest);
    for (const LayerEntry& layer : h.layers) {
      Digest d;
      plan.recorded =
          plan.recorded && ParseContentDigest(dd.FindShot(layer.guid)->content_digest, &d);
      plan.layer_digests.push_back(d);
    }
    if (!plan.recorded) TRY(sender->DigestPass(&h.base_digest, &plan.layer_digests));
  }
  std::vector<std::byte> header_bytes = EncodeStreamHeader(h);

  ResumeToken start;
  start.chain = h.digest;
  if (!options.resume_token.empty()) {
    ASSIGN_OR_RETURN(start, DecodeToken(options.resume_token));
    if (start.header_digest != h.digest) {
      return Status::FailedPrecondition(
          "the resume token belongs to another stream (other snapshots, options or disk "
          "content); give the same -u, --from and --flatten/--layers as the interrupted send");
    }
    if (start.next_index > h.disk_clusters() || start.progress_bytes > h.total_bytes ||
        start.views.size() != (h.incremental ? 0 : h.layers.size())) {
      return Status::InvalidArgument("bad resume token: its position is not in this stream");
    }
  }
  TRY(writer.Write(header_bytes));
  if (!options.resume_token.empty()) {
    std::array<std::byte, kResumeRecordBytes> rec;
    EncodeResumeRecord(ResumeRecord{start.next_seq, start.next_index, start.chain}, rec);
    TRY(writer.Write(rec));
  }
  SendSummary summary;
  TRY(sender->StreamPass(start, &summary));
  return summary;
}

}  // namespace ploop
