// Reading cluster versions out of an open delta chain, for the stream
// sender (and the receiver's digest of its base): which layers hold a
// cluster, and windows of clusters read with one call per run of
// consecutive clusters of one layer. Internal to snapshot/.
//
// Thread-safety: a SourceChain answers Holds()/Highest() from any thread
// (the BATs are in memory and not changing); a WindowReader is used by one
// thread; the Windows it returns may move to other threads. ReadAhead: see
// there.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "ploop/chain.h"
#include "snapshot/stream_format.h"

namespace ploop::stream {

class SourceChain {
 public:
  // `chain` must outlive this and stay open.
  explicit SourceChain(Chain& chain);

  int levels() const { return static_cast<int>(levels_.size()); }
  uint64_t cluster_bytes() const { return cluster_bytes_; }
  // Clusters in layer `level`'s own size.
  uint64_t level_clusters(int level) const;
  bool Holds(int level, uint64_t index) const;
  // The highest level <= max_level holding `index`, or -1.
  int Highest(uint64_t index, int max_level) const;
  // Clusters at or above `index` held by some level in [min_level,
  // max_level], counted (for progress totals).
  uint64_t CountHeld(int min_level, int max_level) const;
  Image& layer(int level) { return chain_.layer(level); }
  // Where cluster `index` of `level` is in that level's file (bytes), or
  // nullopt when the level does not hold it.
  std::optional<uint64_t> FileOffset(int level, uint64_t index) const;
  // Reads what the chain up to `max_level` holds at clusters [first_index,
  // first_index + count) into `out` (count clusters): one read per run of
  // consecutive clusters coming from one level, zeros where no level at or
  // below max_level holds a cluster (also for max_level -1).
  Status ReadView(int max_level, uint64_t first_index, uint64_t count, std::span<std::byte> out);
  // The file of `level` (a delta's or a raw base's); nullptr for other
  // kinds of image.
  BlockFile* file(int level) { return levels_[level].file; }

 private:
  Chain& chain_;
  uint64_t cluster_bytes_;
  struct Level {
    const class Delta* delta;  // nullptr for a raw base
    BlockFile* file;           // nullptr: neither a delta nor a raw image
    uint64_t clusters;
  };
  std::vector<Level> levels_;
};

// Which huge pages (kIoMemoryHugePageBytes) of an IoMemory buffer (a
// read-ahead block, an lz4 frame's buffer) went to a writer by reference
// (StreamWriter::WriteStable). Only those are dropped before the buffer is
// written into again: a block whose clusters all went out compressed keeps
// its pages and saves their zeroing, and no huge page is split.
// Thread-safety: Mark() from any thread; Attach() before any Mark(), Drop()
// after the last.
class LentPages {
 public:
  void Attach(std::byte* base, size_t bytes) {
    base_ = base;
    bytes_ = bytes;
  }
  // Marks the pages under the part of [data, data + size) inside the buffer.
  void Mark(const std::byte* data, size_t size);
  // Bit i: page i (from base, kIoMemoryHugePageBytes each) was lent; bit
  // 63 stands for page 63 and every page after it.
  uint64_t mask() const { return mask_.load(std::memory_order_relaxed); }
  // Drops the marked pages (DropIoMemoryPages, a run of them at a time).
  // False when the kernel refused: the buffer must then be unmapped, not
  // written into again.
  [[nodiscard]] bool Drop() const;

 private:
  std::byte* base_ = nullptr;
  size_t bytes_ = 0;
  std::atomic<uint64_t> mask_{0};
};

// Reads the clusters of one view of the chain ahead of a caller that walks
// it in index order: the flattened sender's source (the snapshot it sends).
//
// Why: on the disks measured here (tools/bench/README.md, session 8) the
// sender's reads were what paced `send | receive`. Reads through the page
// cache (mapped and hinted with WILLNEED, or pread) reached the device as
// 0.8-1.5 MiB requests, one or two in flight; this reads blocks of up to
// 4 MiB of clusters that lie one after another in a file with one direct
// read each (no page-cache copy, no eviction of the host's cache) into
// huge-page buffers, and keeps `depth` blocks read or being read ahead of
// the caller on `threads` reader threads.
//
// A block holds up to block_bytes of the clusters read, in index order,
// read with one ReadAt per piece of it that is contiguous in one file (a
// whole block in the common case of a file written in order). A Piece
// keeps its block's buffer alive (the buffer goes back to the pool when
// the last Piece of the block is gone), so memory is the blocks ahead plus
// the blocks the caller's chunks in flight still hold.
//
// Errors: a failed read is returned by Cluster() for any cluster of that
// block; no block after it is started.
//
// Thread-safety: Cluster() from one thread; Pieces may move to other
// threads and outlive the ReadAhead.
class ReadAhead {
 public:
  // For each index in [start_index, end_index), level_of(index) names the
  // level whose own cluster to read (one that holds it), or is negative to
  // skip the index. It is called once per index, from the reader threads.
  // Turns on direct I/O for the chain's files where they allow it.
  ReadAhead(SourceChain& source, std::function<int(uint64_t)> level_of, uint64_t start_index,
            uint64_t end_index, unsigned threads = 2, unsigned depth = 4,
            uint64_t block_bytes = 4ull << 20);
  // Stops the readers (a read under way completes first).
  ~ReadAhead();
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  struct Piece {
    const std::byte* data = nullptr;   // cluster_bytes() long
    std::shared_ptr<const void> hold;  // keeps `data` valid
    // Mark there (while holding `hold`) the bytes of the block that went to
    // a writer by reference (StreamWriter::WriteStable): their pages are
    // then dropped, not read into again, when the last holder let go.
    LentPages* lent = nullptr;
  };
  // Cluster `index`: one read (not skipped), above every index asked
  // before.
  Result<Piece> Cluster(uint64_t index);

