// Delta: reading and writing one ploop image.
//
// File layout (cluster = C bytes, N = bat_entries):
//
//   +--------+-----------------------+------------------------------+
//   | header | BAT: N x u32 ...  pad | data clusters, in any order  |
//   +--------+-----------------------+------------------------------+
//   0        64                      first_block = roundup(64+4N, C)
//
// Invariants kept on disk at every instant:
//   (1) a non-zero BAT entry points at a cluster inside [first_block, EOF)
//       whose content is durable: data is synced before the BAT page that
//       references it is written (Flush(): sync data, write BAT, sync);
//   (2) no two entries point at the same cluster: a cluster freed by a
//       discard becomes reusable only after the BAT that no longer points to
//       it is durable (pending_free_ -> free_clusters_ in Flush());
//   (3) the in-use marker is durable before the first change of a session
//       and is cleared only after the last sync (Close()); an image found
//       dirty is checked before it is written again.
// A crash between these steps leaves, at worst, clusters that nothing
// references (leaks, given back by check --repair or reused by later
// writes) -- never a BAT entry pointing at unwritten or foreign data.
//
// BAT updates are batched: Write() changes the in-memory BAT and marks its
// 4 KiB page dirty; Flush() writes the dirty pages at once.
//
// Concurrent writers (a served disk): lookups are lock-free atomic loads of
// the in-memory BAT; meta_mu_ guards the allocator (free list, end of
// file), the dirty-page set and every change of an entry, and is never held
// across data I/O. A new cluster's data is written before its entry is
// published, so a reader sees the old mapping or the complete new cluster.
// Flush() takes, under meta_mu_, a snapshot of the dirty BAT pages (encoded
// right then) and of the clusters freed so far, and only then syncs the
// data: every entry in the snapshot points at data written before that
// sync, and entries published meanwhile wait for the next Flush(), so (1)
// holds with writers running. Freed clusters are punched and reused only
// after the BAT that frees them is durable and the caller's reuse barrier
// has seen every request that might still be using them finish.
//
//   writer:  reserve fc ─ pwrite(fc) ─ publish(idx→fc) ──────────────▶
//   Flush:       snapshot pages+freed ─ sync data ─ write pages ─ sync ─ barrier ─ reuse
//                        │ entries published after this line: next Flush()
#include "ploop/delta.h"

#include <algorithm>
#include <cstring>

#include "ploop/check.h"
#include "ploop/lock.h"
#include "ploop/path.h"

