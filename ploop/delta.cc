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

Status WriteZeros(BlockFile& file, uint64_t offset, uint64_t length) {
  while (length > 0) {
    uint64_t n = std::min<uint64_t>(length, kZeroChunk);
    TRY(file.WriteAt(offset, std::span<const std::byte>(ZeroBuffer(), n)));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

}  // namespace

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
  if (cluster_index >= bat_.size() || bat_[cluster_index] == 0) return 0;
  return EntryToFileCluster(bat_[cluster_index]) * cluster_bytes_;
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
  if (marked_dirty_) return Status::Ok();
  header_.in_use = kInUseDirty;
  header_.flags &= ~kFlagEmpty;
  // A format extension (CBT) is no longer valid once the image changes.
  header_.ext_offset_sectors = 0;
  TRY_CTX(WriteHeader(), "mark image in use");
  TRY_CTX(file_->Sync(), "mark image in use");
  marked_dirty_ = true;
  return Status::Ok();
}

uint64_t Delta::MaxFileClusters() const {
  return 0xffffffffull / (header_.v2() ? 1 : header_.cluster_sectors);
}

Result<uint64_t> Delta::AllocateCluster() {
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

void Delta::SetEntry(uint64_t cluster_index, uint64_t file_cluster) {
  bat_[cluster_index] = file_cluster == 0 ? 0 : FileClusterToEntry(file_cluster);
  dirty_bat_pages_.insert((kHeaderBytes + 4 * cluster_index) / kBatPageBytes);
}

Status Delta::WriteNewCluster(uint64_t cluster_index, uint64_t in_cluster,
                              std::span<const std::byte> data) {
  ASSIGN_OR_RETURN(uint64_t fc, AllocateCluster());
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
    // Give the cluster back; nothing points at it.
    if (fc + 1 == next_cluster_) {
      --next_cluster_;
      file_->Truncate(std::max(next_cluster_ * cluster_bytes_, header_.first_block_bytes()))
          .IgnoreError();
    } else {
      free_clusters_.push_back(fc);
      std::sort(free_clusters_.rbegin(), free_clusters_.rend());
    }
    return s;
  }
  data_unsynced_ = true;
  SetEntry(cluster_index, fc);
  return Status::Ok();
}

uint64_t Delta::NewDataClusters(uint64_t cluster_index, std::span<const std::byte> data,
                                uint64_t max_count) const {
  const uint64_t cb = cluster_bytes_;
  uint64_t count = 0;
  while (count < max_count && (count + 1) * cb <= data.size() && bat_[cluster_index + count] == 0 &&
         !IsZero(data.subspan(count * cb, cb))) {
    ++count;
  }
  return count;
}

