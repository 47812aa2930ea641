// Delta: one ploop image file (v2 "WithouFreSpacExt", or v1 read and
// written in its own units), expanded or preallocated.
//
// The whole BAT is held in memory (4 bytes per virtual cluster: 4 MiB for
// 1 TiB at 1 MiB clusters). Writes to unallocated clusters append a new
// cluster (or reuse a free one) and record the BAT entry in memory; Flush()
// makes data durable before the BAT pages that point to it. See delta.cc for
// the crash-ordering argument.
//
// Thread-safety: the Image calls are not thread-safe; callers serialise
// them. The calls under "Concurrent writers" below, together with
// ClusterFileOffset() and Flush(), may run from many threads at once (the
// contract is given there); a served disk (served_disk.h) uses them.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "ploop/image.h"

namespace ploop {

class Delta final : public Image {
 public:
  // Creates a new expanded or preallocated image at `path`; fails with
  // AlreadyExists if it exists. The file is removed again on failure.
  static Result<std::unique_ptr<Delta>> Create(FileSystem& fs, const std::string& path,
                                               const CreateOptions& options);
  // Opens an existing ploop image (see OpenImage()).
  static Result<std::unique_ptr<Delta>> Open(FileSystem& fs, const std::string& path,
                                             const OpenOptions& options);
  ~Delta() override;

  ImageKind kind() const override { return kind_; }
  uint64_t size_bytes() const override { return header_.size_bytes(); }
  uint64_t cluster_bytes() const override { return cluster_bytes_; }
  bool writable() const override { return writable_; }
  const std::string& path() const override { return file_->path(); }

  Status Read(uint64_t offset_bytes, std::span<std::byte> out) override;
  Status Write(uint64_t offset_bytes, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes) override;
  // Makes every completed write durable: data is synced, then the BAT pages
  // that changed, then synced again; clusters freed by discards become
  // reusable after that. May run alongside the concurrent-writer calls: a
  // cluster published after Flush() began is made durable by the next one.
  // After a failed sync every later Flush() fails too (the kernel may have
  // dropped the unwritten pages, so no BAT entry may ever point at them);
  // the image then stays marked in use and its next writable open checks
  // and repairs it. A failed BAT write is retried by the next Flush().
  Status Flush() override;
  Status Close() override;
  Result<bool> IsAllocated(uint64_t cluster_index) override;
  // Grows the disk; when the bigger BAT needs more clusters, the data
  // clusters in its way are first moved to the end of the file. Needs
  // exclusive access (no concurrent writer calls).
  Status Grow(uint64_t new_size_bytes) override;
  Result<ImageStats> Stats() override;

  // Writes one whole cluster, allocating it even when `data` is all zeros
  // (a chain needs that to hide a lower layer's data). `data` must be
  // exactly cluster_bytes() long.
  Status WriteCluster(uint64_t cluster_index, std::span<const std::byte> data);

  // What Compact() did.
  struct CompactReport {
    uint64_t moved_clusters = 0;
    uint64_t dropped_zero_clusters = 0;
    uint64_t file_bytes_before = 0;
    uint64_t file_bytes_after = 0;
  };
  // Offline compaction of an expanded image: data clusters are moved from
  // the end of the file into the unreferenced clusters (holes) below, and
  // the file is cut after the last one in use. With `drop_zero_clusters`
  // (only right for a delta with nothing below it: in an upper delta a zero
  // cluster hides older data) all-zero clusters are unallocated first. The
  // disk reads the same throughout and after a crash at any point. Clusters
  // move in batches of `batch_clusters`, each made durable before the next.
  // Needs exclusive access (no concurrent writer calls).
  // FailedPrecondition when read-only or not an expanded image.
  Result<CompactReport> Compact(bool drop_zero_clusters, size_t batch_clusters = 256);

  const Header& header() const { return header_; }
  uint64_t bat_entries() const { return header_.bat_entries; }
  // File offset of virtual cluster `cluster_index`, or 0 when unallocated.
  // Lock-free; safe alongside the concurrent-writer calls (it sees a
  // cluster as published or not, never half).
  uint64_t ClusterFileOffset(uint64_t cluster_index) const;

  // --- Concurrent writers ---------------------------------------------------
  //
  // These calls may run from any number of threads at once, alongside
  // ClusterFileOffset() and Flush(), provided that
  //   - the caller never runs two of them for one virtual cluster at once
  //     (from ReserveCluster() to PublishCluster() the cluster is the
  //     caller's: ServedDisk locks it), and
  //   - no Image call (Write, Discard, Grow, Close, ...) runs meanwhile.
  // Reads and in-place writes of published clusters go straight to file().

