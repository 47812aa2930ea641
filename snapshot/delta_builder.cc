// DeltaBuilder: an append-only ploop delta writer.
//
// Goal: turn the receiver's ordered stream of clusters into a delta with
// one large write per run (no read-modify-write, no per-cluster BAT write)
// and make the result depend only on the clusters appended, so that an
// interrupted receive resumed from its last checkpoint gives the same file.
//
// Layout: header (in use while building), BAT, then data clusters in the
// order they were appended: the j-th appended cluster is file cluster
// first_cluster + j, whatever its index.
//
//   +--------+---------------------+------+------+------+----
//   | header | BAT (in memory, on  | j=0  | j=1  | j=2  | ...
//   | in use | disk at checkpoints)|      |      |      |
//   +--------+---------------------+------+------+------+----
//
// Invariants:
//   (1) at a checkpoint every BAT entry on disk points at a durable cluster
//       (Checkpoint(): sync data, then write the BAT, then sync), and every
//       appended cluster has its entry;
//   (2) between checkpoints the file may hold more clusters, and (after a
//       crash between a BAT write and the caller's state save) BAT entries
//       past the checkpoint the caller knows; Resume() clears those entries
//       and cuts the file back, so the next append lands where it would
//       have without the interruption;
//   (3) the image says "in use" until Finish() has synced everything, so a
//       partial file is never mistaken for a cleanly closed one;
//   (4) appends through a WriteBehind land in space reserved ahead of them
//       (fallocate, which extends the file): the file may end past the last
//       appended cluster, in reserved space that reads as zeros and that no
//       BAT entry points at. Resume() and Finish() cut it off.
// Why reserve: ext4 runs direct writes that extend a file or fill a hole
// one at a time under the inode's lock; into reserved space they run
// side by side, which is what lets the writer threads keep the disk's
// queue filled (tools/bench/README.md, session 14).
// Crash ordering: the caller records a checkpoint (data_clusters) only
// after Checkpoint() returned, so the recorded count never exceeds what is
// durable.
#include "snapshot/delta_builder.h"

#include <algorithm>
#include <array>
#include <cstring>

#include "ploop/lock.h"
#include "snapshot/write_behind.h"

