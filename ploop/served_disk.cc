// ServedDisk: the concurrent data path over a Chain (see served_disk.h).
//
// Invariants, with requests running at once:
//   (1) a top BAT entry, once published, points at a cluster whose every
//       byte was written first (Delta::PublishCluster() after the pwrite),
//       so a reader sees either the old mapping (the layers below, or
//       zeros) or the whole new cluster;
//   (2) only the holder of a cluster's lock maps, unmaps or re-zeroes that
//       cluster; lock-free writers touch only clusters already mapped, in
//       place, which is what a block device allows anyway (two writes to one
//       sector at once land in either order);
//   (3) a file cluster freed by a discard is reused or punched only after
//       the BAT that frees it is durable AND every request that entered
//       before (and so might have looked the old mapping up) has left: the
//       top's reuse barrier is the gate's grace period;
//   (4) the layer list changes only while the gate is closed (no request in
//       flight, new ones waiting) and layers_mu_ is held exclusively (no
//       Flush() running); requests read layers_ after entering the gate,
//       which orders them after the change.
//
// Crash ordering is the top Delta's (Delta::Flush()): every entry a Flush()
// writes points at data synced by that same Flush() before the BAT pages;
// punched holes and the one-byte write that makes a zero cluster reach EOF
// are made durable by the same data sync.
#include "ploop/served_disk.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ploop/delta.h"
#include "ploop/raw_image.h"

namespace ploop {

namespace {

Status Put(BlockFile& file, uint64_t offset, std::span<const std::byte> data,
           ServedDisk::Caching caching) {
  return caching == ServedDisk::Caching::kBuffered ? file.WriteAtBuffered(offset, data)
                                                   : file.WriteAt(offset, data);
}

Status Closed() { return Status::FailedPrecondition("the disk is closed"); }

}  // namespace

class ServedDisk::Quiesced {
 public:
  explicit Quiesced(ServedDisk& disk) : disk_(disk) {
    disk_.gate_.Close();                         // no request in flight, new ones wait
    lock_ = std::unique_lock(disk_.layers_mu_);  // no Flush() running
  }
  ~Quiesced() {
    lock_.unlock();
    disk_.gate_.Open();
  }

