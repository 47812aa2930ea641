// Reading cluster versions out of a delta chain in windows.
//
// Goal: let the sender look at a cluster as several layers hold it (its
// own data in each delta, what the disk or a snapshot reads as, what the
// base reads as) while reading the disk in long runs: a window collects
// the (level, index) pairs it needs, sorts them by level and index, and
// reads each run of consecutive indices of one level with one Image::Read
// (which in turn coalesces clusters that are contiguous in the file).
//
// Invariants: a window holds whole indices (every version an index needs),
// in increasing index order; versions of one level and consecutive indices
// are adjacent in the buffer. Memory is one window buffer per window in
// flight, reused through a pool.
//
// Crash ordering: read-only.
#include "snapshot/stream_source.h"

#include <algorithm>

#include "ploop/delta.h"
#include "ploop/raw_image.h"

namespace ploop::stream {

SourceChain::SourceChain(Chain& chain) : chain_(chain), cluster_bytes_(chain.cluster_bytes()) {
  for (size_t level = 0; level < chain.depth(); ++level) {
    Image& image = chain.layer(level);
    auto* delta = dynamic_cast<Delta*>(&image);
    auto* raw = dynamic_cast<RawImage*>(&image);
    BlockFile* file = delta != nullptr ? &delta->file() : raw != nullptr ? &raw->file() : nullptr;
    levels_.push_back(Level{delta, file, image.size_bytes() / cluster_bytes_});
  }
}

uint64_t SourceChain::level_clusters(int level) const { return levels_[level].clusters; }

bool SourceChain::Holds(int level, uint64_t index) const {
  const Level& l = levels_[level];
  if (index >= l.clusters) return false;
  // A raw base holds every cluster it covers.
  return l.delta == nullptr || l.delta->ClusterFileOffset(index) != 0;
}

int SourceChain::Highest(uint64_t index, int max_level) const {
  for (int level = max_level; level >= 0; --level) {
    if (Holds(level, index)) return level;
  }
  return -1;
}

uint64_t SourceChain::CountHeld(int min_level, int max_level) const {
  uint64_t clusters = 0;
  for (int level = std::max(min_level, 0); level <= max_level; ++level) {
    clusters = std::max(clusters, levels_[level].clusters);
  }
  uint64_t held = 0;
  for (uint64_t i = 0; i < clusters; ++i) {
    for (int level = max_level; level >= std::max(min_level, 0); --level) {
      if (Holds(level, i)) {
        ++held;
        break;
      }
    }
  }
  return held;
}

std::optional<uint64_t> SourceChain::FileOffset(int level, uint64_t index) const {
  if (!Holds(level, index)) return std::nullopt;
  const Level& l = levels_[level];
  if (l.delta == nullptr) return index * cluster_bytes_;
  return l.delta->ClusterFileOffset(index);
}

MappedSource::MappedSource(SourceChain& source, bool enabled, uint64_t window_bytes)
    : source_(source),
      window_bytes_(std::max(window_bytes, source.cluster_bytes())),
      levels_(static_cast<size_t>(source.levels())) {
  for (int level = 0; level < source.levels(); ++level) {
    LevelMap& l = levels_[level];
    BlockFile* file = source.file(level);
    if (!enabled || file == nullptr) {
      l.disabled = true;
      continue;
    }
    auto size = file->Size();
    l.disabled = !size.ok();
    if (size.ok()) l.file_bytes = *size;
  }
}

MappedSource::Piece MappedSource::Cluster(int level, uint64_t index) {
  LevelMap& l = levels_[level];
  const uint64_t cb = source_.cluster_bytes();
  const std::optional<uint64_t> offset = source_.FileOffset(level, index);
  if (l.disabled || !offset || *offset > l.file_bytes || cb > l.file_bytes - *offset) return {};
  if (l.window == nullptr || *offset < l.window_start ||
      *offset + cb > l.window_start + l.window->data().size()) {
    const uint64_t start = *offset / window_bytes_ * window_bytes_;
    const uint64_t end = std::min(l.file_bytes, start + window_bytes_ + cb);
    auto mapping = source_.file(level)->Map(start, end - start);
    if (!mapping.ok()) {
      // Not a file that maps (the in-memory one), or mmap failed: this
      // level is read with pread from now on.
      l.disabled = true;
      l.window.reset();
      return {};
    }
    l.window = std::move(*mapping);
    l.window_start = start;
  }
  return Piece{l.window->data().data() + (*offset - l.window_start), l.window};
}

Prefetcher::Prefetcher(FileSystem& fs, SourceChain& source, int max_level, uint64_t end_index)
    : source_(source), max_level_(max_level), end_index_(end_index) {
  for (int level = 0; level <= max_level; ++level) {
    auto file = fs.Open(source.layer(level).path(), OpenMode::kReadOnly);
    files_.push_back(file.ok() ? std::move(*file) : nullptr);
  }
}

void Prefetcher::Advance(uint64_t index) {
  constexpr uint64_t kAheadBytes = 64ull << 20;
  const uint64_t cb = source_.cluster_bytes();
  const uint64_t limit = std::min(end_index_, index + std::max<uint64_t>(1, kAheadBytes / cb));
  // Coalesce clusters that follow each other in one file into one hint.
  int run_level = -1;
  uint64_t run_start = 0;
  uint64_t run_end = 0;
  auto flush = [&] {
    if (run_level >= 0 && files_[run_level] != nullptr) {
      files_[run_level]->Prefetch(run_start, run_end - run_start);
    }
    run_level = -1;
  };
  for (uint64_t i = std::max(queued_, index); i < limit; ++i) {
    const int level = source_.Highest(i, max_level_);
    if (level < 0) continue;
    const uint64_t offset = *source_.FileOffset(level, i);
    if (level != run_level || offset != run_end) {
      flush();
      run_level = level;
      run_start = offset;
    }
    run_end = offset + cb;
  }
  flush();
  queued_ = std::max(queued_, limit);
}

Status SourceChain::ReadView(int max_level, uint64_t first_index, uint64_t count,
                             std::span<std::byte> out) {
  const uint64_t cb = cluster_bytes_;
  for (uint64_t k = 0; k < count;) {
    const int level = Highest(first_index + k, max_level);
    uint64_t run = 1;
    while (k + run < count && Highest(first_index + k + run, max_level) == level) ++run;
    auto piece = out.subspan(k * cb, run * cb);
    if (level < 0) {
      std::fill(piece.begin(), piece.end(), std::byte{0});
    } else {
      Image& image = layer(level);
      TRY_CTX(image.Read((first_index + k) * cb, piece), "read " + image.path());
    }
    k += run;
  }
  return Status::Ok();
}

const WindowVersion* Window::Find(const WindowEntry& entry, int level) const {
  for (uint32_t v = entry.first; v < entry.first + entry.count; ++v) {
    if (versions[v].level == level) return &versions[v];
  }
  return nullptr;
}

WindowReader::WindowReader(SourceChain& source, NeedsFn needs, uint64_t start_index,
                           uint64_t end_index, uint64_t window_bytes)
    : source_(source),
      needs_(std::move(needs)),
      cursor_(start_index),
      end_index_(end_index),
      window_bytes_(std::max(window_bytes, source.cluster_bytes())),
      pool_(window_bytes_) {}

void WindowReader::Recycle(std::unique_ptr<Window> window) {
  if (window != nullptr && window->pooled) pool_.Put(std::move(window->buf));
}

Result<std::unique_ptr<Window>> WindowReader::Next() {
  const uint64_t cb = source_.cluster_bytes();
  auto w = std::make_unique<Window>();
  uint64_t bytes = 0;
  while (cursor_ < end_index_) {
    levels_.clear();
    uint64_t progress = needs_(cursor_, levels_);
    if (progress == 0 && levels_.empty()) {
      ++cursor_;
      continue;
    }
    const uint64_t need = levels_.size() * cb;
    if (!w->entries.empty() && bytes + need > window_bytes_) break;
    WindowEntry entry{cursor_, static_cast<uint32_t>(w->versions.size()),
                      static_cast<uint32_t>(levels_.size()), progress};
    for (int level : levels_) w->versions.push_back(WindowVersion{level, 0});
    w->entries.push_back(entry);
    w->progress_bytes += progress;
    bytes += need;
    ++cursor_;
  }
  if (w->entries.empty()) return std::unique_ptr<Window>();
  // Lay the versions out by level, then index, and read each run of
  // consecutive indices of one level with one call.
  struct Item {
    int level;
    uint64_t index;
    uint32_t version;
  };
  std::vector<Item> items;
  items.reserve(w->versions.size());
  for (const WindowEntry& e : w->entries) {
    for (uint32_t v = e.first; v < e.first + e.count; ++v) {
      items.push_back(Item{w->versions[v].level, e.index, v});
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.level != b.level ? a.level < b.level : a.index < b.index;
  });
  // An index group bigger than a window gets a one-off buffer.
  w->pooled = bytes <= pool_.buffer_bytes();
  w->buf = w->pooled ? pool_.Get() : NewAlignedBuffer(bytes);
  for (size_t i = 0; i < items.size(); ++i) w->versions[items[i].version].offset = i * cb;
  for (size_t i = 0; i < items.size();) {
    size_t j = i + 1;
    while (j < items.size() && items[j].level == items[i].level &&
           items[j].index == items[j - 1].index + 1) {
      ++j;
    }
    Image& layer = source_.layer(items[i].level);
    auto out = std::span<std::byte>(w->buf.get() + i * cb, (j - i) * cb);
    TRY_CTX(layer.Read(items[i].index * cb, out), "read " + layer.path());
    i = j;
  }
  return w;
}

Result<Digest> ViewDigestOf(Chain& chain, uint64_t size_bytes,
                            const std::function<void(uint64_t, uint64_t)>& progress) {
  SourceChain source(chain);
  const uint64_t cb = source.cluster_bytes();
  const int top = source.levels() - 1;
  const uint64_t clusters = size_bytes / cb;
  const uint64_t total = source.CountHeld(0, top) * cb;
  WindowReader reader(
      source,
      [&](uint64_t index, std::vector<int>& levels) -> uint64_t {
        int h = source.Highest(index, top);
        if (h < 0) return 0;
        levels.push_back(h);
        return cb;
      },
      0, clusters, 8ull << 20);
  ViewChain view;
  view.Init(size_bytes, cb);
  uint64_t done = 0;
  for (;;) {
    ASSIGN_OR_RETURN(auto w, reader.Next());
    if (w == nullptr) break;
    for (const WindowEntry& e : w->entries) {
      auto data = w->Data(w->versions[e.first], cb);
      if (!IsZero(data)) view.Add(e.index, ClusterDigestOf(data));
    }
    done += w->progress_bytes;
    if (progress) progress(done, total);
    reader.Recycle(std::move(w));
  }
  return view.state();
}

}  // namespace ploop::stream