namespace ploop {

namespace {

constexpr uint64_t kBatPageBytes = 4096;
constexpr size_t kZeroChunk = 1 << 20;

const std::byte* ZeroBuffer() {
  static const std::vector<std::byte> zeros(kZeroChunk);
  return zeros.data();
}

}  // namespace

Status WriteZeros(BlockFile& file, uint64_t offset_bytes, uint64_t length_bytes) {
  while (length_bytes > 0) {
    uint64_t n = std::min<uint64_t>(length_bytes, kZeroChunk);
    TRY(file.WriteAt(offset_bytes, std::span<const std::byte>(ZeroBuffer(), n)));
    offset_bytes += n;
    length_bytes -= n;
  }
  return Status::Ok();
}

bool IsZero(std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t n = data.size();
  // Word-at-a-time scan; the tail byte by byte.
  while (n >= 8 && reinterpret_cast<uintptr_t>(p) % 8 != 0) {
    if (*p != std::byte{0}) return false;
    ++p;
    --n;
  }
  while (n >= 64) {
    uint64_t w[8];
    std::memcpy(w, p, 64);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
    p += 64;
    n -= 64;
  }
  for (; n > 0; --n, ++p) {
    if (*p != std::byte{0}) return false;
  }
  return true;
}

Delta::Delta(std::unique_ptr<BlockFile> file, Header header, bool writable)
    : file_(std::move(file)),
      header_(header),
      writable_(writable),
      cluster_bytes_(header.cluster_bytes()) {}

uint32_t Delta::Entry(uint64_t i) const {
  return std::atomic_ref<uint32_t>(const_cast<uint32_t&>(bat_[i])).load(std::memory_order_acquire);
}

void Delta::StoreEntryLocked(uint64_t i, uint32_t value) {
  std::atomic_ref<uint32_t>(bat_[i]).store(value, std::memory_order_release);
  dirty_bat_pages_.insert((kHeaderBytes + 4 * i) / kBatPageBytes);
}

Delta::~Delta() {
  if (!closed_) Close().IgnoreError();
}

Result<std::unique_ptr<Delta>> Delta::Create(FileSystem& fs, const std::string& path,
                                             const CreateOptions& options) {
  if (options.kind == ImageKind::kRaw) {
    return Status::InvalidArgument("Delta::Create makes ploop images, not raw ones");
  }
  ASSIGN_OR_RETURN(Header header, MakeHeader(options.size_bytes, options.cluster_bytes));
  ASSIGN_OR_RETURN(auto file, fs.Create(path, /*exclusive=*/true));
  auto build = [&]() -> Status {
    TRY(LockImage(*file, /*writable=*/true));
    const uint64_t cb = header.cluster_bytes();
    const uint64_t first_block = header.first_block_bytes();
    std::vector<std::byte> meta(first_block);
    if (options.kind == ImageKind::kPreallocated) {
      header.flags = 0;
      const uint64_t first_cluster = first_block / cb;
      for (uint64_t i = 0; i < header.bat_entries; ++i) {
        StoreLe32(meta.data() + kHeaderBytes + 4 * i, static_cast<uint32_t>(first_cluster + i));
      }
      TRY(file->Allocate(first_block, uint64_t{header.bat_entries} * cb));
    }
    EncodeHeader(header, std::span<std::byte, kHeaderBytes>(meta.data(), kHeaderBytes));
    TRY(file->WriteAt(0, meta));
    TRY(file->Sync());
    return Status::Ok();
  };
  Status s = build();
  file.reset();
  if (!s.ok()) {
    fs.Remove(path).IgnoreError();
    return std::move(s).WithContext("create " + path);
  }
  // The new name must be durable before anything (a descriptor) names it.
  if (Status synced = fs.SyncDir(DirName(path)); !synced.ok()) {
    fs.Remove(path).IgnoreError();
    return std::move(synced).WithContext("create " + path);
  }
  OpenOptions open;
  open.writable = true;
  return Open(fs, path, open);
}

Result<std::unique_ptr<Delta>> Delta::Open(FileSystem& fs, const std::string& path,
                                           const OpenOptions& options) {
  ASSIGN_OR_RETURN(auto file,
                   fs.Open(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly));
  if (options.lock) TRY(LockImage(*file, options.writable));
  ASSIGN_OR_RETURN(uint64_t file_bytes, file->Size());
  if (file_bytes < kHeaderBytes) {
    return Status::Corruption(path + ": file is too short for a ploop header (" +
                              std::to_string(file_bytes) + " bytes)");
  }
  std::array<std::byte, kHeaderBytes> raw;
  TRY(file->ReadAt(0, raw));
  ASSIGN_OR_RETURN_CTX(Header header, DecodeHeader(raw), path);
  if (header.flags & kFlagFmtVersionConvert) {
    return Status::NotSupported(path + ": a format version conversion was interrupted");
  }
  if (options.writable && header.version == FormatVersion::kV1) {
    return Status::NotSupported(path +
                                ": v1 (WithoutFreeSpace) images are read-only here; "
                                "export and import to convert to v2");
  }
  if (options.writable && header.dirty()) {
    if (!options.repair_dirty) {
      return Status::FailedPrecondition(path +
                                        ": image was not closed cleanly; run check --repair");
    }
    ASSIGN_OR_RETURN_CTX(CheckReport report, CheckImage(*file, /*repair=*/true), path);
    if (!report.clean()) return Status::Corruption(path + ": " + report.FirstProblem());
    TRY(file->ReadAt(0, raw));
    ASSIGN_OR_RETURN_CTX(header, DecodeHeader(raw), path);
  }
  std::unique_ptr<Delta> delta(new Delta(std::move(file), header, options.writable));
  TRY_CTX(delta->LoadBat(), path);
  return delta;
}

uint64_t Delta::EntryToFileCluster(uint32_t entry) const {
  return header_.v2() ? entry : entry / header_.cluster_sectors;
}

uint32_t Delta::FileClusterToEntry(uint64_t file_cluster) const {
  return static_cast<uint32_t>(header_.v2() ? file_cluster
                                            : file_cluster * header_.cluster_sectors);
}

uint64_t Delta::ClusterFileOffset(uint64_t cluster_index) const {
  if (cluster_index >= bat_.size()) return 0;
  uint32_t e = Entry(cluster_index);
  return e == 0 ? 0 : EntryToFileCluster(e) * cluster_bytes_;
}

Status Delta::LoadBat() {
  const uint64_t cb = cluster_bytes_;
  const uint64_t n = header_.bat_entries;
  uint64_t first_block = header_.first_block_bytes();
  const uint64_t min_first_block = FirstBlockBytes(n, cb);
  if (header_.v2()) {
    if (first_block % cb != 0 || first_block < min_first_block) {
      return Status::Corruption("bad first block offset " + std::to_string(first_block) +
                                " bytes (expected " + std::to_string(min_first_block) + ")");
    }
  } else if (first_block == 0) {
    // v1 images may leave it zero: data starts after the BAT.
    first_block = (kHeaderBytes + 4 * n + kSectorBytes - 1) / kSectorBytes * kSectorBytes;
  }
  ASSIGN_OR_RETURN(uint64_t file_bytes, file_->Size());
  if (file_bytes < kHeaderBytes + 4 * n) {
    return Status::Corruption("file is truncated: " + std::to_string(file_bytes) +
                              " bytes, but the BAT needs " + std::to_string(kHeaderBytes + 4 * n));
  }
  std::vector<std::byte> raw(4 * n);
  TRY_CTX(file_->ReadAt(kHeaderBytes, raw), "read BAT");
  bat_.resize(n);
  const uint64_t file_clusters = file_bytes / cb;
  const uint64_t first_cluster = (first_block + cb - 1) / cb;
  std::vector<bool> used(file_clusters);
  uint64_t allocated = 0;
  bool identity = true;
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t e = LoadLe32(raw.data() + 4 * i);
    bat_[i] = e;
    if (e == 0) {
      identity = false;
      continue;
    }
    if (!header_.v2() && e % header_.cluster_sectors != 0) {
      return Status::Corruption("BAT entry " + std::to_string(i) + " is not cluster-aligned");
    }
    uint64_t fc = EntryToFileCluster(e);
    if (fc * cb < first_block) {
      return Status::Corruption("BAT entry " + std::to_string(i) + " points into the BAT area");
    }
    if (fc >= file_clusters) {
      return Status::Corruption("BAT entry " + std::to_string(i) +
                                " points past the end of the file");
    }
    if (used[fc]) {
      return Status::Corruption("cluster " + std::to_string(fc) +
                                " is used by more than one BAT entry");
    }
    used[fc] = true;
    ++allocated;
    if (fc != first_cluster + i) identity = false;
  }
  kind_ = (n > 0 && identity) ? ImageKind::kPreallocated : ImageKind::kExpanded;
  (void)allocated;
  if (writable_) {
    for (uint64_t fc = file_clusters; fc-- > first_cluster;) {
      if (!used[fc]) free_clusters_.push_back(fc);  // descending
    }
  }
  next_cluster_ = std::max(file_clusters, first_cluster);
  return Status::Ok();
}