 private:
  struct Block;
  void ReaderLoop();
  // The next block's indices and file pieces, from the walk at `*cursor`
  // on, which it advances (outside the lock; one planner at a time).
  std::shared_ptr<Block> PlanBlock(uint64_t* cursor) const;

  SourceChain& source_;
  const std::function<int(uint64_t)> level_of_;
  const uint64_t end_index_;
  const unsigned depth_;
  const uint64_t block_clusters_;
  std::shared_ptr<BufferPool> pool_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<std::shared_ptr<Block>> blocks_;  // planned, in order; front: the caller's
  uint64_t plan_cursor_;                       // the walk's next index
  bool planning_ = false;
  Status failed_;  // a read failed: nothing more is planned
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// Clusters of the chain's files seen through read-only mappings
// (BlockFile::Map), so that the sender checks, hashes, compresses and
// splices them straight from the page cache instead of reading them into
// buffers first. Each level's file is mapped in windows of kWindowBytes
// (plus one cluster, so a cluster starting in a window ends in it too);
// the reader keeps one window per level, and every Piece it hands out
// keeps its window mapped, so memory and page tables stay bounded by the
// chunks in flight, not by the disk.
//
// SIGBUS: a mapping of a file that shrinks below it faults on access. The
// chain's files are open with reader locks for the whole send, so only a
// writer ignoring those locks can shrink one; a window is mapped only
// inside the file's size at that moment, and a cluster the BAT places past
// the end of its file is not mapped at all (the caller's pread then reports
// the short read as corruption). What is left -- a lock-ignoring writer
// truncating a file during the send -- breaks the transfer with pread too
// (a short read, or data that changes under us); a library cannot catch
// SIGBUS without a process-wide handler, so `ploop send` installs one that
// turns it into a one-line error (exit 7) instead of a crash.
//
// Thread-safety: used by one thread; Pieces (and the mappings they hold)
// may move to other threads.
class MappedSource {
 public:
  static constexpr uint64_t kWindowBytes = 64ull << 20;

  // `source` must outlive this. Mapping is disabled with `enabled` false
  // (every Cluster() call then returns no data). `window_bytes` is for
  // tests.
  explicit MappedSource(SourceChain& source, bool enabled = true,
                        uint64_t window_bytes = kWindowBytes);

  struct Piece {
    const std::byte* data = nullptr;             // cluster_bytes() long; nullptr: read it instead
    std::shared_ptr<const FileMapping> mapping;  // keeps `data` valid
  };
  // Cluster `index` of `level` (which holds it), mapped; data nullptr when
  // that level's file cannot be mapped (not a POSIX file, an mmap error)
  // or the cluster lies past its file's end.
  Piece Cluster(int level, uint64_t index);

 private:
  struct LevelMap {
    bool disabled = false;
    uint64_t file_bytes = 0;
    std::shared_ptr<const FileMapping> window;
    uint64_t window_start = 0;  // file offset of window->data()[0]
  };
  SourceChain& source_;
  const uint64_t window_bytes_;
  std::vector<LevelMap> levels_;
};

// One cluster of one level, read into a window's buffer.
struct WindowVersion {
  int level = 0;
  size_t offset = 0;  // into Window::buf
  // Filled by whoever digests the window.
  bool zero = false;
  ClusterDigest digest{};
};

struct WindowEntry {
  uint64_t index = 0;
  uint32_t first = 0;  // first version in Window::versions
  uint32_t count = 0;
  uint64_t progress_bytes = 0;  // what NeedsFn returned for it
};

struct Window {
  std::vector<WindowEntry> entries;
  std::vector<WindowVersion> versions;
  AlignedBuffer buf;
  bool pooled = false;
  // Disk bytes the window's indices stand for (progress).
  uint64_t progress_bytes = 0;

  std::span<const std::byte> Data(const WindowVersion& v, uint64_t cluster_bytes) const {
    return std::span<const std::byte>(buf.get() + v.offset, cluster_bytes);
  }
  // The version of `entry` read from `level`, or nullptr.
  const WindowVersion* Find(const WindowEntry& entry, int level) const;
};

// Fills `levels` with the levels whose own data index `index` needs (no
// duplicates) and returns the disk bytes it stands for; 0 (and no levels)
// when the index is not part of the walk.
using NeedsFn = std::function<uint64_t(uint64_t index, std::vector<int>& levels)>;

class WindowReader {
 public:
  // Walks indices [start_index, end_index). A window's versions fill at
  // most `window_bytes` (or hold one index when that alone is bigger).
  WindowReader(SourceChain& source, NeedsFn needs, uint64_t start_index, uint64_t end_index,
               uint64_t window_bytes);

  // The next window with every version read, or nullptr after the last.
  Result<std::unique_ptr<Window>> Next();
  // Gives a window's buffer back for reuse. Thread-safe.
  void Recycle(std::unique_ptr<Window> window);

 private:
  SourceChain& source_;
  NeedsFn needs_;
  uint64_t cursor_;
  const uint64_t end_index_;
  const uint64_t window_bytes_;
  BufferPool pool_;
  std::vector<int> levels_;  // scratch
};

// The content digest (STREAM.md) of what `chain` reads as, over its first
// `size_bytes`. Reads every allocated cluster once; `progress` (may be
// empty) gets disk bytes done and total.
Result<Digest> ViewDigestOf(Chain& chain, uint64_t size_bytes,
                            const std::function<void(uint64_t, uint64_t)>& progress);

}  // namespace ploop::stream