  // Marks the image in use, durably, before its first change (Write() and
  // friends do this themselves). Idempotent. FailedPrecondition when
  // read-only.
  Status BeginWrites();
  // The image file: reads, and in-place writes of the clusters that
  // ClusterFileOffset() returns.
  BlockFile& file() { return *file_; }
  // Records that data went to file() in place, so the next Flush() syncs it.
  void NoteDataWritten() { data_unsynced_.store(true, std::memory_order_release); }
  // A file cluster for the new data of one virtual cluster: a free one, or
  // the next at the end of the file. NoSpace when the format can address
  // no more.
  Result<uint64_t> ReserveCluster();
  // Gives back a reserved cluster whose write failed; nothing points at it.
  void UnreserveCluster(uint64_t file_cluster);
  // Points `cluster_index` at `file_cluster`, every byte of which has been
  // written: readers see it at once; its BAT entry reaches the disk in the
  // next Flush(), after the data.
  void PublishCluster(uint64_t cluster_index, uint64_t file_cluster);
  // Unmaps `cluster_index` (it reads as unallocated at once). Its file
  // cluster is reused only after a Flush() made the change durable and the
  // reuse barrier returned.
  void UnmapCluster(uint64_t cluster_index);
  // Called by Flush() after the BAT that frees clusters is durable, before
  // it punches or reuses them: must wait until no I/O that looked a freed
  // cluster up before it was unmapped is still running.
  void set_reuse_barrier(std::function<void()> barrier) { reuse_barrier_ = std::move(barrier); }

 private:
  Delta(std::unique_ptr<BlockFile> file, Header header, bool writable);

  Status LoadBat();
  // Writes the in-use marker and syncs, once, before the first change.
  Status MarkDirty();
  // BAT entry `i` (an atomic load: publishers run concurrently).
  uint32_t Entry(uint64_t i) const;
  // The first file cluster past the data and every referenced cluster:
  // where the file can end.
  uint64_t EndCluster() const;
  // Sets BAT entry `i` and marks its page dirty; meta_mu_ held.
  void StoreEntryLocked(uint64_t i, uint32_t value);
  // ReserveCluster() with meta_mu_ held.
  Result<uint64_t> ReserveClusterLocked();
  // How many file clusters the format can address.
  uint64_t MaxFileClusters() const;
  // How many whole clusters at the start of `data`, which begins at virtual
  // cluster `cluster_index`, are unallocated and not all zeros (at most
  // `max_count`).
  uint64_t NewDataClusters(uint64_t cluster_index, std::span<const std::byte> data,
                           uint64_t max_count) const;
  // Writes `data` (whole clusters) in one write at the end of the file as
  // new clusters for `cluster_index`...; the BAT entries are set in memory
  // once the write succeeded.
  Status AppendClusters(uint64_t cluster_index, std::span<const std::byte> data);
  Status WriteNewCluster(uint64_t cluster_index, uint64_t in_cluster,
                         std::span<const std::byte> data);
  Status WriteHeader();
  uint64_t EntryToFileCluster(uint32_t entry) const;
  uint32_t FileClusterToEntry(uint64_t file_cluster) const;
  Status CheckRange(uint64_t offset, uint64_t length) const;

  std::unique_ptr<BlockFile> file_;
  Header header_;
  ImageKind kind_ = ImageKind::kExpanded;
  bool writable_;
  bool closed_ = false;
  uint64_t cluster_bytes_;

  // We wrote the in-use marker this session; set once under dirty_mu_.
  std::mutex dirty_mu_;
  std::atomic<bool> marked_dirty_{false};
  // Data went to the file since the last data sync.
  std::atomic<bool> data_unsynced_{false};

  // In memory, one entry per virtual cluster, in the file's units. Read
  // without a lock (Entry()); changed only under meta_mu_.
  std::vector<uint32_t> bat_;

  // Guards the allocation state below and every change of bat_.
  std::mutex meta_mu_;
  // 4 KiB pages of the file's BAT region changed in memory, not yet written.
  std::set<uint64_t> dirty_bat_pages_;
  // File clusters not referenced by the on-disk BAT, reusable now.
  std::vector<uint64_t> free_clusters_;  // kept sorted descending; pop_back = lowest
  // Clusters freed since the last Flush(): reusable once the BAT that no
  // longer points to them is durable.
  std::vector<uint64_t> pending_free_;
  uint64_t next_cluster_ = 0;  // first file cluster past the end

  // One Flush() at a time; the sticky failure of a sync (see Flush()).
  std::mutex flush_mu_;
  Status flush_failed_;
  std::function<void()> reuse_barrier_;
};

}  // namespace ploop