Status Delta::CheckRange(uint64_t offset, uint64_t length) const {
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  return CheckDiskRange(offset, length, size_bytes());
}

Status Delta::WriteHeader() {
  std::array<std::byte, kHeaderBytes> raw;
  EncodeHeader(header_, raw);
  return file_->WriteAt(0, raw);
}

Status Delta::MarkDirty() {
  if (marked_dirty_.load(std::memory_order_acquire)) return Status::Ok();
  std::lock_guard lock(dirty_mu_);
  if (marked_dirty_.load(std::memory_order_relaxed)) return Status::Ok();
  header_.in_use = kInUseDirty;
  header_.flags &= ~kFlagEmpty;
  // A format extension (CBT) is no longer valid once the image changes.
  header_.ext_offset_sectors = 0;
  TRY_CTX(WriteHeader(), "mark image in use");
  TRY_CTX(file_->Sync(), "mark image in use");
  marked_dirty_.store(true, std::memory_order_release);
  return Status::Ok();
}

Status Delta::BeginWrites() {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  return MarkDirty();
}

uint64_t Delta::MaxFileClusters() const {
  return 0xffffffffull / (header_.v2() ? 1 : header_.cluster_sectors);
}

Result<uint64_t> Delta::ReserveClusterLocked() {
  if (!free_clusters_.empty()) {
    uint64_t fc = free_clusters_.back();
    free_clusters_.pop_back();
    return fc;
  }
  if (next_cluster_ >= MaxFileClusters()) {
    return Status::NoSpace("image file reached the format's size limit");
  }
  return next_cluster_++;
}

