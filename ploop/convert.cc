#include "ploop/convert.h"

#include <algorithm>
#include <cerrno>
#include <memory>
#include <vector>

#include "ploop/io/io_memory.h"
#include "ploop/lock.h"
#include "ploop/path.h"

namespace ploop {

namespace {

constexpr uint64_t kChunkBytes = 8 << 20;

// Import reads the source in small pieces so that each one is still in the
// CPU cache when it is scanned for zeros and copied into the image (8 MiB
// pieces made both passes go to memory); the disk is kept busy by
// prefetching instead.
constexpr uint64_t kImportChunkBytes = 2 << 20;
constexpr uint64_t kPrefetchBytes = 64 << 20;

// Keeps the source's data up to kPrefetchBytes ahead of the reader queued
// for reading (BlockFile::Prefetch), so the disk reads the next pieces while
// this thread scans and writes the current one -- what qemu-img gets from
// several reads in flight, without threads. Holes are skipped: prefetching
// them would only fill the page cache with zeros.
class Prefetcher {
 public:
  Prefetcher(BlockFile& file, uint64_t size_bytes) : file_(file), size_bytes_(size_bytes) {}

  // Called with the reader's position before each read. Topping the window
  // up by about one read each time keeps a steady stream of requests going;
  // refilling it in large steps measured slower (bursts of page allocation
  // here, then an idle disk).
  Status Advance(uint64_t pos_bytes) {
    const uint64_t limit = std::min(size_bytes_, pos_bytes + kPrefetchBytes);
    while (queued_bytes_ < limit) {
      ASSIGN_OR_RETURN(auto data, file_.NextData(queued_bytes_));
      if (!data || *data >= limit) break;
      ASSIGN_OR_RETURN(uint64_t hole, file_.NextHole(*data));
      uint64_t end = std::min(std::max(hole, *data + 1), limit);
      file_.Prefetch(*data, end - *data);
      queued_bytes_ = end;
    }
    queued_bytes_ = std::max(queued_bytes_, limit);
    return Status::Ok();
  }

