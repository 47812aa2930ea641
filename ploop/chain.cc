// Chain: reads top-down through a stack of layers, writes to the top.
//
// Reads are split into runs of consecutive clusters served by the same
// layer, so a large read costs one layer read per run plus one in-memory
// BAT lookup per layer per cluster. Writes are split the same way into
// "plain" runs (the top holds the cluster, or no lower layer does: the
// top's own rules apply, zero writes to empty clusters allocate nothing)
// and copy-up clusters (a lower layer holds the cluster and the top does
// not: the whole cluster is materialised in the top, zeros included).
//
// Crash safety is the top Delta's: a copied-up cluster is an ordinary new
// cluster whose BAT entry is written only after its data is durable. Until
// the entry is durable the lower layer's data shows, which is the state
// before the write.
#include "ploop/chain.h"

#include <algorithm>
#include <cstring>

#include "ploop/delta.h"

namespace ploop {

namespace {

uint64_t RoundUp(uint64_t v, uint64_t unit) { return (v + unit - 1) / unit * unit; }

}  // namespace

Chain::Chain(std::vector<std::unique_ptr<Image>> layers, uint64_t cluster_bytes)
    : layers_(std::move(layers)), cluster_bytes_(cluster_bytes) {
  for (auto& layer : layers_) deltas_.push_back(dynamic_cast<Delta*>(layer.get()));
}

Chain::~Chain() {
  if (!closed_) Close().IgnoreError();
}

Result<std::unique_ptr<Chain>> Chain::FromLayers(std::vector<std::unique_ptr<Image>> layers) {
  if (layers.empty()) return Status::InvalidArgument("a chain needs at least one layer");
  uint64_t cluster_bytes = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    Image& layer = *layers[i];
    if (layer.kind() == ImageKind::kRaw) {
      if (i != 0) {
        return Status::InvalidArgument(layer.path() + ": a raw image can only be the base");
      }
      continue;
    }
    if (cluster_bytes == 0) {
      cluster_bytes = layer.cluster_bytes();
    } else if (layer.cluster_bytes() != cluster_bytes) {
      return Status::InvalidArgument(layer.path() + ": cluster size " +
                                     std::to_string(layer.cluster_bytes()) +
                                     " differs from the chain's " + std::to_string(cluster_bytes));
    }
  }
  if (cluster_bytes == 0) cluster_bytes = layers[0]->cluster_bytes();  // a lone raw image
  for (size_t i = 0; i + 1 < layers.size(); ++i) {
    if (layers[i]->writable()) {
      return Status::InvalidArgument(layers[i]->path() + ": only the top layer may be writable");
    }
    if (layers[i]->size_bytes() > layers[i + 1]->size_bytes()) {
      return Status::InvalidArgument(
          layers[i]->path() + " (" + std::to_string(layers[i]->size_bytes()) +
          " bytes) is larger than the delta above it, " + layers[i + 1]->path());
    }
  }
  if (layers.size() > 1 && layers.back()->kind() == ImageKind::kRaw) {
    return Status::InvalidArgument("a raw image can only be the base");
  }
  return std::unique_ptr<Chain>(new Chain(std::move(layers), cluster_bytes));
}

Result<std::unique_ptr<Chain>> Chain::Open(FileSystem& fs, const Descriptor& dd,
                                           std::string_view guid, const OpenOptions& options) {
  std::vector<DescriptorImage> images;
  if (guid.empty()) {
    images = dd.Chain();
  } else {
    ASSIGN_OR_RETURN(images, dd.ChainTo(guid));
  }
  if (options.writable && images.back().guid != dd.top_guid()) {
    return Status::FailedPrecondition("snapshot " + images.back().guid +
                                      " is read-only; only the top delta can be written");
  }
  std::vector<std::unique_ptr<Image>> layers;
  for (size_t i = 0; i < images.size(); ++i) {
    const DescriptorImage& image = images[i];
    OpenOptions o = options;
    o.writable = options.writable && i + 1 == images.size();
    o.raw = image.kind == ImageKind::kRaw;
    ASSIGN_OR_RETURN_CTX(auto layer, OpenImage(fs, image.path, o),
                         "delta " + image.guid + " (" + image.file + ")");
    if (layer->kind() != ImageKind::kRaw && layer->cluster_bytes() != dd.cluster_bytes()) {
      return Status::Corruption("delta " + image.guid + " (" + image.file + ") has cluster size " +
                                std::to_string(layer->cluster_bytes()) +
                                " but the descriptor says " + std::to_string(dd.cluster_bytes()));
    }
    layers.push_back(std::move(layer));
  }
  return FromLayers(std::move(layers));
}

