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
#include "ploop/io/io_memory.h"
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

struct ReadAhead::Block {
  // One read: clusters [first, first + count) of the block, which follow
  // each other in the file of `level` from `offset` on.
  struct Piece {
    int level;
    uint64_t offset;
    uint32_t first;
    uint32_t count;
  };
  std::vector<uint64_t> indices;  // the block's clusters, in order
  std::vector<Piece> pieces;
  std::shared_ptr<BufferPool> pool;
  AlignedBuffer buf;  // cluster k of the block at k * cluster_bytes
  bool done = false;
  Status status;
  // The buffer's bytes handed to a writer by reference (Piece::lent):
  // their pages are dropped before the buffer is read into again, since a
  // pipe or socket may still refer to them.
  LentPages lent;
  ~Block() {
    if (pool == nullptr || buf == nullptr) return;
    // Pages that could not be dropped go with the buffer (unmapped), not
    // back to the pool.
    if (lent.Drop()) pool->Put(std::move(buf));
  }
};

void LentPages::Mark(const std::byte* data, size_t size) {
  // As addresses: the span may lie in another buffer.
  const uintptr_t base = reinterpret_cast<uintptr_t>(base_);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  if (base_ == nullptr || begin + size <= base || begin >= base + bytes_) return;
  const size_t from = std::max(begin, base) - base;
  const size_t to = std::min(begin + size, base + bytes_) - base;
  uint64_t bits = 0;
  for (size_t i = from / kIoMemoryHugePageBytes; i * kIoMemoryHugePageBytes < to; ++i) {
    bits |= uint64_t{1} << std::min<size_t>(i, 63);
  }
  mask_.fetch_or(bits, std::memory_order_relaxed);
}

bool LentPages::Drop() const {
  const uint64_t mask = mask_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < 64; ++i) {
    if ((mask >> i & 1) == 0) continue;
    size_t end = i + 1;
    while (end < 64 && (mask >> end & 1) != 0) ++end;
    const size_t from = std::min(bytes_, i * kIoMemoryHugePageBytes);
    // Bit 63 reaches the end of the buffer.
    const size_t to = end == 64 ? bytes_ : std::min(bytes_, end * kIoMemoryHugePageBytes);
    if (!DropIoMemoryPages(base_ + from, to - from)) return false;
    i = end;
  }
  return true;
}

ReadAhead::ReadAhead(SourceChain& source, std::function<int(uint64_t)> level_of,
                     uint64_t start_index, uint64_t end_index, unsigned threads, unsigned depth,
                     uint64_t block_bytes)
    : source_(source),
      level_of_(std::move(level_of)),
      end_index_(end_index),
      depth_(std::max(depth, 1u)),
      block_clusters_(std::max<uint64_t>(1, block_bytes / source.cluster_bytes())),
      pool_(std::make_shared<BufferPool>(block_clusters_ * source.cluster_bytes())),
      plan_cursor_(start_index) {
  for (int level = 0; level < source.levels(); ++level) {
    // Advice: a file without direct I/O is read through the page cache.
    if (BlockFile* f = source.file(level); f != nullptr) (void)f->EnableDirectIo();
  }
  for (unsigned i = 0; i < std::max(threads, 1u); ++i) {
    threads_.emplace_back([this] { ReaderLoop(); });
  }
}

ReadAhead::~ReadAhead() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  changed_.notify_all();
  for (auto& t : threads_) t.join();
}