 private:
  BlockFile& file_;
  const uint64_t size_bytes_;
  uint64_t queued_bytes_ = 0;  // everything below is queued or a hole
};

}  // namespace

Status ImportRaw(FileSystem& fs, const std::string& src, const std::string& dst,
                 const CreateOptions& options, const ProgressFn& progress) {
  if (options.kind == ImageKind::kRaw) {
    return Status::InvalidArgument("import makes ploop images: use -f expanded or preallocated");
  }
  ASSIGN_OR_RETURN(auto in, fs.Open(src, OpenMode::kReadOnly));
  TRY(LockImage(*in, /*writable=*/false));
  ASSIGN_OR_RETURN(uint64_t size, in->Size());
  if (size == 0) return Status::InvalidArgument(src + " is empty");
  CreateOptions create = options;
  create.size_bytes = size;
  // The image is built under a temporary name and renamed to `dst` only
  // once it is complete and closed, so a crash never leaves a half-imported
  // image at `dst`; a temporary file a crash left behind is replaced.
  ASSIGN_OR_RETURN(bool dst_exists, fs.Exists(dst));
  if (dst_exists) return Status::FromErrno(EEXIST, "create " + dst);
  const std::string tmp = dst + ".import-tmp";
  ASSIGN_OR_RETURN(bool tmp_exists, fs.Exists(tmp));
  if (tmp_exists) TRY_CTX(fs.Remove(tmp), "remove the leftover " + tmp);
  ASSIGN_OR_RETURN(auto image, CreateImage(fs, tmp, create));
  Status s = [&]() -> Status {
    const uint64_t cb = image->cluster_bytes();
    const uint64_t chunk = std::max(kImportChunkBytes, cb);
    // The image's writes may go direct: the buffer lies in huge pages
    // (ploop/io/io_memory.h), and it is page-aligned for the kernel's
    // copies of the reads (a buffer 16 bytes into a page, as malloc gives,
    // measured up to 1.7x slower).
    IoMemory buf = AllocateIoMemory(chunk);
    if (buf == nullptr) return Status::FromErrno(ENOMEM, "a buffer for the import");
    Prefetcher prefetcher(*in, size);
    uint64_t pos = 0;
    while (pos < size) {
      TRY_CTX(prefetcher.Advance(pos), "read " + src);
      ASSIGN_OR_RETURN(auto data, in->NextData(pos));
      if (!data) break;
      // Work in whole clusters: start at the cluster holding the data.
      pos = *data / cb * cb;
      ASSIGN_OR_RETURN(uint64_t hole, in->NextHole(pos));
      uint64_t end = std::min({size, pos + chunk, std::max((hole + cb - 1) / cb * cb, pos + cb)});
      auto span = std::span<std::byte>(buf.get(), end - pos);
      TRY_CTX(in->ReadAt(pos, span), "read " + src);
      for (uint64_t off = 0; off < span.size();) {
        // Coalesce a run of non-zero clusters into one image write.
        uint64_t run_end = off;
        while (run_end < span.size()) {
          uint64_t n = std::min<uint64_t>(cb, span.size() - run_end);
          if (IsZero(span.subspan(run_end, n))) break;
          run_end += n;
        }
        if (run_end > off) {
          TRY(image->Write(pos + off, span.subspan(off, run_end - off)));
          off = run_end;
        } else {
          off += std::min<uint64_t>(cb, span.size() - off);
        }
      }
      pos = end;
      if (progress) progress(pos, size);
    }
    TRY(image->Close());
    return fs.Rename(tmp, dst);
  }();
  if (!s.ok()) {
    image.reset();
    fs.Remove(tmp).IgnoreError();
    return s;
  }
  // Best effort: the image at `dst` is complete and clean; if the folder
  // sync fails, a power cut can at worst undo the rename, leaving no `dst`
  // -- either state is whole, so the import has succeeded.
  fs.SyncDir(DirName(dst)).IgnoreError();
  return Status::Ok();
}

Status ExportRaw(Image& image, FileSystem& fs, const std::string& dst, const ProgressFn& progress) {
  ASSIGN_OR_RETURN(auto out, fs.Create(dst, /*exclusive=*/true));
  Status s = [&]() -> Status {
    const uint64_t size = image.size_bytes();
    const uint64_t cb = image.cluster_bytes();
    TRY(out->Truncate(size));
    std::vector<std::byte> buf(std::max(kChunkBytes, cb));
    uint64_t clusters = (size + cb - 1) / cb;
    for (uint64_t c = 0; c < clusters;) {
      ASSIGN_OR_RETURN(bool allocated, image.IsAllocated(c));
      if (!allocated) {
        ++c;
        continue;
      }
      // A run of allocated clusters, up to one buffer.
      uint64_t first = c;
      while (c < clusters && (c - first + 1) * cb <= buf.size()) {
        ASSIGN_OR_RETURN(bool a, image.IsAllocated(c));
        if (!a) break;
        ++c;
      }
      uint64_t start = first * cb;
      uint64_t len = std::min(c * cb, size) - start;
      auto span = std::span<std::byte>(buf.data(), len);
      TRY(image.Read(start, span));
      for (uint64_t off = 0; off < len; off += cb) {
        auto piece = span.subspan(off, std::min<uint64_t>(cb, len - off));
        if (!IsZero(piece)) TRY(out->WriteAt(start + off, piece));
      }
      if (progress) progress(c * cb, size);
    }
    TRY(out->Sync());
    return Status::Ok();
  }();
  if (!s.ok()) {
    out.reset();
    fs.Remove(dst).IgnoreError();
    return std::move(s).WithContext("export to " + dst);
  }
  return Status::Ok();
}

}  // namespace ploop