int Chain::FindLevel(uint64_t cluster_index, int max_level) const {
  for (int level = max_level; level >= 0; --level) {
    if (const Delta* d = deltas_[level]) {
      if (cluster_index < d->bat_entries() && d->ClusterFileOffset(cluster_index) != 0) {
        return level;
      }
    } else if (cluster_index * cluster_bytes_ < layers_[level]->size_bytes()) {
      return level;  // a raw base holds every cluster it covers
    }
  }
  return -1;
}

Status Chain::ReadFrom(int max_level, uint64_t offset, std::span<std::byte> out) {
  int level = FindLevel(offset / cluster_bytes_, max_level);
  if (level < 0) {
    std::memset(out.data(), 0, out.size());
    return Status::Ok();
  }
  // A lower layer may be smaller than the disk: past its end reads zeros.
  Image& layer = *layers_[level];
  uint64_t avail =
      offset < layer.size_bytes() ? std::min<uint64_t>(out.size(), layer.size_bytes() - offset) : 0;
  if (avail > 0) TRY(layer.Read(offset, out.first(avail)));
  std::memset(out.data() + avail, 0, out.size() - avail);
  return Status::Ok();
}

Status Chain::Read(uint64_t offset, std::span<std::byte> out) {
  if (closed_) return Status::FailedPrecondition("chain is closed");
  TRY(CheckDiskRange(offset, out.size(), size_bytes()));
  const int top_level = static_cast<int>(layers_.size()) - 1;
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < out.size()) {
    uint64_t voff = offset + pos;
    int level = FindLevel(voff / cb, top_level);
    // Extend the run while the next cluster comes from the same layer.
    uint64_t end = std::min<uint64_t>(out.size(), RoundUp(voff + 1, cb) - offset);
    while (end < out.size() && FindLevel((offset + end) / cb, top_level) == level) {
      end = std::min<uint64_t>(out.size(), end + cb);
    }
    auto run = out.subspan(pos, end - pos);
    if (level < 0) {
      std::memset(run.data(), 0, run.size());
    } else {
      Image& layer = *layers_[level];
      uint64_t avail =
          voff < layer.size_bytes() ? std::min<uint64_t>(run.size(), layer.size_bytes() - voff) : 0;
      if (avail > 0) TRY(layer.Read(voff, run.first(avail)));
      std::memset(run.data() + avail, 0, run.size() - avail);
    }
    pos = end;
  }
  return Status::Ok();
}

Status Chain::CopyUpWrite(uint64_t cluster_index, uint64_t in_cluster,
                          std::span<const std::byte> data) {
  Delta* top_delta = deltas_.back();
  if (top_delta == nullptr) return Status::NotSupported("copy-up into a raw top");
  std::vector<std::byte> buf(cluster_bytes_);
  if (data.size() != cluster_bytes_) {
    TRY(ReadFrom(static_cast<int>(layers_.size()) - 2, cluster_index * cluster_bytes_, buf));
  }
  std::memcpy(buf.data() + in_cluster, data.data(), data.size());
  return top_delta->WriteCluster(cluster_index, buf);
}

