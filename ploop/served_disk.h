// ServedDisk: a disk (a Chain of deltas) serving many requests at once --
// the data path of the mount daemon (mount-helper/fuse_server.h), kept here,
// free of FUSE, so it is unit-tested like the rest of the image library.
//
// What runs in parallel, and what is serialised:
//   - Read(), and Write() to clusters the top delta already holds, run fully
//     in parallel: the cluster is looked up lock-free in the in-memory BATs
//     and the delta files are read or written with pread/pwrite straight from
//     the caller's buffer. No lock is held across their I/O.
//   - A Write() to a cluster the top lacks (an allocation: the whole new
//     cluster is written, zero-filled or copied up from the layers below,
//     before its BAT entry is published) and a Discard() lock that one
//     cluster for the duration; other clusters go on. A request holds at
//     most one cluster lock at a time.
//   - Flush() makes every write that completed before it started durable, in
//     the order FORMAT.md requires (Delta::Flush(): data synced before the
//     BAT pages that point at it), while other requests keep running; it
//     waits for requests in flight only when clusters freed by discards are
//     to be reused (IoGate grace period).
//
// Discard semantics (the range reads as zeros afterwards, never as older
// data of a layer below):
//   - a whole cluster only the top holds (expanded top): unmapped; its space
//     goes back to the host after the next Flush() (hole punched);
//   - a cluster a lower layer also holds: it stays mapped in the top and
//     reads as zeros -- the top's copy is punched to a hole (or a new hole
//     cluster is mapped if the top had none), so space is returned there too;
//   - a part of a cluster: punched (zeros) in the top's copy; copied up with
//     zeros when only a lower layer holds it;
//   - a preallocated top keeps its clusters allocated (punch, then allocate).
//
// Hooks for online operations, for the daemon's control socket (each runs
// with the disk quiesced: new requests wait, requests in flight have
// finished, and the disk is flushed):
//   - ReplaceLayers(): hands the layers (base first) to a function that may
//     change them -- put a new empty top over the old one (online snapshot),
//     replace two layers by their merge, reopen the old top read-only -- and
//     serves whatever valid chain it returns.
//   - Grow(): grows the top delta (and so the disk); requests see the new
//     size() at once.
//
// Thread-safety: Read, Write, Discard, Flush, Allocation, size() and the
// hooks are thread-safe. Close() may run beside them: it marks the disk
// closed, waits for the requests in flight, then closes the chain; calls
// after that fail with FailedPrecondition (the NBD export closes this way
// on a stop request). The object must outlive every call. Ownership: owns
// the Chain; the FileSystem must outlive it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <vector>

#include "ploop/chain.h"
#include "ploop/io/io_memory.h"
#include "ploop/io_gate.h"

namespace ploop {

class Delta;

struct ServedDiskOptions {
  // Read and write the delta files' data bypassing the page cache (see
  // BlockFile::EnableDirectIo()) where the files allow it: the disk's user
  // caches the data already, and the host file system then lets writes to
  // one file run in parallel. Requests whose offset, length and buffer are
  // aligned to io_alignment() go direct (unless written with
  // Caching::kBuffered); others stay buffered.
  bool direct_io = false;
};

class ServedDisk {
 public:
  // Takes over an open chain. A writable chain's top is marked in use now
  // (before any request), so a crash later is noticed and repaired by the
  // next writable open. FailedPrecondition for a closed chain; errors of
  // marking the top in use.
  static Result<std::unique_ptr<ServedDisk>> Create(std::unique_ptr<Chain> chain,
                                                    ServedDiskOptions options = {});
  ~ServedDisk();

  uint64_t size_bytes() const { return size_bytes_.load(std::memory_order_acquire); }
  uint64_t cluster_bytes() const { return cluster_bytes_; }
  bool writable() const { return writable_; }
  // Buffers and offsets aligned to this take the direct path (1 when direct
  // I/O is off).
  uint64_t io_alignment() const { return io_alignment_; }

  // Reads out.size() bytes at `offset_bytes` into `out` (no copy through
  // another buffer). InvalidArgument past the end.
  Status Read(uint64_t offset_bytes, std::span<std::byte> out);
  // Writes `data` at `offset_bytes`; durable after the next Flush(). NoSpace
  // when the host file system is full (nothing changes then: a failed
  // allocation maps nothing). FailedPrecondition when read-only.
  // kBuffered: the data goes through the host's page cache even where it
  // could go direct (small writes at a high queue depth, which the host
  // batches); what is written and when it is durable do not change.
  enum class Caching { kDirectWhenAligned, kBuffered };
  Status Write(uint64_t offset_bytes, std::span<const std::byte> data,
               Caching caching = Caching::kDirectWhenAligned);
  // The range reads as zeros afterwards (see the top of this file).
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes);
  // Makes every Write and Discard that completed before the call durable.
  // After a failed sync it keeps failing (Delta::Flush()).
  Status Flush();
  // Marks the disk closed, waits for the requests in flight (new ones fail
  // with FailedPrecondition from then on), then flushes and closes the
  // chain (the top is marked clean). A second call does nothing.
  Status Close();