Result<uint64_t> Delta::ReserveCluster() {
  std::lock_guard lock(meta_mu_);
  return ReserveClusterLocked();
}

void Delta::UnreserveCluster(uint64_t fc) {
  std::lock_guard lock(meta_mu_);
  if (fc + 1 == next_cluster_) {
    // The last cluster of the file: cut off whatever part of it was
    // written. No cluster past it is reserved, so nobody writes there.
    --next_cluster_;
    file_->Truncate(std::max(next_cluster_ * cluster_bytes_, header_.first_block_bytes()))
        .IgnoreError();
  } else {
    free_clusters_.push_back(fc);
    std::sort(free_clusters_.rbegin(), free_clusters_.rend());
  }
}

void Delta::PublishCluster(uint64_t cluster_index, uint64_t file_cluster) {
  data_unsynced_.store(true, std::memory_order_release);
  std::lock_guard lock(meta_mu_);
  StoreEntryLocked(cluster_index, FileClusterToEntry(file_cluster));
}

void Delta::UnmapCluster(uint64_t cluster_index) {
  std::lock_guard lock(meta_mu_);
  uint32_t e = Entry(cluster_index);
  if (e == 0) return;
  StoreEntryLocked(cluster_index, 0);
  pending_free_.push_back(EntryToFileCluster(e));
}

Status Delta::WriteNewCluster(uint64_t cluster_index, uint64_t in_cluster,
                              std::span<const std::byte> data) {
  ASSIGN_OR_RETURN(uint64_t fc, ReserveCluster());
  Status s;
  if (in_cluster == 0 && data.size() == cluster_bytes_) {
    s = file_->WriteAt(fc * cluster_bytes_, data);
  } else {
    // A partial write to a new cluster: the rest of the cluster is zeros.
    std::vector<std::byte> buf(cluster_bytes_);
    std::memcpy(buf.data() + in_cluster, data.data(), data.size());
    s = file_->WriteAt(fc * cluster_bytes_, buf);
  }
  if (!s.ok()) {
    UnreserveCluster(fc);  // nothing points at it
    return s;
  }
  PublishCluster(cluster_index, fc);
  return Status::Ok();
}

uint64_t Delta::NewDataClusters(uint64_t cluster_index, std::span<const std::byte> data,
                                uint64_t max_count) const {
  const uint64_t cb = cluster_bytes_;
  uint64_t count = 0;
  while (count < max_count && (count + 1) * cb <= data.size() &&
         Entry(cluster_index + count) == 0 && !IsZero(data.subspan(count * cb, cb))) {
    ++count;
  }
  return count;
}

Status Delta::AppendClusters(uint64_t cluster_index, std::span<const std::byte> data) {
  const uint64_t cb = cluster_bytes_;
  const uint64_t count = data.size() / cb;
  uint64_t first;
  {
    std::lock_guard lock(meta_mu_);
    first = next_cluster_;
    next_cluster_ += count;
  }
  if (Status s = file_->WriteAt(first * cb, data); !s.ok()) {
    // Nothing points at the run; cut off whatever part of it was written.
    std::lock_guard lock(meta_mu_);
    if (first + count == next_cluster_) {
      next_cluster_ = first;
      file_->Truncate(std::max(first * cb, header_.first_block_bytes())).IgnoreError();
    } else {
      for (uint64_t i = 0; i < count; ++i) free_clusters_.push_back(first + i);
      std::sort(free_clusters_.rbegin(), free_clusters_.rend());
    }
    return s;
  }
  data_unsynced_.store(true, std::memory_order_release);
  std::lock_guard lock(meta_mu_);
  for (uint64_t i = 0; i < count; ++i) {
    StoreEntryLocked(cluster_index + i, FileClusterToEntry(first + i));
  }
  return Status::Ok();
}

