// Delta: one ploop image file (v2 "WithouFreSpacExt", or v1 read and
// written in its own units), expanded or preallocated.
//
// The whole BAT is held in memory (4 bytes per virtual cluster: 4 MiB for
// 1 TiB at 1 MiB clusters). Writes to unallocated clusters append a new
// cluster (or reuse a free one) and record the BAT entry in memory; Flush()
// makes data durable before the BAT pages that point to it. See delta.cc for
// the crash-ordering argument.
//
// Thread-safety: not thread-safe.
#pragma once

#include <memory>
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
  Status Flush() override;
  Status Close() override;
  Result<bool> IsAllocated(uint64_t cluster_index) override;
  // Grows the disk; when the bigger BAT needs more clusters, the data
  // clusters in its way are first moved to the end of the file.
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
  // FailedPrecondition when read-only or not an expanded image.
  Result<CompactReport> Compact(bool drop_zero_clusters, size_t batch_clusters = 256);

  const Header& header() const { return header_; }
  uint64_t bat_entries() const { return header_.bat_entries; }
  // File offset of virtual cluster `cluster_index`, or 0 when unallocated.
  uint64_t ClusterFileOffset(uint64_t cluster_index) const;

 private:
  Delta(std::unique_ptr<BlockFile> file, Header header, bool writable);

  Status LoadBat();
  // Writes the in-use marker and syncs, once, before the first change.
  Status MarkDirty();
  // A file cluster for a new data cluster: a free one or the next at EOF.
  Result<uint64_t> AllocateCluster();
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
  void SetEntry(uint64_t cluster_index, uint64_t file_cluster);
  Status WriteDirtyBatPages();
  Status WriteHeader();
  uint64_t EntryToFileCluster(uint32_t entry) const;
  uint32_t FileClusterToEntry(uint64_t file_cluster) const;
  Status CheckRange(uint64_t offset, uint64_t length) const;

  std::unique_ptr<BlockFile> file_;
  Header header_;
  ImageKind kind_ = ImageKind::kExpanded;
  bool writable_;
  bool closed_ = false;
  bool marked_dirty_ = false;  // we wrote the in-use marker this session
  bool data_unsynced_ = false;
  uint64_t cluster_bytes_;
  std::vector<uint32_t> bat_;
  // 4 KiB pages of the file's BAT region changed in memory, not yet written.
  std::set<uint64_t> dirty_bat_pages_;
  // File clusters not referenced by the on-disk BAT, reusable now.
  std::vector<uint64_t> free_clusters_;  // kept sorted descending; pop_back = lowest
  // Clusters freed since the last Flush(): reusable once the BAT that no
  // longer points to them is durable.
  std::vector<uint64_t> pending_free_;
  uint64_t next_cluster_ = 0;  // first file cluster past the end
};

}  // namespace ploop