std::shared_ptr<ReadAhead::Block> ReadAhead::PlanBlock(uint64_t* cursor) const {
  auto block = std::make_shared<Block>();
  const uint64_t cb = source_.cluster_bytes();
  uint64_t i = *cursor;
  for (; i < end_index_ && block->indices.size() < block_clusters_; ++i) {
    int level = level_of_(i);
    if (level < 0) continue;
    const std::optional<uint64_t> held =
        level < source_.levels() ? source_.FileOffset(level, i) : std::nullopt;
    if (!held) level = -1;  // the caller's mistake: ReaderLoop reports it
    const uint64_t offset = held.value_or(0);
    const auto k = static_cast<uint32_t>(block->indices.size());
    block->indices.push_back(i);
    if (!block->pieces.empty() && level >= 0) {
      Block::Piece& last = block->pieces.back();
      if (last.level == level && last.offset + uint64_t{last.count} * cb == offset) {
        ++last.count;
        continue;
      }
    }
    block->pieces.push_back(Block::Piece{level, offset, k, 1});
  }
  *cursor = i;
  return block;
}

void ReadAhead::ReaderLoop() {
  const uint64_t cb = source_.cluster_bytes();
  std::unique_lock lock(mu_);
  for (;;) {
    changed_.wait(lock, [&] {
      return stop_ ||
             (!planning_ && failed_.ok() && plan_cursor_ < end_index_ && blocks_.size() < depth_);
    });
    if (stop_) return;
    planning_ = true;
    uint64_t cursor = plan_cursor_;
    lock.unlock();
    std::shared_ptr<Block> block = PlanBlock(&cursor);
    lock.lock();
    plan_cursor_ = cursor;
    planning_ = false;
    if (block->indices.empty()) {  // the walk's end
      changed_.notify_all();
      continue;
    }
    blocks_.push_back(block);
    changed_.notify_all();
    lock.unlock();
    block->pool = pool_;
    block->buf = pool_->Get();
    block->lent.Attach(block->buf.get(), pool_->buffer_bytes());
    Status status;
    for (const Block::Piece& p : block->pieces) {
      auto out =
          std::span<std::byte>(block->buf.get() + uint64_t{p.first} * cb, uint64_t{p.count} * cb);
      BlockFile* file = p.level < 0 ? nullptr : source_.file(p.level);
      if (p.level < 0) {
        status = Status::FailedPrecondition("read ahead: cluster " +
                                            std::to_string(block->indices[p.first]) +
                                            " is not held by the level asked for");
      } else if (file == nullptr) {
        status =
            Status::NotSupported("read ahead: cluster " + std::to_string(block->indices[p.first]) +
                                 " is in an image that is not a file");
      } else {
        status = file->ReadAt(p.offset, out);
        if (!status.ok()) status = status.WithContext("read " + source_.layer(p.level).path());
      }
      if (!status.ok()) break;
    }
    lock.lock();
    if (!status.ok()) failed_ = status;  // no block is started after a failure
    block->status = std::move(status);
    block->done = true;
    changed_.notify_all();
  }
}

Result<ReadAhead::Piece> ReadAhead::Cluster(uint64_t index) {
  std::unique_lock lock(mu_);
  for (;;) {
    // Blocks wholly below `index` are passed: the caller asks in order.
    while (!blocks_.empty() && blocks_.front()->indices.back() < index) {
      blocks_.pop_front();
      changed_.notify_all();
    }
    if (!blocks_.empty()) break;
    if (!failed_.ok()) return failed_;
    if (plan_cursor_ >= end_index_ && !planning_) {
      return Status::FailedPrecondition("read ahead: cluster " + std::to_string(index) +
                                        " is not one of the clusters read");
    }
    changed_.wait(lock);
  }
  std::shared_ptr<Block> block = blocks_.front();
  changed_.wait(lock, [&] { return block->done; });
  TRY(block->status);
  const auto it = std::lower_bound(block->indices.begin(), block->indices.end(), index);
  if (it == block->indices.end() || *it != index) {
    return Status::FailedPrecondition("read ahead: cluster " + std::to_string(index) +
                                      " is not one of the clusters read");
  }
  const uint64_t k = static_cast<uint64_t>(it - block->indices.begin());
  return Piece{block->buf.get() + k * source_.cluster_bytes(), block, &block->lent};
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