Status Delta::Read(uint64_t offset, std::span<std::byte> out) {
  TRY(CheckRange(offset, out.size()));
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < out.size()) {
    uint64_t voff = offset + pos;
    uint64_t idx = voff / cb;
    uint64_t in = voff % cb;
    uint64_t n = std::min<uint64_t>(cb - in, out.size() - pos);
    if (Entry(idx) == 0) {
      std::memset(out.data() + pos, 0, n);
      pos += n;
      continue;
    }
    // Extend over clusters that follow contiguously in the file.
    uint64_t fc = EntryToFileCluster(Entry(idx));
    uint64_t run = n;
    for (uint64_t next = idx + 1; pos + run < out.size() && Entry(next) != 0 &&
                                  EntryToFileCluster(Entry(next)) == fc + (next - idx);
         ++next) {
      run += std::min<uint64_t>(cb, out.size() - pos - run);
    }
    TRY(file_->ReadAt(fc * cb + in, out.subspan(pos, run)));
    pos += run;
  }
  return Status::Ok();
}

Status Delta::Write(uint64_t offset, std::span<const std::byte> data) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckRange(offset, data.size()));
  if (data.empty()) return Status::Ok();
  TRY(MarkDirty());
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < data.size()) {
    uint64_t voff = offset + pos;
    uint64_t idx = voff / cb;
    uint64_t in = voff % cb;
    uint64_t n = std::min<uint64_t>(cb - in, data.size() - pos);
    if (Entry(idx) == 0) {
      auto piece = data.subspan(pos, n);
      // Zeros over an unallocated cluster change nothing a reader sees.
      if (IsZero(piece)) {
        pos += n;
        continue;
      }
      // Whole new clusters in a row go to the end of the file in one write
      // (one system call and one extent, not one per cluster; import writes
      // long runs). Free clusters are reused first, one at a time.
      if (n == cb && free_clusters_.empty() && next_cluster_ < MaxFileClusters()) {
        uint64_t count = 1 + NewDataClusters(idx + 1, data.subspan(pos + n),
                                             MaxFileClusters() - next_cluster_ - 1);
        TRY(AppendClusters(idx, data.subspan(pos, count * cb)));
        pos += count * cb;
        continue;
      }
      TRY(WriteNewCluster(idx, in, piece));
      pos += n;
      continue;
    }
    uint64_t fc = EntryToFileCluster(Entry(idx));
    uint64_t run = n;
    for (uint64_t next = idx + 1; pos + run < data.size() && Entry(next) != 0 &&
                                  EntryToFileCluster(Entry(next)) == fc + (next - idx);
         ++next) {
      run += std::min<uint64_t>(cb, data.size() - pos - run);
    }
    TRY(file_->WriteAt(fc * cb + in, data.subspan(pos, run)));
    NoteDataWritten();
    pos += run;
  }
  return Status::Ok();
}

Status Delta::WriteCluster(uint64_t cluster_index, std::span<const std::byte> data) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  if (cluster_index >= bat_.size() || data.size() != cluster_bytes_) {
    return Status::InvalidArgument("WriteCluster: bad cluster index or length");
  }
  TRY(MarkDirty());
  if (uint32_t e = Entry(cluster_index); e != 0) {
    TRY(file_->WriteAt(EntryToFileCluster(e) * cluster_bytes_, data));
    NoteDataWritten();
    return Status::Ok();
  }
  return WriteNewCluster(cluster_index, 0, data);
}

Status Delta::Discard(uint64_t offset, uint64_t length) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  TRY(CheckRange(offset, length));
  if (length == 0) return Status::Ok();
  TRY(MarkDirty());
  const uint64_t cb = cluster_bytes_;
  uint64_t pos = 0;
  while (pos < length) {
    uint64_t voff = offset + pos;
    uint64_t idx = voff / cb;
    uint64_t in = voff % cb;
    uint64_t n = std::min<uint64_t>(cb - in, length - pos);
    pos += n;
    uint32_t e = Entry(idx);
    if (e == 0) continue;
    uint64_t fc = EntryToFileCluster(e);
    if (n == cb && kind_ == ImageKind::kExpanded) {
      UnmapCluster(idx);
    } else {
      TRY(WriteZeros(*file_, fc * cb + in, n));
      NoteDataWritten();
    }
  }
  return Status::Ok();
}