Status Delta::AppendClusters(uint64_t cluster_index, std::span<const std::byte> data) {
  const uint64_t cb = cluster_bytes_;
  const uint64_t first = next_cluster_;
  if (Status s = file_->WriteAt(first * cb, data); !s.ok()) {
    // Nothing points at the run; cut off whatever part of it was written.
    file_->Truncate(std::max(first * cb, header_.first_block_bytes())).IgnoreError();
    return s;
  }
  const uint64_t count = data.size() / cb;
  next_cluster_ += count;
  data_unsynced_ = true;
  for (uint64_t i = 0; i < count; ++i) SetEntry(cluster_index + i, first + i);
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
    if (bat_[idx] == 0) {
      std::memset(out.data() + pos, 0, n);
      pos += n;
      continue;
    }
    // Extend over clusters that follow contiguously in the file.
    uint64_t fc = EntryToFileCluster(bat_[idx]);
    uint64_t run = n;
    for (uint64_t next = idx + 1; pos + run < out.size() && bat_[next] != 0 &&
                                  EntryToFileCluster(bat_[next]) == fc + (next - idx);
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
    if (bat_[idx] == 0) {
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
    uint64_t fc = EntryToFileCluster(bat_[idx]);
    uint64_t run = n;
    for (uint64_t next = idx + 1; pos + run < data.size() && bat_[next] != 0 &&
                                  EntryToFileCluster(bat_[next]) == fc + (next - idx);
         ++next) {
      run += std::min<uint64_t>(cb, data.size() - pos - run);
    }
    TRY(file_->WriteAt(fc * cb + in, data.subspan(pos, run)));
    data_unsynced_ = true;
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
  if (bat_[cluster_index] != 0) {
    TRY(file_->WriteAt(EntryToFileCluster(bat_[cluster_index]) * cluster_bytes_, data));
    data_unsynced_ = true;
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
    if (bat_[idx] == 0) continue;
    uint64_t fc = EntryToFileCluster(bat_[idx]);
    if (n == cb && kind_ == ImageKind::kExpanded) {
      SetEntry(idx, 0);
      pending_free_.push_back(fc);
    } else {
      TRY(WriteZeros(*file_, fc * cb + in, n));
      data_unsynced_ = true;
    }
  }
  return Status::Ok();
}

Status Delta::WriteDirtyBatPages() {
  const uint64_t bat_end = kHeaderBytes + 4 * bat_.size();
  auto it = dirty_bat_pages_.begin();
  while (it != dirty_bat_pages_.end()) {
    // Coalesce a run of consecutive dirty pages into one write.
    uint64_t first = *it;
    uint64_t last = first;
    auto next = std::next(it);
    while (next != dirty_bat_pages_.end() && *next == last + 1) {
      last = *next;
      ++next;
    }
    uint64_t start = std::max(first * kBatPageBytes, uint64_t{kHeaderBytes});
    uint64_t end = std::min((last + 1) * kBatPageBytes, bat_end);
    std::vector<std::byte> buf(end - start);
    for (uint64_t off = start; off < end; off += 4) {
      StoreLe32(buf.data() + (off - start), bat_[(off - kHeaderBytes) / 4]);
    }
    TRY_CTX(file_->WriteAt(start, buf), "write BAT");
    it = next;
  }
  dirty_bat_pages_.clear();
  return Status::Ok();
}

Status Delta::Flush() {
  if (!writable_ || closed_) return Status::Ok();
  if (data_unsynced_ || !dirty_bat_pages_.empty()) {
    // Data first: a BAT entry must never reach the disk before its cluster.
    TRY_CTX(file_->Sync(), "flush data");
    data_unsynced_ = false;
  }
  if (!dirty_bat_pages_.empty()) {
    TRY(WriteDirtyBatPages());
    TRY_CTX(file_->Sync(), "flush BAT");
  }
  if (!pending_free_.empty()) {
    // The durable BAT no longer points at these clusters: give their space
    // back and let later writes reuse them.
    for (uint64_t fc : pending_free_) {
      if (file_->CanPunchHole()) {
        file_->PunchHole(fc * cluster_bytes_, cluster_bytes_).IgnoreError();
      }
      free_clusters_.push_back(fc);
    }
    pending_free_.clear();
    std::sort(free_clusters_.rbegin(), free_clusters_.rend());
  }
  return Status::Ok();
}

Status Delta::Close() {
  if (closed_) return Status::Ok();
  Status result;
  if (writable_ && marked_dirty_) {
    result = [&]() -> Status {
      TRY(Flush());
      // Unreferenced clusters at the end of the file are given back.
      uint64_t end_cluster = (header_.first_block_bytes() + cluster_bytes_ - 1) / cluster_bytes_;
      for (uint32_t e : bat_) {
        if (e != 0) end_cluster = std::max(end_cluster, EntryToFileCluster(e) + 1);
      }
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
  return bat_[cluster_index] != 0;
}

Result<ImageStats> Delta::Stats() {
  ImageStats st;
  for (uint32_t e : bat_) st.allocated_clusters += e != 0;
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
    std::erase_if(free_clusters_, [&](uint64_t fc) { return fc < new_first; });
    next_cluster_ = std::max(next_cluster_, new_first);
    std::vector<std::byte> buf(cb);
    for (uint64_t i = 0; i < old_entries; ++i) {
      if (bat_[i] == 0) continue;
      uint64_t fc = EntryToFileCluster(bat_[i]);
      if (fc >= new_first) continue;
      ASSIGN_OR_RETURN(uint64_t dest, AllocateCluster());
      TRY_CTX(file_->ReadAt(fc * cb, buf), "relocate cluster");
      TRY_CTX(file_->WriteAt(dest * cb, buf), "relocate cluster");
      data_unsynced_ = true;
      SetEntry(i, dest);
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
  bat_.resize(header_.bat_entries, 0);
  TRY_CTX(WriteHeader(), "write grown header");
  TRY_CTX(file_->Sync(), "write grown header");
  if (kind_ == ImageKind::kPreallocated) {
    // Preallocated disks stay fully allocated: reserve the new clusters.
    uint64_t count = header_.bat_entries - old_entries;
    uint64_t first = next_cluster_;
    TRY(file_->Allocate(first * cb, count * cb));
    for (uint64_t i = 0; i < count; ++i) SetEntry(old_entries + i, first + i);
    next_cluster_ = first + count;
    data_unsynced_ = true;
    TRY(Flush());
  }
  return Status::Ok();
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
      if (bat_[i] == 0) continue;
      uint64_t fc = EntryToFileCluster(bat_[i]);
      ASSIGN_OR_RETURN(std::optional<uint64_t> data, file_->NextData(fc * cb));
      if (data.has_value() && *data < (fc + 1) * cb) {
        TRY_CTX(file_->ReadAt(fc * cb, buf), "compact: read cluster");
        if (!IsZero(buf)) continue;
      }  // else a hole in the file: zeros without reading them
      SetEntry(i, 0);
      pending_free_.push_back(fc);
      ++report.dropped_zero_clusters;
    }
    TRY(Flush());
  }

  // Virtual cluster of each referenced file cluster, highest file cluster
  // first.
  std::vector<std::pair<uint64_t, uint64_t>> used;  // (file cluster, virtual)
  for (uint64_t i = 0; i < bat_.size(); ++i) {
    if (bat_[i] != 0) used.emplace_back(EntryToFileCluster(bat_[i]), i);
  }
  std::sort(used.rbegin(), used.rend());
  batch_clusters = std::max<size_t>(batch_clusters, 1);
  size_t next_used = 0;
  while (next_used < used.size()) {
    size_t moved = 0;
    while (moved < batch_clusters && next_used < used.size() && !free_clusters_.empty() &&
           free_clusters_.back() < used[next_used].first) {
      const auto [from, index] = used[next_used++];
      const uint64_t to = free_clusters_.back();
      free_clusters_.pop_back();
      TRY_CTX(file_->ReadAt(from * cb, buf), "compact: read cluster");
      TRY_CTX(file_->WriteAt(to * cb, buf), "compact: write cluster");
      data_unsynced_ = true;
      SetEntry(index, to);
      pending_free_.push_back(from);
      ++moved;
    }
    if (moved == 0) break;
    report.moved_clusters += moved;
    TRY(Flush());
  }

  uint64_t end_cluster = (header_.first_block_bytes() + cb - 1) / cb;
  for (uint32_t e : bat_) {
    if (e != 0) end_cluster = std::max(end_cluster, EntryToFileCluster(e) + 1);
  }
  TRY_CTX(file_->Truncate(end_cluster * cb), "compact: cut the file");
  TRY_CTX(file_->Sync(), "compact: cut the file");
  std::erase_if(free_clusters_, [&](uint64_t fc) { return fc >= end_cluster; });
  next_cluster_ = end_cluster;
  report.file_bytes_after = end_cluster * cb;
  return report;
}

}  // namespace ploop
