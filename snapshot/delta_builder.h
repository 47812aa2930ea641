// DeltaBuilder: writes a new ploop delta (v2, expanded) front to back, for
// the stream receiver. Clusters arrive in the stream's order and are
// appended at the end of the file in that order, runs of them in one
// write; the BAT is kept in memory and written at checkpoints. The file is
// a valid ploop image at every checkpoint (marked in use until Finish()),
// and its bytes depend only on what was appended: a build resumed from a
// checkpoint ends byte-identical to one that never stopped.
//
// Thread-safety: not thread-safe. Ownership: owns its BlockFile; the
// FileSystem must outlive it.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "ploop/format.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"
#include "snapshot/stream_format.h"

namespace ploop::stream {

class WriteBehind;

class DeltaBuilder {
 public:
  // Creates `path` (which must not exist) as an empty delta of `size_bytes`
  // marked in use, synced. The caller syncs the folder.
  static Result<std::unique_ptr<DeltaBuilder>> Create(FileSystem& fs, const std::string& path,
                                                      uint64_t size_bytes, uint64_t cluster_bytes);
  // Reopens a file Create() made and that last reached a checkpoint with
  // `data_clusters` appended clusters: anything appended after that
  // checkpoint (BAT entries and data) is dropped. Corruption when the file
  // is not such a file (another size, fewer clusters than the checkpoint).
  static Result<std::unique_ptr<DeltaBuilder>> Resume(FileSystem& fs, const std::string& path,
                                                      uint64_t size_bytes, uint64_t cluster_bytes,
                                                      uint64_t data_clusters);
  ~DeltaBuilder();

  uint64_t cluster_bytes() const { return cluster_bytes_; }
  uint64_t data_clusters() const { return data_clusters_; }
  const std::string& path() const { return path_; }
  // Whether cluster `index` was appended.
  bool Holds(uint64_t index) const { return index < bat_.size() && bat_[index] != 0; }

  // From now on, Append() queues its data writes on `writer` (which must
  // outlive its use here, until UseWriteBehind(nullptr)) instead of
  // writing them itself, into space it reserves ahead of them (so that
  // the writer's threads can write side by side); with `direct_io`, aligned data goes to the file
  // with direct I/O where the file system allows it. The caller keeps each appended span
  // valid until the writer has written it (an After() function queued
  // behind the Append, or Drain()). Checkpoint() and Finish() wait for the
  // writer first. A failed queued write fails a later Append() or
  // Checkpoint().
  void UseWriteBehind(WriteBehind* writer, bool direct_io = false);
  // Whether appended clusters bypass the page cache (see UseWriteBehind;
  // the clusters are multiples of the direct I/O alignment): a background
  // SyncData() then has nothing to write back.
  bool direct() const { return direct_; }

  // Appends one cluster of `data` per index (indices.size() * cluster bytes,
  // in one write). Each index must be new and within the delta.
  Status Append(std::span<const uint64_t> indices, std::span<const std::byte> data);
  // Appends a cluster of zeros for `index` (it hides data below).
  Status AppendZero(uint64_t index);
  // Makes everything appended durable: data first, then the BAT.
  Status Checkpoint();
  // Starts making the data appended so far durable (a plain data sync,
  // no BAT): may run on another thread alongside Append(), so that
  // Checkpoint() and Finish() find little left to write.
  // A failure is also kept for the next Checkpoint(): the kernel reports a
  // write-back error once per open file, so the checkpoint's own sync
  // would not see it again.
  Status SyncData();
  // Checkpoint, then marks the image clean; the builder is closed after.
  Status Finish();

 private:
  DeltaBuilder(std::unique_ptr<BlockFile> file, Header header);
  Status WriteHeader();
  // Reserves the file's space up to at least `end` (bytes), and some more
  // (see kMaxReserveBytes), when it is not yet reserved. A file system
  // that is full or cannot reserve turns reserving off (not an error).
  Status Reserve(uint64_t end);
  // Cuts the file back to its last appended cluster.
  Status CutReserve();

  std::unique_ptr<BlockFile> file_;
  std::string path_;
  Header header_;
  uint64_t cluster_bytes_;
  uint64_t first_cluster_;  // file cluster of the first data cluster
  uint64_t data_clusters_ = 0;
  std::vector<uint32_t> bat_;
  // BAT byte range changed since the last checkpoint: [dirty_from_, dirty_to_).
  uint64_t dirty_from_ = UINT64_MAX;
  uint64_t dirty_to_ = 0;
  bool unsynced_ = false;
  bool finished_ = false;
  WriteBehind* writer_ = nullptr;
  bool direct_ = false;
  // The file is reserved (or written) up to here; 0: nothing reserved.
  uint64_t reserved_end_ = 0;
  bool reserving_ = true;
  AlignedBuffer zeros_;  // one cluster of zeros, made by the first AppendZero()
  std::mutex sync_mu_;
  Status sync_failed_;  // a SyncData() failure that Checkpoint() has not reported yet
};

}  // namespace ploop::stream