Status Delta::Flush() {
  if (!writable_ || closed_) return Status::Ok();
  std::lock_guard flush_lock(flush_mu_);
  if (!flush_failed_.ok()) return flush_failed_;

  // The snapshot: dirty BAT pages encoded now (runs of consecutive pages
  // coalesced into one write), and the clusters freed so far.
  struct PageRun {
    uint64_t offset_bytes;
    std::vector<std::byte> bytes;
  };
  std::vector<PageRun> runs;
  std::vector<uint64_t> pages;
  std::vector<uint64_t> freed;
  {
    std::lock_guard lock(meta_mu_);
    const uint64_t bat_end = kHeaderBytes + 4 * bat_.size();
    pages.assign(dirty_bat_pages_.begin(), dirty_bat_pages_.end());
    for (size_t i = 0; i < pages.size();) {
      size_t j = i;
      while (j + 1 < pages.size() && pages[j + 1] == pages[j] + 1) ++j;
      uint64_t start = std::max(pages[i] * kBatPageBytes, uint64_t{kHeaderBytes});
      uint64_t end = std::min((pages[j] + 1) * kBatPageBytes, bat_end);
      PageRun run{start, std::vector<std::byte>(end - start)};
      for (uint64_t off = start; off < end; off += 4) {
        StoreLe32(run.bytes.data() + (off - start), Entry((off - kHeaderBytes) / 4));
      }
      runs.push_back(std::move(run));
      i = j + 1;
    }
    dirty_bat_pages_.clear();
    freed.swap(pending_free_);
  }
  // On failure the snapshot goes back: its pages are written (from the
  // entries as they are then) and its clusters freed by a later Flush().
  auto give_back = [&](Status s, bool sync_failed) -> Status {
    std::lock_guard lock(meta_mu_);
    dirty_bat_pages_.insert(pages.begin(), pages.end());
    pending_free_.insert(pending_free_.end(), freed.begin(), freed.end());
    if (sync_failed) {
      flush_failed_ = Status(s).WithContext(
          "an earlier flush of " + path() +
          " failed, so its data may be lost; reopen the image (its check repairs it)");
    }
    return s;
  };

  // Data first: a BAT entry must never reach the disk before its cluster.
  const bool data = data_unsynced_.exchange(false, std::memory_order_acq_rel);
  if (data || !runs.empty()) {
    if (Status s = file_->Sync(); !s.ok()) {
      data_unsynced_.store(true, std::memory_order_release);
      return give_back(std::move(s).WithContext("flush data"), true);
    }
  }
  if (!runs.empty()) {
    for (const PageRun& run : runs) {
      if (Status s = file_->WriteAt(run.offset_bytes, run.bytes); !s.ok()) {
        return give_back(std::move(s).WithContext("write BAT"), false);
      }
    }
    if (Status s = file_->Sync(); !s.ok()) {
      return give_back(std::move(s).WithContext("flush BAT"), true);
    }
  }
  if (!freed.empty()) {
    // The durable BAT no longer points at these clusters: once nobody can
    // still be reading or writing them, give their space back and let later
    // writes reuse them.
    if (reuse_barrier_) reuse_barrier_();
    if (file_->CanPunchHole()) {
      for (uint64_t fc : freed) {
        file_->PunchHole(fc * cluster_bytes_, cluster_bytes_).IgnoreError();
      }
    }
    std::lock_guard lock(meta_mu_);
    free_clusters_.insert(free_clusters_.end(), freed.begin(), freed.end());
    std::sort(free_clusters_.rbegin(), free_clusters_.rend());
  }
  return Status::Ok();
}

Status Delta::Close() {
  if (closed_) return Status::Ok();
  Status result;
  if (writable_ && marked_dirty_.load(std::memory_order_acquire)) {
    result = [&]() -> Status {
      TRY(Flush());
      // Unreferenced clusters at the end of the file are given back.
      const uint64_t end_cluster = EndCluster();
      ASSIGN_OR_RETURN(uint64_t file_bytes, file_->Size());
      if (file_bytes != end_cluster * cluster_bytes_ && kind_ == ImageKind::kExpanded) {
        TRY_CTX(file_->Truncate(end_cluster * cluster_bytes_), "trim image");
        TRY_CTX(file_->Sync(), "trim image");
      }
      header_.in_use = kInUseClean;
      TRY_CTX(WriteHeader(), "mark image clean");
      TRY_CTX(file_->Sync(), "mark image clean");
      return Status::Ok();
    }();
  }
  closed_ = true;
  file_.reset();  // releases the locks
  return result;
}