namespace ploop::stream {

namespace {

constexpr uint64_t kBatWriteBytes = 1 << 20;
// Space reserved ahead of the appends: twice what the delta holds, so
// three times in all (a small delta overshoots by little, a large one asks
// the file system a few times only: 4 times for 2 GiB of 1 MiB clusters),
// at least kMinReserveClusters clusters, at most kMaxReserveBytes at once,
// never past the most the delta can hold (one cluster per BAT entry). Each
// reservation waits for the direct writes under way on the file (5-15 ms
// here), so it must not come often.
constexpr uint64_t kMinReserveClusters = 64;
constexpr uint64_t kMaxReserveBytes = 1ull << 30;

}  // namespace

DeltaBuilder::DeltaBuilder(std::unique_ptr<BlockFile> file, Header header)
    : file_(std::move(file)),
      path_(file_->path()),
      header_(header),
      cluster_bytes_(header.cluster_bytes()),
      first_cluster_(header.first_block_bytes() / header.cluster_bytes()),
      bat_(header.bat_entries, 0) {}

DeltaBuilder::~DeltaBuilder() = default;

Result<std::unique_ptr<DeltaBuilder>> DeltaBuilder::Create(FileSystem& fs, const std::string& path,
                                                           uint64_t size_bytes,
                                                           uint64_t cluster_bytes) {
  ASSIGN_OR_RETURN(Header header, MakeHeader(size_bytes, cluster_bytes));
  header.in_use = kInUseDirty;
  header.flags = 0;
  ASSIGN_OR_RETURN(auto file, fs.Create(path, /*exclusive=*/true));
  Status s = [&]() -> Status {
    TRY(LockImage(*file, /*writable=*/true));
    // The BAT area reads as zeros (unallocated) without writing it.
    TRY(file->Truncate(header.first_block_bytes()));
    std::array<std::byte, kHeaderBytes> raw;
    EncodeHeader(header, raw);
    TRY(file->WriteAt(0, raw));
    return file->Sync();
  }();
  if (!s.ok()) {
    file.reset();
    fs.Remove(path).IgnoreError();
    return std::move(s).WithContext("create " + path);
  }
  return std::unique_ptr<DeltaBuilder>(new DeltaBuilder(std::move(file), header));
}

Result<std::unique_ptr<DeltaBuilder>> DeltaBuilder::Resume(FileSystem& fs, const std::string& path,
                                                           uint64_t size_bytes,
                                                           uint64_t cluster_bytes,
                                                           uint64_t data_clusters) {
  auto bad = [&](const std::string& why) {
    return Status::Corruption(path + ": " + why + "; discard it with receive --abort");
  };
  ASSIGN_OR_RETURN(Header expected, MakeHeader(size_bytes, cluster_bytes));
  ASSIGN_OR_RETURN(auto file, fs.Open(path, OpenMode::kReadWrite));
  TRY(LockImage(*file, /*writable=*/true));
  ASSIGN_OR_RETURN(uint64_t file_bytes, file->Size());
  if (file_bytes < expected.first_block_bytes()) return bad("partial delta is truncated");
  std::array<std::byte, kHeaderBytes> raw;
  TRY(file->ReadAt(0, raw));
  ASSIGN_OR_RETURN_CTX(Header header, DecodeHeader(raw), path);
  if (!header.v2() || header.cluster_bytes() != cluster_bytes ||
      header.size_sectors != expected.size_sectors ||
      header.first_block_sectors != expected.first_block_sectors) {
    return bad("partial delta does not have the stream's geometry");
  }
  std::unique_ptr<DeltaBuilder> b(new DeltaBuilder(std::move(file), expected));
  b->header_.in_use = kInUseDirty;
  b->header_.flags = 0;
  const uint64_t end_cluster = b->first_cluster_ + data_clusters;
  if (file_bytes < end_cluster * cluster_bytes) return bad("partial delta lost received clusters");
  std::vector<std::byte> entries(4 * b->bat_.size());
  TRY(b->file_->ReadAt(kHeaderBytes, entries));
  std::vector<bool> seen(data_clusters);
  uint64_t kept = 0;
  for (uint64_t i = 0; i < b->bat_.size(); ++i) {
    uint32_t e = LoadLe32(entries.data() + 4 * i);
    if (e == 0) continue;
    if (e < b->first_cluster_ || e >= end_cluster) {
      // Appended after the checkpoint the caller knows of: forget it.
      b->dirty_from_ = std::min(b->dirty_from_, kHeaderBytes + 4 * i);
      b->dirty_to_ = std::max(b->dirty_to_, kHeaderBytes + 4 * i + 4);
      continue;
    }
    if (seen[e - b->first_cluster_]) return bad("partial delta maps a cluster twice");
    seen[e - b->first_cluster_] = true;
    b->bat_[i] = e;
    ++kept;
  }
  if (kept != data_clusters) return bad("partial delta lost received clusters");
  b->data_clusters_ = data_clusters;
  if (file_bytes != end_cluster * cluster_bytes) {
    TRY(b->file_->Truncate(end_cluster * cluster_bytes));
  }
  TRY(b->WriteHeader());
  b->unsynced_ = true;
  TRY(b->Checkpoint());
  return b;
}

Status DeltaBuilder::WriteHeader() {
  std::array<std::byte, kHeaderBytes> raw;
  EncodeHeader(header_, raw);
  return file_->WriteAt(0, raw);
}

Status DeltaBuilder::Append(std::span<const uint64_t> indices, std::span<const std::byte> data) {
  if (indices.empty()) return Status::Ok();
  if (data.size() != indices.size() * cluster_bytes_) {
    return Status::InvalidArgument("DeltaBuilder::Append: data is not one cluster per index");
  }
  for (uint64_t index : indices) {
    if (index >= bat_.size() || bat_[index] != 0) {
      return Status::InvalidArgument("DeltaBuilder::Append: cluster " + std::to_string(index) +
                                     " is outside the delta or already there");
    }
  }
  const uint64_t fc = first_cluster_ + data_clusters_;
  if (fc + indices.size() > 0xffffffffull) {
    return Status::NoSpace(path() + ": the delta reached the format's size limit");
  }
  if (writer_ != nullptr) {
    TRY(Reserve(fc * cluster_bytes_ + data.size()));
    TRY(writer_->Write(*file_, fc * cluster_bytes_, data));
  } else {
    TRY(file_->WriteAt(fc * cluster_bytes_, data));
  }
  for (size_t j = 0; j < indices.size(); ++j) {
    bat_[indices[j]] = static_cast<uint32_t>(fc + j);
    dirty_from_ = std::min(dirty_from_, kHeaderBytes + 4 * indices[j]);
    dirty_to_ = std::max(dirty_to_, kHeaderBytes + 4 * indices[j] + 4);
  }
  data_clusters_ += indices.size();
  unsynced_ = true;
  return Status::Ok();
}

Status DeltaBuilder::Reserve(uint64_t end) {
  if (!reserving_ || end <= reserved_end_) return Status::Ok();
  const uint64_t from = std::max(reserved_end_, (first_cluster_ + data_clusters_) * cluster_bytes_);
  const uint64_t step = std::clamp(2 * data_clusters_ * cluster_bytes_,
                                   kMinReserveClusters * cluster_bytes_, kMaxReserveBytes);
  const uint64_t most = (first_cluster_ + bat_.size()) * cluster_bytes_;
  const uint64_t to = std::max(end, std::min(from + step, most));
  Status s = file_->Allocate(from, to - from);
  if (s.code() == StatusCode::kNoSpace || s.code() == StatusCode::kNotSupported) {
    // Not fatal: each append extends the file itself, and one that finds
    // no room reports it. Whatever was reserved before this is cut off
    // like the rest.
    reserving_ = false;
    return Status::Ok();
  }
  TRY_CTX(s, "reserve space in " + path());
  reserved_end_ = to;
  return Status::Ok();
}

Status DeltaBuilder::CutReserve() {
  const uint64_t end = (first_cluster_ + data_clusters_) * cluster_bytes_;
  ASSIGN_OR_RETURN(uint64_t file_bytes, file_->Size());
  if (file_bytes > end) TRY_CTX(file_->Truncate(end), "cut reserved space off " + path());
  reserved_end_ = 0;
  return Status::Ok();
}

void DeltaBuilder::UseWriteBehind(WriteBehind* writer, bool direct_io) {
  writer_ = writer;
  // Aligned writes (whole clusters from aligned buffers) then skip the
  // page cache; the header and BAT stay buffered. Where the file system
  // has no direct I/O the writes are still queued, through the page cache.
  if (writer != nullptr && direct_io && !direct_) {
    auto align = file_->EnableDirectIo();
    direct_ = align.ok() && cluster_bytes_ % *align == 0;
  }
}

Status DeltaBuilder::SyncData() {
  Status s = file_->Sync();
  if (!s.ok()) {
    std::lock_guard lock(sync_mu_);
    if (sync_failed_.ok()) sync_failed_ = s;
  }
  return s;
}

Status DeltaBuilder::AppendZero(uint64_t index) {
  // Aligned, so that it goes to the file as directly as the data does
  // (and zeroed, as every new AlignedBuffer is).
  if (zeros_ == nullptr) zeros_ = NewAlignedBuffer(cluster_bytes_);
  return Append(std::span(&index, 1), std::span<const std::byte>(zeros_.get(), cluster_bytes_));
}

Status DeltaBuilder::Checkpoint() {
  if (finished_) return Status::FailedPrecondition(path() + " is finished");
  if (writer_ != nullptr) TRY(writer_->Drain());
  {
    // A background sync saw a write-back error this file will not report
    // again: the data it lost must not be checkpointed.
    std::lock_guard lock(sync_mu_);
    TRY_CTX(sync_failed_, "sync " + path());
  }
  if (unsynced_) {
    TRY_CTX(file_->Sync(), "sync " + path());  // data before the BAT that points at it
    unsynced_ = false;
  }
  if (dirty_from_ < dirty_to_) {
    std::vector<std::byte> buf;
    for (uint64_t off = dirty_from_; off < dirty_to_; off += buf.size()) {
      buf.resize(std::min(kBatWriteBytes, dirty_to_ - off));
      for (uint64_t b = 0; b < buf.size(); b += 4) {
        StoreLe32(buf.data() + b, bat_[(off + b - kHeaderBytes) / 4]);
      }
      TRY_CTX(file_->WriteAt(off, buf), "write BAT of " + path());
    }
    TRY_CTX(file_->Sync(), "sync " + path());
    dirty_from_ = UINT64_MAX;
    dirty_to_ = 0;
  }
  return Status::Ok();
}

Status DeltaBuilder::Finish() {
  TRY(Checkpoint());
  // Before the image says clean: a finished delta ends at its last
  // cluster.
  TRY(CutReserve());
  header_.in_use = kInUseClean;
  header_.flags = data_clusters_ == 0 ? kFlagEmpty : 0;
  TRY_CTX(WriteHeader(), "finish " + path());
  TRY_CTX(file_->Sync(), "finish " + path());
  finished_ = true;
  file_.reset();
  return Status::Ok();
}

}  // namespace ploop::stream