  // --- Requests the caller carries out (asynchronous image I/O) ---------
  //
  // For a server that does the image I/O itself, asynchronously (the
  // daemon's io_uring queues): PlanRead()/PlanWrite() say which byte ranges
  // of which kernel files a request touches, the caller reads or writes
  // them with its own buffer, then hands the plan to Finish(). Only the
  // common case is planned -- a read, or a write into clusters the top
  // already holds, on kernel files, the disk open and not being quiesced;
  // for anything else (an allocation or copy-up, a range error, a closed or
  // read-only disk, files of the in-memory or fault-injecting file systems)
  // they return false, and the request goes through Read()/Write().
  // Planning never waits. A plan holds the disk's gate (see Close(), the
  // online hooks and discards' cluster reuse, which wait for it), so the
  // caller must finish every plan it holds without waiting for anything but
  // that plan's own I/O.
  struct IoPiece {
    int fd = -1;  // -1: no file holds these bytes; the caller zeroes them
    uint64_t file_offset = 0;
    uint64_t buffer_offset = 0;  // into the request's buffer
    uint64_t length = 0;
  };
  class Plan {
   public:
    const std::vector<IoPiece>& pieces() const { return pieces_; }
    bool active() const { return pass_.has_value(); }

   private:
    friend class ServedDisk;
    std::vector<IoPiece> pieces_;  // kept across uses: no allocation per request
    std::optional<IoGate::Pass> pass_;
    bool write_ = false;
    uint64_t bytes_ = 0;
  };
  // `plan` must not be active; on true it is, and holds the pieces in
  // buffer order (together they cover the request once).
  bool PlanRead(uint64_t offset_bytes, std::span<std::byte> out, Plan* plan);
  bool PlanWrite(uint64_t offset_bytes, std::span<const std::byte> data, Caching caching,
                 Plan* plan);
  // Ends an active plan. `transferred`: every piece was read or written in
  // full -- the request is counted, and a write's data is made durable by
  // the next Flush(). Otherwise (an error, a short transfer) nothing is
  // counted, and the caller does the whole request again with Read() or
  // Write(), which reports the error or finishes the job.
  void Finish(Plan* plan, bool transferred);

  // --- Allocation, for block status and zeroing decisions ---------------
  // --- Allocation, for block status and zeroing decisions ---------------

  // Which layers hold one cluster.
  struct ClusterHolders {
    bool top = false;    // the top layer (a raw top holds all it covers)
    bool below = false;  // some layer under the top

    bool operator==(const ClusterHolders&) const = default;
  };
  struct AllocationMap {
    uint64_t first_cluster_index = 0;
    // Discard() unmaps a whole cluster only the top holds (an expanded
    // top), instead of writing zeros over it in place.
    bool top_unmaps = false;
    std::vector<ClusterHolders> clusters;  // from first_cluster_index on
  };
  // The holders of every cluster [offset, offset+length) touches (none for
  // an empty range), from the same lock-free BAT lookups reads use; runs
  // beside every other call. Each entry is what the BATs said at one moment
  // of the call: a write or discard running at the same time may change it
  // right after, as it may change any answer about a disk in use.
  // InvalidArgument past the end; FailedPrecondition when closed.
  Result<AllocationMap> Allocation(uint64_t offset_bytes, uint64_t length_bytes);

  // --- Hooks for online operations --------------------------------------

  // With the disk quiesced and flushed, lets `change` modify the layers
  // (base first, the top last) and then serves them as the new chain.
  // `change` returning an error leaves the layers as it left them, which
  // must still form a valid chain. If the result is not a valid chain
  // (Chain::FromLayers()), the disk is closed and that error returned.
  Status ReplaceLayers(const std::function<Status(std::vector<std::unique_ptr<Image>>&)>& change);
  // Grows the disk to `new_size_bytes` (the top delta, quiesced and
  // flushed). InvalidArgument when smaller; errors of Delta::Grow().
  Status Grow(uint64_t new_size_bytes);

  // Counters for status reports (relaxed; approximate while requests run).
  struct Counters {
    uint64_t reads = 0;
    uint64_t writes = 0;
    uint64_t discards = 0;
    uint64_t flushes = 0;
    uint64_t bytes_read = 0;
    uint64_t bytes_written = 0;
    uint64_t allocations = 0;             // clusters newly mapped in the top
    uint64_t copy_buffers_allocated = 0;  // cluster buffers made (a slab's worth at a time)
    uint64_t errors = 0;
    uint32_t in_flight = 0;
    uint64_t depth = 0;  // layers
  };
  Counters counters() const;

 private:
  // One layer as the data path sees it; rebuilt only while quiesced.
  struct Layer {
    Image* image = nullptr;
    Delta* delta = nullptr;     // a ploop delta, or nullptr for a raw image
    BlockFile* file = nullptr;  // the image file
    uint64_t size_bytes = 0;
  };
  // Where a cluster's bytes are: a layer and the file offset of the
  // cluster's first byte there.
  struct Location {
    int level = -1;  // -1: no layer holds it (zeros)
    uint64_t file_offset = 0;
  };