Result<bool> Delta::IsAllocated(uint64_t cluster_index) {
  if (cluster_index >= bat_.size()) return Status::InvalidArgument("cluster index past the end");
  return Entry(cluster_index) != 0;
}

Result<ImageStats> Delta::Stats() {
  ImageStats st;
  for (uint64_t i = 0; i < bat_.size(); ++i) st.allocated_clusters += Entry(i) != 0;
  ASSIGN_OR_RETURN(st.file_bytes, file_->Size());
  return st;
}

Status Delta::Grow(uint64_t new_size_bytes) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  ASSIGN_OR_RETURN(Header next, MakeHeader(new_size_bytes, cluster_bytes_));
  if (next.size_sectors < header_.size_sectors) {
    return Status::InvalidArgument("new size " + std::to_string(new_size_bytes) +
                                   " is smaller than the disk (" + std::to_string(size_bytes()) +
                                   " bytes); shrinking is not supported");
  }
  if (next.size_sectors == header_.size_sectors) return Status::Ok();
  TRY(MarkDirty());
  TRY(Flush());
  const uint64_t cb = cluster_bytes_;
  const uint64_t old_entries = header_.bat_entries;
  const uint64_t old_first = header_.first_block_bytes() / cb;
  const uint64_t new_first = next.first_block_bytes() / cb;
  if (new_first > old_first) {
    // Step 1: move the data clusters that sit where the BAT will grow to
    // the end of the file (data synced before the BAT points at it, by
    // Flush()). The old header still describes a valid image throughout.
    {
      std::lock_guard lock(meta_mu_);
      std::erase_if(free_clusters_, [&](uint64_t fc) { return fc < new_first; });
      next_cluster_ = std::max(next_cluster_, new_first);
    }
    std::vector<std::byte> buf(cb);
    for (uint64_t i = 0; i < old_entries; ++i) {
      uint32_t e = Entry(i);
      if (e == 0) continue;
      uint64_t fc = EntryToFileCluster(e);
      if (fc >= new_first) continue;
      ASSIGN_OR_RETURN(uint64_t dest, ReserveCluster());
      TRY_CTX(file_->ReadAt(fc * cb, buf), "relocate cluster");
      TRY_CTX(file_->WriteAt(dest * cb, buf), "relocate cluster");
      PublishCluster(i, dest);
    }
    TRY(Flush());
    // Step 2: the freed clusters become BAT: zero them, and the file must
    // reach the new data area.
    ASSIGN_OR_RETURN(uint64_t file_bytes, file_->Size());
    if (file_bytes < new_first * cb) TRY(file_->Truncate(new_first * cb));
  }
  // Every BAT slot past the old entries must read as "unallocated".
  uint64_t zero_from = kHeaderBytes + 4 * old_entries;
  TRY_CTX(WriteZeros(*file_, zero_from, new_first * cb - zero_from), "clear new BAT area");
  TRY_CTX(file_->Sync(), "clear new BAT area");
  // Step 3: the header last; it switches to the bigger disk atomically.
  next.in_use = header_.in_use;
  next.flags = header_.flags & ~kFlagEmpty;
  next.version = header_.version;
  header_ = next;
  {
    std::lock_guard lock(meta_mu_);
    bat_.resize(header_.bat_entries, 0);
  }
  TRY_CTX(WriteHeader(), "write grown header");
  TRY_CTX(file_->Sync(), "write grown header");
  if (kind_ == ImageKind::kPreallocated) {
    // Preallocated disks stay fully allocated: reserve the new clusters.
    uint64_t count = header_.bat_entries - old_entries;
    uint64_t first = next_cluster_;
    TRY(file_->Allocate(first * cb, count * cb));
    {
      std::lock_guard lock(meta_mu_);
      for (uint64_t i = 0; i < count; ++i) {
        StoreEntryLocked(old_entries + i, FileClusterToEntry(first + i));
      }
      next_cluster_ = first + count;
    }
    NoteDataWritten();
    TRY(Flush());
  }
  return Status::Ok();
}