Status Chain::Write(uint64_t offset, std::span<const std::byte> data) {
  if (closed_) return Status::FailedPrecondition("chain is closed");
  if (layers_.size() == 1) return top().Write(offset, data);
  if (!writable()) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckDiskRange(offset, data.size(), size_bytes()));
  const uint64_t cb = cluster_bytes_;
  const int below_top = static_cast<int>(layers_.size()) - 2;
  Delta* top_delta = deltas_.back();
  uint64_t pos = 0;
  uint64_t plain_start = 0;  // start of the pending plain run
  auto flush_plain = [&](uint64_t end) -> Status {
    if (end > plain_start)
      TRY(top().Write(offset + plain_start, data.subspan(plain_start, end - plain_start)));
    return Status::Ok();
  };
  while (pos < data.size()) {
    uint64_t voff = offset + pos;
    uint64_t idx = voff / cb;
    uint64_t in = voff % cb;
    uint64_t n = std::min<uint64_t>(cb - in, data.size() - pos);
    bool copy_up = top_delta->ClusterFileOffset(idx) == 0 && FindLevel(idx, below_top) >= 0;
    if (copy_up) {
      TRY(flush_plain(pos));
      TRY(CopyUpWrite(idx, in, data.subspan(pos, n)));
      plain_start = pos + n;
    }
    pos += n;
  }
  return flush_plain(data.size());
}

Status Chain::Discard(uint64_t offset, uint64_t length) {
  if (closed_) return Status::FailedPrecondition("chain is closed");
  if (layers_.size() == 1) return top().Discard(offset, length);
  if (!writable()) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckDiskRange(offset, length, size_bytes()));
  const uint64_t cb = cluster_bytes_;
  const int below_top = static_cast<int>(layers_.size()) - 2;
  Delta* top_delta = deltas_.back();
  std::vector<std::byte> zeros;
  uint64_t pos = 0;
  while (pos < length) {
    uint64_t voff = offset + pos;
    uint64_t idx = voff / cb;
    uint64_t in = voff % cb;
    uint64_t n = std::min<uint64_t>(cb - in, length - pos);
    if (FindLevel(idx, below_top) < 0) {
      // Nothing below: the top may simply drop the range.
      TRY(top().Discard(voff, n));
    } else {
      // Older data below must not show through: write zeros over it.
      if (zeros.empty()) zeros.resize(cb);
      if (n == cb) {
        TRY(top_delta->WriteCluster(idx, zeros));
      } else if (top_delta->ClusterFileOffset(idx) != 0) {
        TRY(top().Write(voff, std::span<const std::byte>(zeros.data(), n)));
      } else {
        TRY(CopyUpWrite(idx, in, std::span<const std::byte>(zeros.data(), n)));
      }
    }
    pos += n;
  }
  return Status::Ok();
}

Status Chain::Flush() {
  if (closed_) return Status::Ok();
  return top().Flush();
}

Status Chain::Close() {
  if (closed_) return Status::Ok();
  closed_ = true;
  Status first;
  for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) {
    Status s = (*it)->Close();
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

std::vector<std::unique_ptr<Image>> Chain::TakeLayers() {
  closed_ = true;
  deltas_.clear();
  std::vector<std::unique_ptr<Image>> out = std::move(layers_);
  layers_.clear();
  return out;
}

Result<bool> Chain::IsAllocated(uint64_t cluster_index) {
  if (cluster_index * cluster_bytes_ >= size_bytes()) {
    return Status::InvalidArgument("cluster index past the end");
  }
  return FindLevel(cluster_index, static_cast<int>(layers_.size()) - 1) >= 0;
}

Status Chain::Grow(uint64_t new_size_bytes) { return top().Grow(new_size_bytes); }

Result<ImageStats> Chain::Stats() {
  ImageStats st;
  for (auto& layer : layers_) {
    ASSIGN_OR_RETURN(ImageStats s, layer->Stats());
    st.file_bytes += s.file_bytes;
  }
  const int top_level = static_cast<int>(layers_.size()) - 1;
  uint64_t clusters = (size_bytes() + cluster_bytes_ - 1) / cluster_bytes_;
  for (uint64_t c = 0; c < clusters; ++c) st.allocated_clusters += FindLevel(c, top_level) >= 0;
  return st;
}

}  // namespace ploop