 private:
  ServedDisk& disk_;
  std::unique_lock<std::shared_mutex> lock_;
};

ServedDisk::ServedDisk(std::unique_ptr<Chain> chain, ServedDiskOptions options)
    : chain_(std::move(chain)),
      cluster_bytes_(chain_->cluster_bytes()),
      options_(options),
      writable_(chain_->writable()) {
  RebuildLayers();
}

ServedDisk::~ServedDisk() { Close().IgnoreError(); }

Result<std::unique_ptr<ServedDisk>> ServedDisk::Create(std::unique_ptr<Chain> chain,
                                                       ServedDiskOptions options) {
  if (chain == nullptr || chain->depth() == 0) {
    return Status::FailedPrecondition("a served disk needs an open chain");
  }
  std::unique_ptr<ServedDisk> disk(new ServedDisk(std::move(chain), options));
  if (disk->writable_ && disk->top_delta_ != nullptr) TRY(disk->top_delta_->BeginWrites());
  return disk;
}

void ServedDisk::RebuildLayers() {
  layers_.clear();
  for (size_t i = 0; i < chain_->depth(); ++i) {
    Image& image = chain_->layer(i);
    Layer layer;
    layer.image = &image;
    layer.delta = dynamic_cast<Delta*>(&image);
    layer.file =
        layer.delta != nullptr ? &layer.delta->file() : &dynamic_cast<RawImage&>(image).file();
    layer.size_bytes = image.size_bytes();
    if (options_.direct_io) {
      // Best effort: a file system without direct I/O stays buffered.
      if (auto align = layer.file->EnableDirectIo(); align.ok()) {
        io_alignment_ = std::max(io_alignment_, *align);
      }
    }
    layers_.push_back(layer);
  }
  top_delta_ = layers_.back().delta;
  writable_ = chain_->writable();
  size_bytes_.store(chain_->size_bytes(), std::memory_order_release);
  depth_.store(layers_.size(), std::memory_order_relaxed);
  if (writable_ && top_delta_ != nullptr) {
    top_delta_->set_reuse_barrier([this] { gate_.Synchronize(); });
  }
}

ServedDisk::Location ServedDisk::Find(uint64_t cluster_index, int max_level) const {
  for (int level = max_level; level >= 0; --level) {
    const Layer& layer = layers_[level];
    if (layer.delta != nullptr) {
      if (cluster_index < layer.delta->bat_entries()) {
        if (uint64_t off = layer.delta->ClusterFileOffset(cluster_index); off != 0) {
          return {level, off};
        }
      }
    } else if (cluster_index * cluster_bytes_ < layer.size_bytes) {
      return {level, cluster_index * cluster_bytes_};  // a raw base holds all it covers
    }
  }
  return {};
}

Status ServedDisk::ReadBelow(int max_level, uint64_t offset, std::span<std::byte> out) {
  Location loc = Find(offset / cluster_bytes_, max_level);
  uint64_t avail = 0;
  if (loc.level >= 0) {
    const Layer& layer = layers_[loc.level];
    // A lower layer may be smaller than the disk: past its end reads zeros.
    avail =
        offset < layer.size_bytes ? std::min<uint64_t>(out.size(), layer.size_bytes - offset) : 0;
    if (avail > 0) {
      TRY(layer.file->ReadAt(loc.file_offset + offset % cluster_bytes_, out.first(avail)));
    }
  }
  std::memset(out.data() + avail, 0, out.size() - avail);
  return Status::Ok();
}

Status ServedDisk::Read(uint64_t offset, std::span<std::byte> out) {
  IoGate::Pass pass = gate_.Enter();
  Status s = ReadImpl(offset, out);
  counters_.reads.fetch_add(1, std::memory_order_relaxed);
  if (s.ok()) {
    counters_.bytes_read.fetch_add(out.size(), std::memory_order_relaxed);
  } else {
    counters_.errors.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

template <typename Visit>
bool ServedDisk::ForEachReadRun(uint64_t offset, uint64_t length, Visit visit) const {
  const uint64_t cb = cluster_bytes_;
  const int top = static_cast<int>(layers_.size()) - 1;
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t voff = offset + pos;
    const uint64_t idx = voff / cb;
    const Location loc = Find(idx, top);
    // Extend the run over clusters that come from the same layer and follow
    // each other in its file: one read for all of them.
    uint64_t run = std::min<uint64_t>(cb - voff % cb, length - pos);
    for (uint64_t k = 1; pos + run < length; ++k) {
      Location next = Find(idx + k, top);
      if (next.level != loc.level ||
          (loc.level >= 0 && next.file_offset != loc.file_offset + k * cb)) {
        break;
      }
      run += std::min<uint64_t>(cb, length - pos - run);
    }
    ReadRun r{nullptr, 0, pos, run, 0};
    if (loc.level >= 0) {
      const Layer& layer = layers_[loc.level];
      r.file = layer.file;
      r.file_offset = loc.file_offset + voff % cb;
      // A lower layer may be smaller than the disk: past its end reads zeros.
      r.avail = voff < layer.size_bytes ? std::min<uint64_t>(run, layer.size_bytes - voff) : 0;
    }
    if (!visit(r)) return false;
    pos += run;
  }
  return true;
}

Status ServedDisk::ReadImpl(uint64_t offset, std::span<std::byte> out) {
  if (closed_.load(std::memory_order_acquire)) return Closed();
  TRY(CheckDiskRange(offset, out.size(), size_bytes()));
  Status s;
  ForEachReadRun(offset, out.size(), [&](const ReadRun& r) {
    auto piece = out.subspan(r.pos, r.length);
    if (r.avail > 0) s = r.file->ReadAt(r.file_offset, piece.first(r.avail));
    std::memset(piece.data() + r.avail, 0, r.length - r.avail);
    return s.ok();
  });
  return s;
}

Status ServedDisk::Write(uint64_t offset, std::span<const std::byte> data, Caching caching) {
  IoGate::Pass pass = gate_.Enter();
  Status s = WriteImpl(offset, data, caching);
  counters_.writes.fetch_add(1, std::memory_order_relaxed);
  if (s.ok()) {
    counters_.bytes_written.fetch_add(data.size(), std::memory_order_relaxed);
  } else {
    counters_.errors.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

Status ServedDisk::WriteImpl(uint64_t offset, std::span<const std::byte> data, Caching caching) {
  if (closed_.load(std::memory_order_acquire)) return Closed();
  if (!writable_) return Status::FailedPrecondition("the disk is read-only");
  TRY(CheckDiskRange(offset, data.size(), size_bytes()));
  if (top_delta_ == nullptr) return Put(*layers_.back().file, offset, data, caching);  // raw
  Status s;
  ForEachWriteRun(offset, data.size(), [&](const WriteRun& r) {
    auto piece = data.subspan(r.pos, r.length);
    if (r.file_offset == 0) {
      s = WriteSlow(r.cluster_index, r.in_cluster, piece, caching);
    } else {
      s = Put(top_delta_->file(), r.file_offset, piece, caching);
      if (s.ok()) top_delta_->NoteDataWritten();
    }
    return s.ok();
  });
  return s;
}

template <typename Visit>
bool ServedDisk::ForEachWriteRun(uint64_t offset, uint64_t length, Visit visit) const {
  const Delta& top = *top_delta_;
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t voff = offset + pos;
    WriteRun r{voff / cb, voff % cb, 0, pos, std::min<uint64_t>(cb - voff % cb, length - pos)};
    if (const uint64_t off = top.ClusterFileOffset(r.cluster_index); off != 0) {
      r.file_offset = off + r.in_cluster;
      // In place, over the clusters that follow each other in the file.
      for (uint64_t k = 1;
           pos + r.length < length && top.ClusterFileOffset(r.cluster_index + k) == off + k * cb;
           ++k) {
        r.length += std::min<uint64_t>(cb, length - pos - r.length);
      }
    }
    if (!visit(r)) return false;
    pos += r.length;
  }
  return true;
}

Status ServedDisk::AllocateInTop(uint64_t cluster_index, std::span<const std::byte> data,
                                 Caching caching) {
  Delta& top = *top_delta_;
  ASSIGN_OR_RETURN(uint64_t fc, top.ReserveCluster());
  if (Status s = Put(top.file(), fc * cluster_bytes_, data, caching); !s.ok()) {
    top.UnreserveCluster(fc);
    return s;
  }
  top.PublishCluster(cluster_index, fc);
  counters_.allocations.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

Status ServedDisk::WriteSlow(uint64_t cluster_index, uint64_t in_cluster,
                             std::span<const std::byte> piece, Caching caching) {
  std::lock_guard lock(ClusterLock(cluster_index));
  Delta& top = *top_delta_;
  const uint64_t cb = cluster_bytes_;
  // Another request may have mapped the cluster while this one waited.
  if (uint64_t off = top.ClusterFileOffset(cluster_index); off != 0) {
    TRY(Put(top.file(), off + in_cluster, piece, caching));
    top.NoteDataWritten();
    return Status::Ok();
  }
  const int below = static_cast<int>(layers_.size()) - 2;
  const bool lower = below >= 0 && Find(cluster_index, below).level >= 0;
  // Zeros over a cluster nobody holds change nothing a reader sees.
  if (!lower && IsZero(piece)) return Status::Ok();
  if (in_cluster == 0 && piece.size() == cb) return AllocateInTop(cluster_index, piece, caching);
  // A partial write: the rest of the new cluster is zeros, or the data of
  // the layer below (copy-up).
  ASSIGN_OR_RETURN(std::byte * buffer, TakeBuffer());
  std::span<std::byte> cluster(buffer, cb);
  Status s;
  if (lower) {
    s = ReadBelow(below, cluster_index * cb, cluster);
  } else {
    std::memset(cluster.data(), 0, cb);
  }
  if (s.ok()) {
    std::memcpy(cluster.data() + in_cluster, piece.data(), piece.size());
    s = AllocateInTop(cluster_index, cluster);
  }
  ReturnBuffer(buffer);
  return s;
}

Status ServedDisk::Discard(uint64_t offset, uint64_t length) {
  IoGate::Pass pass = gate_.Enter();
  Status s = DiscardImpl(offset, length);
  counters_.discards.fetch_add(1, std::memory_order_relaxed);
  if (!s.ok()) counters_.errors.fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status ServedDisk::DiscardImpl(uint64_t offset, uint64_t length) {
  if (closed_.load(std::memory_order_acquire)) return Closed();
  if (!writable_) return Status::FailedPrecondition("the disk is read-only");
  TRY(CheckDiskRange(offset, length, size_bytes()));
  // A raw top has no clusters to unmap: the file itself gets the hole.
  if (top_delta_ == nullptr) return layers_.back().image->Discard(offset, length);
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t voff = offset + pos;
    const uint64_t n = std::min<uint64_t>(cb - voff % cb, length - pos);
    TRY(DiscardPiece(voff / cb, voff % cb, n));
    pos += n;
  }
  return Status::Ok();
}

Status ServedDisk::DiscardPiece(uint64_t cluster_index, uint64_t in_cluster, uint64_t length) {
  std::lock_guard lock(ClusterLock(cluster_index));
  Delta& top = *top_delta_;
  const uint64_t cb = cluster_bytes_;
  const int below = static_cast<int>(layers_.size()) - 2;
  const bool lower = below >= 0 && Find(cluster_index, below).level >= 0;
  if (uint64_t off = top.ClusterFileOffset(cluster_index); off != 0) {
    if (length == cb && !lower && top.kind() == ImageKind::kExpanded) {
      top.UnmapCluster(cluster_index);
      return Status::Ok();
    }
    // The top's copy must stay mapped (it hides a lower layer's data, or
    // the image is preallocated): zeros in place.
    return ZeroInTop(off + in_cluster, length);
  }
  if (!lower) return Status::Ok();  // reads as zeros already
  if (length == cb) return MapZeroCluster(cluster_index);
  // Part of a cluster only a lower layer holds: copy it up with the range
  // zeroed.
  ASSIGN_OR_RETURN(std::byte * buffer, TakeBuffer());
  std::span<std::byte> cluster(buffer, cb);
  Status s = ReadBelow(below, cluster_index * cb, cluster);
  if (s.ok()) {
    std::memset(cluster.data() + in_cluster, 0, length);
    s = AllocateInTop(cluster_index, cluster);
  }
  ReturnBuffer(buffer);
  return s;
}

Status ServedDisk::ZeroInTop(uint64_t file_offset, uint64_t length) {
  Delta& top = *top_delta_;
  BlockFile& file = top.file();
  if (file.CanPunchHole()) {
    Status s = file.PunchHole(file_offset, length);
    if (s.ok()) {
      // A preallocated image keeps its space reserved: the hole becomes an
      // allocated range of zeros again (best effort; a hole reads as zeros
      // too).
      if (top.kind() == ImageKind::kPreallocated) file.Allocate(file_offset, length).IgnoreError();
      top.NoteDataWritten();
      return Status::Ok();
    }
    if (s.code() != StatusCode::kNotSupported) return s;
  }
  TRY(WriteZeros(file, file_offset, length));
  top.NoteDataWritten();
  return Status::Ok();
}

Status ServedDisk::MapZeroCluster(uint64_t cluster_index) {
  Delta& top = *top_delta_;
  BlockFile& file = top.file();
  const uint64_t cb = cluster_bytes_;
  ASSIGN_OR_RETURN(uint64_t fc, top.ReserveCluster());
  Status s;
  bool hole = false;
  if (file.CanPunchHole()) {
    // A BAT entry never points past EOF: one zero byte at the cluster's end
    // makes the file reach it, then the whole cluster becomes a hole.
    const std::byte zero{0};
    s = file.WriteAt(fc * cb + cb - 1, std::span<const std::byte>(&zero, 1));
    if (s.ok()) {
      Status punched = file.PunchHole(fc * cb, cb);
      hole = punched.ok();
      if (!punched.ok() && punched.code() != StatusCode::kNotSupported) s = punched;
    }
  }
  if (s.ok() && !hole) s = WriteZeros(file, fc * cb, cb);
  if (!s.ok()) {
    top.UnreserveCluster(fc);
    return s;
  }
  top.PublishCluster(cluster_index, fc);
  counters_.allocations.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

// The plans mirror ReadImpl() and WriteImpl()'s lock-free parts; where
// those would take a cluster lock (WriteSlow()) there is no plan.
bool ServedDisk::PlanRead(uint64_t offset, std::span<std::byte> out, Plan* plan) {
  plan->pieces_.clear();
  std::optional<IoGate::Pass> pass = gate_.TryEnter();
  if (!pass || closed_.load(std::memory_order_acquire) ||
      !CheckDiskRange(offset, out.size(), size_bytes()).ok()) {
    return false;
  }
  const bool planned = ForEachReadRun(offset, out.size(), [&](const ReadRun& r) {
    if (r.avail > 0) {
      const int fd = r.file->DescriptorFor(r.file_offset, out.data() + r.pos, r.avail, false);
      if (fd < 0) return false;
      plan->pieces_.push_back({fd, r.file_offset, r.pos, r.avail});
    }
    if (r.avail < r.length) plan->pieces_.push_back({-1, 0, r.pos + r.avail, r.length - r.avail});
    return true;
  });
  if (!planned) return false;
  plan->pass_.emplace(std::move(*pass));
  plan->write_ = false;
  plan->bytes_ = out.size();
  return true;
}

bool ServedDisk::PlanWrite(uint64_t offset, std::span<const std::byte> data, Caching caching,
                           Plan* plan) {
  plan->pieces_.clear();
  std::optional<IoGate::Pass> pass = gate_.TryEnter();
  if (!pass || closed_.load(std::memory_order_acquire) || !writable_ ||
      !CheckDiskRange(offset, data.size(), size_bytes()).ok()) {
    return false;
  }
  const bool buffered = caching == Caching::kBuffered;
  auto add = [&](BlockFile& file, uint64_t file_offset, uint64_t pos, uint64_t length) {
    const int fd = file.DescriptorFor(file_offset, data.data() + pos, length, buffered);
    if (fd < 0) return false;
    plan->pieces_.push_back({fd, file_offset, pos, length});
    return true;
  };
  if (top_delta_ == nullptr) {  // a raw top
    if (!add(*layers_.back().file, offset, 0, data.size())) return false;
  } else {
    const bool planned = ForEachWriteRun(offset, data.size(), [&](const WriteRun& r) {
      // A cluster the top lacks is an allocation: WriteSlow(), no plan.
      return r.file_offset != 0 && add(top_delta_->file(), r.file_offset, r.pos, r.length);
    });
    if (!planned) return false;
  }
  plan->pass_.emplace(std::move(*pass));
  plan->write_ = true;
  plan->bytes_ = data.size();
  return true;
}

void ServedDisk::Finish(Plan* plan, bool transferred) {
  if (transferred) {
    if (plan->write_) {
      if (top_delta_ != nullptr) top_delta_->NoteDataWritten();
      counters_.writes.fetch_add(1, std::memory_order_relaxed);
      counters_.bytes_written.fetch_add(plan->bytes_, std::memory_order_relaxed);
    } else {
      counters_.reads.fetch_add(1, std::memory_order_relaxed);
      counters_.bytes_read.fetch_add(plan->bytes_, std::memory_order_relaxed);
    }
  }
  plan->pass_.reset();  // last: the layers may change once it is gone
}

Result<ServedDisk::AllocationMap> ServedDisk::Allocation(uint64_t offset, uint64_t length) {
  IoGate::Pass pass = gate_.Enter();
  if (closed_.load(std::memory_order_acquire)) return Closed();
  TRY(CheckDiskRange(offset, length, size_bytes()));
  AllocationMap map;
  map.first_cluster_index = offset / cluster_bytes_;
  map.top_unmaps = top_delta_ != nullptr && top_delta_->kind() == ImageKind::kExpanded;
  if (length == 0) return map;
  const int top = static_cast<int>(layers_.size()) - 1;
  const uint64_t last = (offset + length - 1) / cluster_bytes_;
  map.clusters.reserve(last - map.first_cluster_index + 1);
  for (uint64_t index = map.first_cluster_index; index <= last; ++index) {
    const Location loc = Find(index, top);
    ClusterHolders holders;
    holders.top = loc.level == top;
    // The top hides what is below; look there only when it holds the
    // cluster (otherwise `loc` already is the highest holder below it).
    holders.below = loc.level >= 0 && (loc.level < top || Find(index, top - 1).level >= 0);
    map.clusters.push_back(holders);
  }
  return map;
}

Status ServedDisk::Flush() {
  std::shared_lock lock(layers_mu_);
  if (closed_.load(std::memory_order_acquire)) return Closed();
  counters_.flushes.fetch_add(1, std::memory_order_relaxed);
  Status s = layers_.back().image->Flush();
  if (!s.ok()) counters_.errors.fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status ServedDisk::Close() {
  if (closed_.exchange(true, std::memory_order_acq_rel)) return Status::Ok();
  Quiesced quiesced(*this);
  return chain_->Close();
}

Status ServedDisk::ReplaceLayers(
    const std::function<Status(std::vector<std::unique_ptr<Image>>&)>& change) {
  Quiesced quiesced(*this);
  if (closed_.load(std::memory_order_acquire)) return Closed();
  TRY_CTX(layers_.back().image->Flush(), "flush before changing the layers");
  std::vector<std::unique_ptr<Image>> layers = chain_->TakeLayers();
  layers_.clear();
  top_delta_ = nullptr;
  Status changed = change(layers);
  auto chain = Chain::FromLayers(std::move(layers));
  if (!chain.ok()) {
    closed_.store(true, std::memory_order_release);
    return std::move(chain).error().WithContext("the changed layers are not a valid chain");
  }
  chain_ = std::move(*chain);
  RebuildLayers();
  if (writable_ && top_delta_ != nullptr) {
    // Writes to a top not marked in use would leave a crash undetected:
    // refuse them all, as when the layers did not form a chain.
    if (Status s = top_delta_->BeginWrites(); !s.ok()) {
      closed_.store(true, std::memory_order_release);
      return s.WithContext("mark the new top in use");
    }
  }
  return changed;
}

Status ServedDisk::Grow(uint64_t new_size_bytes) {
  Quiesced quiesced(*this);
  if (closed_.load(std::memory_order_acquire)) return Closed();
  if (!writable_) return Status::FailedPrecondition("the disk is read-only");
  Status s = layers_.back().image->Grow(new_size_bytes);
  layers_.back().size_bytes = layers_.back().image->size_bytes();
  size_bytes_.store(chain_->size_bytes(), std::memory_order_release);
  return s;
}

ServedDisk::Counters ServedDisk::counters() const {
  Counters c;
  c.reads = counters_.reads.load(std::memory_order_relaxed);
  c.writes = counters_.writes.load(std::memory_order_relaxed);
  c.discards = counters_.discards.load(std::memory_order_relaxed);
  c.flushes = counters_.flushes.load(std::memory_order_relaxed);
  c.bytes_read = counters_.bytes_read.load(std::memory_order_relaxed);
  c.bytes_written = counters_.bytes_written.load(std::memory_order_relaxed);
  c.allocations = counters_.allocations.load(std::memory_order_relaxed);
  c.errors = counters_.errors.load(std::memory_order_relaxed);
  c.copy_buffers_allocated = counters_.copy_buffers_allocated.load(std::memory_order_relaxed);
  c.in_flight = gate_.in_flight();
  c.depth = depth_.load(std::memory_order_relaxed);
  return c;
}

Result<std::byte*> ServedDisk::TakeBuffer() {
  std::lock_guard lock(buffers_mu_);
  if (free_buffers_.empty()) {
    constexpr uint64_t kSlabBytes = uint64_t{2} << 20;
    const uint64_t per_slab = std::max<uint64_t>(1, kSlabBytes / cluster_bytes_);
    IoMemory slab = AllocateIoMemory(per_slab * cluster_bytes_);
    if (slab == nullptr) return Status::FromErrno(ENOMEM, "cluster buffers for copy-ups");
    for (uint64_t i = 0; i < per_slab; ++i)
      free_buffers_.push_back(slab.get() + i * cluster_bytes_);
    buffer_slabs_.push_back(std::move(slab));
    counters_.copy_buffers_allocated.fetch_add(per_slab, std::memory_order_relaxed);
  }
  std::byte* b = free_buffers_.back();
  free_buffers_.pop_back();
  return b;
}

void ServedDisk::ReturnBuffer(std::byte* buffer) {
  std::lock_guard lock(buffers_mu_);
  free_buffers_.push_back(buffer);
}

}  // namespace ploop