  ServedDisk(std::unique_ptr<Chain> chain, ServedDiskOptions options);
  void RebuildLayers();

  // The highest layer at or below `max_level` holding `cluster_index`.
  Location Find(uint64_t cluster_index, int max_level) const;
  // A run of a read: `length` bytes at `pos` in the request that one layer
  // holds one after another in its file (`avail` of them inside the layer,
  // the rest reading as zeros), or that no layer holds (file null, avail 0).
  struct ReadRun {
    BlockFile* file;
    uint64_t file_offset;
    uint64_t pos;
    uint64_t length;
    uint64_t avail;
  };
  // Calls visit(const ReadRun&) for the runs of [offset, offset+length) in
  // order, while it returns true; returns whether all were visited.
  template <typename Visit>
  bool ForEachReadRun(uint64_t offset, uint64_t length, Visit visit) const;
  // A run of a write: `length` bytes at `pos` in the request. Either in
  // place (file_offset != 0: where they go in the top's file, over clusters
  // the top maps one after another there) or in one cluster the top does
  // not map (file_offset 0: WriteSlow()).
  struct WriteRun {
    uint64_t cluster_index;  // the run's first cluster
    uint64_t in_cluster;     // the run's first byte in it
    uint64_t file_offset;
    uint64_t pos;
    uint64_t length;
  };
  // As ForEachReadRun, for a write to a delta top.
  template <typename Visit>
  bool ForEachWriteRun(uint64_t offset, uint64_t length, Visit visit) const;
  // Reads [offset, offset+out.size()) of one cluster as the layers at or
  // below `max_level` show it.
  Status ReadBelow(int max_level, uint64_t offset, std::span<std::byte> out);
  // Writes one cluster's piece when the top does not hold the cluster (or
  // may not: rechecked under the cluster lock).
  Status WriteSlow(uint64_t cluster_index, uint64_t in_cluster, std::span<const std::byte> piece,
                   Caching caching);
  Status DiscardPiece(uint64_t cluster_index, uint64_t in_cluster, uint64_t length);
  // Makes [file_offset, +length) of the top read as zeros in place.
  Status ZeroInTop(uint64_t file_offset, uint64_t length);
  // Maps a new cluster of zeros (a hole where the host allows) in the top.
  Status MapZeroCluster(uint64_t cluster_index);
  // Reserves a cluster in the top, writes `data` (a whole cluster) there and
  // publishes it; gives the cluster back if the write fails.
  Status AllocateInTop(uint64_t cluster_index, std::span<const std::byte> data,
                       Caching caching = Caching::kDirectWhenAligned);
  // Quiesces: gate closed, layers locked; the destructor reopens.
  class Quiesced;

  std::mutex& ClusterLock(uint64_t cluster_index) {
    return cluster_locks_[cluster_index % cluster_locks_.size()];
  }
  // Cluster-sized scratch buffers for copy-up and partial allocation, cut
  // from IoMemory slabs of at least 2 MiB, so that they lie in huge pages: a
  // copy-up's direct read and write are then a few contiguous pieces for the
  // device (ploop/io/io_memory.h). A buffer goes back to the free list after
  // use and the slabs stay as long as the disk, so the memory kept is the
  // most copy-ups ever in flight at once (at most the callers' concurrency),
  // rounded up to a slab. ENOMEM when a new slab cannot be mapped.
  Result<std::byte*> TakeBuffer();
  void ReturnBuffer(std::byte* buffer);
  // The public calls minus error counting.
  Status ReadImpl(uint64_t offset_bytes, std::span<std::byte> out);
  Status WriteImpl(uint64_t offset_bytes, std::span<const std::byte> data, Caching caching);
  Status DiscardImpl(uint64_t offset_bytes, uint64_t length_bytes);

  std::unique_ptr<Chain> chain_;
  std::vector<Layer> layers_;  // base first
  Delta* top_delta_ = nullptr;
  const uint64_t cluster_bytes_;
  const ServedDiskOptions options_;
  bool writable_;              // changes only while quiesced
  uint64_t io_alignment_ = 1;  // changes only while quiesced
  std::atomic<uint64_t> size_bytes_{0};
  std::atomic<uint64_t> depth_{0};
  std::atomic<bool> closed_{false};

  IoGate gate_;
  // Shared by Flush(); exclusive while the layers change or close.
  std::shared_mutex layers_mu_;
  std::array<std::mutex, 256> cluster_locks_;

  std::mutex buffers_mu_;
  std::vector<IoMemory> buffer_slabs_;
  std::vector<std::byte*> free_buffers_;

  struct AtomicCounters {
    std::atomic<uint64_t> reads{0}, writes{0}, discards{0}, flushes{0};
    std::atomic<uint64_t> bytes_read{0}, bytes_written{0}, allocations{0}, errors{0};
    std::atomic<uint64_t> copy_buffers_allocated{0};
  };
  mutable AtomicCounters counters_;
};

}  // namespace ploop
