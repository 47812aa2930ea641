#include "ploop/convert.h"

#include <algorithm>
#include <vector>

#include "ploop/lock.h"

namespace ploop {

namespace {

constexpr uint64_t kChunkBytes = 8 << 20;

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
  ASSIGN_OR_RETURN(auto image, CreateImage(fs, dst, create));
  Status s = [&]() -> Status {
    const uint64_t cb = image->cluster_bytes();
    const uint64_t chunk = std::max(kChunkBytes, cb);
    std::vector<std::byte> buf(chunk);
    uint64_t pos = 0;
    while (pos < size) {
      ASSIGN_OR_RETURN(auto data, in->NextData(pos));
      if (!data) break;
      // Work in whole clusters: start at the cluster holding the data.
      pos = *data / cb * cb;
      ASSIGN_OR_RETURN(uint64_t hole, in->NextHole(pos));
      uint64_t end = std::min({size, pos + chunk, std::max((hole + cb - 1) / cb * cb, pos + cb)});
      auto span = std::span<std::byte>(buf.data(), end - pos);
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
    return image->Close();
  }();
  if (!s.ok()) {
    image.reset();
    fs.Remove(dst).IgnoreError();
    return s;
  }
  return Status::Ok();
}

Status ExportRaw(Image& image, FileSystem& fs, const std::string& dst,
                 const ProgressFn& progress) {
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
