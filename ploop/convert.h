// Copying between raw files and images: `ploop import` and `ploop export`.
//
// Both are sparse-aware: holes in a raw source are skipped without reading
// (SEEK_DATA), all-zero clusters are not allocated in the image, and
// unallocated clusters become holes in a raw output.
//
// Thread-safety: functions; no shared state.
#pragma once

#include <functional>
#include <string>

#include "ploop/image.h"

namespace ploop {

// Called after each chunk with bytes done and total; may be empty.
using ProgressFn = std::function<void(uint64_t done_bytes, uint64_t total_bytes)>;

// Creates image `dst` (which must not exist) of `options.kind` and cluster
// size from the raw file `src`; the disk size is the source size rounded up
// to the cluster. The image is written as `dst`.import-tmp and renamed to
// `dst` when complete, so neither a failure nor a crash leaves a
// half-imported image at `dst`.
Status ImportRaw(FileSystem& fs, const std::string& src, const std::string& dst,
                 const CreateOptions& options, const ProgressFn& progress = {});

// Writes the whole disk of `image` to a new raw file `dst` (which must not
// exist), leaving holes for unallocated and all-zero clusters. On failure
// `dst` is removed.
Status ExportRaw(Image& image, FileSystem& fs, const std::string& dst,
                 const ProgressFn& progress = {});

}  // namespace ploop
