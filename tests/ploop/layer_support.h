// Helpers for tests that build delta chains by hand on a file system:
// layers with given writes, and a chain opened over them (chain_test.cc,
// delta_test.cc, tests/mount-helper/block_export_test.cc).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ploop/chain.h"
#include "ploop/delta.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "test_support.h"

namespace ploop::testing {

// Creates a delta at `path` of `size` bytes, left open for writing.
inline std::unique_ptr<Delta> NewDelta(FileSystem& fs, const std::string& path, uint64_t size,
                                       uint64_t cluster_bytes,
                                       ImageKind kind = ImageKind::kExpanded) {
  CreateOptions o;
  o.size_bytes = size;
  o.cluster_bytes = cluster_bytes;
  o.kind = kind;
  auto d = Delta::Create(fs, path, o);
  REQUIRE_OK(d);
  return std::move(d).value();
}

// Creates a delta at `path` of `size` bytes and applies `writes`.
inline void MakeLayer(FileSystem& fs, const std::string& path, uint64_t size,
                      const std::vector<std::pair<uint64_t, std::vector<std::byte>>>& writes,
                      uint64_t cluster_bytes = 32 * 1024, ImageKind kind = ImageKind::kExpanded) {
  auto d = NewDelta(fs, path, size, cluster_bytes, kind);
  for (const auto& [off, data] : writes) REQUIRE_OK(d->Write(off, data));
  REQUIRE_OK(d->Close());
}

// The chain of `paths`, base first; only the top writable when asked. A
// path ending in ".raw" is opened as a raw image.
inline std::unique_ptr<Chain> OpenChain(FileSystem& fs, const std::vector<std::string>& paths,
                                        bool writable) {
  std::vector<std::unique_ptr<Image>> layers;
  for (size_t i = 0; i < paths.size(); ++i) {
    OpenOptions o;
    o.writable = writable && i + 1 == paths.size();
    o.raw = paths[i].ends_with(".raw");
    auto img = OpenImage(fs, paths[i], o);
    REQUIRE_OK(img);
    layers.push_back(std::move(img).value());
  }
  auto chain = Chain::FromLayers(std::move(layers));
  REQUIRE_OK(chain);
  return std::move(chain).value();
}

}  // namespace ploop::testing
