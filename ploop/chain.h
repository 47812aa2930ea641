// Chain: a disk made of a stack of deltas, read top-down.
//
//     top      [ A . . D . ]   writable (or read-only for a snapshot view)
//     middle   [ . B . . E ]   read-only
//     base     [ a b c d . ]   read-only; may be a raw file
//     disk     [ A B c D E ]
//
// A cluster is read from the highest layer that holds it; a cluster no
// layer holds reads as zeros. Writes go to the top only: a partial write to
// a cluster the top lacks first copies the rest of the cluster up from
// below; a discard or a zero write over a cluster a lower layer holds
// writes a zero cluster into the top (there is no on-disk "zero" marker),
// so older data never shows through. Lower layers are opened read-only and
// are never modified.
//
// Lookups use the BATs each Delta holds in memory: at most one lookup per
// layer per cluster.
//
// Thread-safety: not thread-safe. Ownership: a Chain owns its layers.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ploop/descriptor.h"
#include "ploop/image.h"

namespace ploop {

class Delta;

class Chain final : public Image {
 public:
  // Builds a chain from open layers, base first. InvalidArgument when the
  // list is empty, a ploop layer's cluster size differs from the others, a
  // raw image is not the base, a layer below is larger than one above, or a
  // layer other than the top is writable.
  static Result<std::unique_ptr<Chain>> FromLayers(std::vector<std::unique_ptr<Image>> layers);

  // Opens the chain of `dd` ending at `guid` (empty: the descriptor's top).
  // Only the descriptor's top can be opened writable; every other layer is
  // opened read-only. Errors of OpenImage() for each file, with its GUID as
  // context; FailedPrecondition when asked to write a snapshot.
  static Result<std::unique_ptr<Chain>> Open(FileSystem& fs, const Descriptor& dd,
                                             std::string_view guid, const OpenOptions& options);

  ~Chain() override;

  ImageKind kind() const override { return top().kind(); }
  uint64_t size_bytes() const override { return top().size_bytes(); }
  uint64_t cluster_bytes() const override { return cluster_bytes_; }
  bool writable() const override { return top().writable(); }
  const std::string& path() const override { return top().path(); }

  Status Read(uint64_t offset_bytes, std::span<std::byte> out) override;
  Status Write(uint64_t offset_bytes, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes) override;
  Status Flush() override;
  Status Close() override;
  Result<bool> IsAllocated(uint64_t cluster_index) override;
  // Grows the top layer; the layers below keep their size.
  Status Grow(uint64_t new_size_bytes) override;
  // Allocated clusters of the whole disk; file bytes of all layers.
  Result<ImageStats> Stats() override;

  // Hands the layers (base first) to the caller without closing them; the
  // chain is closed and empty afterwards (only its destructor may be called
  // then). The served disk uses it to change
  // its layers online (served_disk.h).
  std::vector<std::unique_ptr<Image>> TakeLayers();

  size_t depth() const { return layers_.size(); }
  // Layer `level`, 0 = the base.
  Image& layer(size_t level) { return *layers_[level]; }
  Image& top() const { return *layers_.back(); }

 private:
  explicit Chain(std::vector<std::unique_ptr<Image>> layers, uint64_t cluster_bytes);

  // The highest layer at or below `max_level` holding cluster `index`, or
  // -1 when none does.
  int FindLevel(uint64_t cluster_index, int max_level) const;
  // Reads [offset, offset+out.size()) of one cluster as the layers at or
  // below `max_level` show it.
  Status ReadFrom(int max_level, uint64_t offset, std::span<std::byte> out);
  // Writes one cluster's worth into the top for a cluster a lower layer
  // holds: copy-up of the rest, then an allocating write.
  Status CopyUpWrite(uint64_t cluster_index, uint64_t in_cluster, std::span<const std::byte> data);

  std::vector<std::unique_ptr<Image>> layers_;
  std::vector<Delta*> deltas_;  // per layer: the Delta, or nullptr for raw
  uint64_t cluster_bytes_;
  bool closed_ = false;
};

}  // namespace ploop