uint64_t Delta::EndCluster() const {
  uint64_t end_cluster = (header_.first_block_bytes() + cluster_bytes_ - 1) / cluster_bytes_;
  for (uint64_t i = 0; i < bat_.size(); ++i) {
    if (uint32_t e = Entry(i); e != 0)
      end_cluster = std::max(end_cluster, EntryToFileCluster(e) + 1);
  }
  return end_cluster;
}

// Compaction. Each batch copies up to `batch_clusters` clusters from the
// highest referenced file clusters into the lowest free ones and then runs
// Flush(): the copies are synced before the BAT pages that point at them,
// and the clusters they came from are only given back after that BAT is
// durable (pending_free_). A crash mid-batch therefore leaves the old BAT
// pointing at the old, intact copies and the new copies as leaks. The file
// is cut only after the last BAT update is durable.
Result<Delta::CompactReport> Delta::Compact(bool drop_zero_clusters, size_t batch_clusters) {
  if (!writable_) return Status::FailedPrecondition(path() + " is open read-only");
  if (closed_) return Status::FailedPrecondition(path() + " is closed");
  if (kind_ != ImageKind::kExpanded) {
    return Status::FailedPrecondition(path() + " is not an expanded image; nothing to compact");
  }
  CompactReport report;
  ASSIGN_OR_RETURN(report.file_bytes_before, file_->Size());
  TRY(MarkDirty());
  TRY(Flush());
  const uint64_t cb = cluster_bytes_;
  std::vector<std::byte> buf(cb);

  if (drop_zero_clusters) {
    for (uint64_t i = 0; i < bat_.size(); ++i) {
      if (Entry(i) == 0) continue;
      uint64_t fc = EntryToFileCluster(Entry(i));
      ASSIGN_OR_RETURN(std::optional<uint64_t> data, file_->NextData(fc * cb));
      if (data.has_value() && *data < (fc + 1) * cb) {
        TRY_CTX(file_->ReadAt(fc * cb, buf), "compact: read cluster");
        if (!IsZero(buf)) continue;
      }  // else a hole in the file: zeros without reading them
      UnmapCluster(i);
      ++report.dropped_zero_clusters;
    }
    TRY(Flush());
  }

  // Virtual cluster of each referenced file cluster, highest file cluster
  // first.
  std::vector<std::pair<uint64_t, uint64_t>> used;  // (file cluster, virtual)
  for (uint64_t i = 0; i < bat_.size(); ++i) {
    if (Entry(i) != 0) used.emplace_back(EntryToFileCluster(Entry(i)), i);
  }
  std::sort(used.rbegin(), used.rend());
  batch_clusters = std::max<size_t>(batch_clusters, 1);
  size_t next_used = 0;
  while (next_used < used.size()) {
    size_t moved = 0;
    while (moved < batch_clusters && next_used < used.size()) {
      // The lowest free cluster, if it lies below the cluster to move.
      uint64_t to = 0;
      {
        std::lock_guard lock(meta_mu_);
        if (free_clusters_.empty() || free_clusters_.back() >= used[next_used].first) break;
        to = free_clusters_.back();
        free_clusters_.pop_back();
      }
      const auto [from, index] = used[next_used++];
      Status copied = file_->ReadAt(from * cb, buf);
      if (copied.ok()) copied = file_->WriteAt(to * cb, buf);
      if (!copied.ok()) {
        std::lock_guard lock(meta_mu_);
        free_clusters_.push_back(to);  // still the lowest free one
        return copied.WithContext("compact: copy cluster");
      }
      // Points the entry at the copy; the old cluster is freed once that
      // is durable.
      PublishCluster(index, to);
      {
        std::lock_guard lock(meta_mu_);
        pending_free_.push_back(from);
      }
      ++moved;
    }
    if (moved == 0) break;
    report.moved_clusters += moved;
    TRY(Flush());
  }

  const uint64_t end_cluster = EndCluster();
  TRY_CTX(file_->Truncate(end_cluster * cb), "compact: cut the file");
  TRY_CTX(file_->Sync(), "compact: cut the file");
  std::lock_guard lock(meta_mu_);
  std::erase_if(free_clusters_, [&](uint64_t fc) { return fc >= end_cluster; });
  next_cluster_ = end_cluster;
  report.file_bytes_after = end_cluster * cb;
  return report;
}

}  // namespace ploop
