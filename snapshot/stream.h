// Send and receive streams: a snapshot of a ploop disk, or the changes
// between two snapshots, as one self-describing byte stream that can travel
// through a pipe or ssh and be turned back into a disk elsewhere (the
// ploop equivalent of `zfs send | zfs receive`). The byte format is
// snapshot/STREAM.md.
//
//   full         the chain up to snapshot S, either flattened into one
//                delta or keeping its delta layers; the receiver makes a
//                new disk of it in an empty folder.
//   incremental  only the clusters the deltas above snapshot F (`from`)
//                hold, as a new delta (or layers) over F; the receiver
//                applies it over its own copy of F, which must be there:
//                checked by GUID and by F's content digest before anything
//                is written.
//
// Every chunk carries a SHA-256 chained to the one before, so corruption,
// truncation, reordering and splicing are detected; nothing the stream says
// is trusted before it is checked (sizes and counts are bounded before any
// allocation, decompression is bounded, the receiver picks every file name).
//
// An interrupted receive keeps its partial state in the folder (the disk it
// is building never looks complete: a full receive writes
// DiskDescriptor.xml last, an incremental one adds its deltas to the
// descriptor last). ReceiveResumeToken() gives the token the sender needs
// to continue where the receiver stopped; the continued transfer produces
// files byte-identical to an uninterrupted one.
//
// Libraries never print: progress is reported through a callback.
//
// Thread-safety: the functions are independent; each uses worker threads
// internally and returns when they are done. The StreamReader/StreamWriter
// passed in are used from one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "ploop/descriptor.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop {

// Where a stream comes from (stdin, a socket, memory in tests).
class StreamReader {
 public:
  virtual ~StreamReader() = default;
  // Reads up to out.size() bytes; returns how many. 0 only at the end of
  // the stream. IOError when reading fails.
  virtual Result<size_t> Read(std::span<std::byte> out) = 0;
  // Called from another thread when the receiver stops early: a Read()
  // blocked (or made later) should return soon, with an error or 0. The
  // default does nothing (readers that never block).
  virtual void Cancel() {}
};

// Where a stream goes (stdout, a socket, memory in tests).
class StreamWriter {
 public:
  virtual ~StreamWriter() = default;
  // Writes all of `data`. IOError when writing fails (EPIPE: the reader
  // went away).
  virtual Status Write(std::span<const std::byte> data) = 0;
  // Writes all of `data`, like Write(), but a writer into a pipe may hand
  // the pages themselves to the pipe (vmsplice) instead of copying them
  // (referenced_bytes() then grows). The pipe's reader may in turn pass
  // them on by reference (splice into another pipe or a socket: `pv`
  // does), so once handed over, a page may be read by someone else at any
  // later time: the caller never writes into it again. It may read it,
  // unmap it, or drop it (DropIoMemoryPages) and have fresh pages there.
  // Mapped file pages qualify while nobody changes the file (the sender's
  // locked source). The default is Write().
  virtual Status WriteStable(std::span<const std::byte> data) { return Write(data); }
  // Bytes WriteStable() handed over by reference so far (not copied).
  virtual uint64_t referenced_bytes() const { return 0; }
  // Returns once nothing written by WriteStable() is still in what the
  // writer writes into (a pipe holding spliced pages until the reader took
  // them), or once that reader went away; the sender calls it before it
  // releases its locks. The default has nothing to wait for.
  virtual Status Drain() { return Status::Ok(); }
};

struct StreamProgress {
  enum class Phase {
    kDigest,      // sender: digesting snapshots for an incremental header
    kVerifyBase,  // receiver: digesting its copy of the base (no recorded digest)
    kTransfer,    // the clusters themselves
  };
  Phase phase = Phase::kTransfer;
  // Disk bytes covered so far and in all (clusters looked at, whether sent,
  // skipped as unchanged, or sent as holes); total_bytes is exact for
  // kTransfer and kDigest.
  uint64_t done_bytes = 0;
  uint64_t total_bytes = 0;
  // Bytes of stream written or read so far in this session.
  uint64_t stream_bytes = 0;
};
// Called on the thread that called Send/ReceiveStream, about once per chunk.
using StreamProgressFn = std::function<void(const StreamProgress&)>;

enum class StreamLayout {
  kFlatten,  // one delta holding what the chain reads as
  kLayers,   // one delta per delta of the chain, with their GUIDs
};

// What lz4 made of samples of a chunk's data, and what hashing costs where
// the stream is made: what SendOptions::compress_if decides on.
struct CompressionEstimate {
  uint64_t sampled_bytes = 0;
  uint64_t packed_bytes = 0;   // what the samples compressed to
  uint64_t sample_ns = 0;      // how long compressing them took
  double sha_ns_per_byte = 0;  // the sender's SHA-256 so far; 0: not yet measured
};

// Whether compressing data like `e`'s samples costs less CPU than the
// bytes it saves would cost to move on: each byte of the stream is hashed
// with SHA-256 on both sides (the receiver taken to hash as fast as the
// sender), and lz4 costs its sampled time plus a quarter for the
// receiver's decoding (lz4 decodes 4-6 times faster than it encodes). That
// is the question only while the CPUs are what limits the transfer: a
// slower link or disk makes every byte saved worth more. Measured
// (tools/bench/README.md, session 12): a file system image of /usr costs
// lz4 1.25 ns per byte for 52% of its size, and sending it compressed
// took 2.66 s against 1.74 s stored (SHA-256 at 0.48 ns per byte); the
// benchmark's partly used blocks cost 0.32 ns per byte for 25%, and are
// worth it. True when nothing was sampled or timed.
bool CompressionPaysOff(const CompressionEstimate& e);

struct SendOptions {
  // The snapshot to send; empty: the disk's current top.
  std::string guid;
  // The base of an incremental stream (an ancestor of `guid`); empty: a
  // full stream.
  std::string from_guid;
  StreamLayout layout = StreamLayout::kFlatten;
  // Continue an interrupted transfer: the token the receiver printed.
  std::string resume_token;
  // lz4-compress chunks (a chunk that does not shrink is sent as it is).
  bool compress = true;
  // With `compress`, asked for each chunk whose samples shrink whether to
  // compress it (true) or send it as it is; null: compress it. The stream
  // is valid either way; its bytes then depend on the answers.
  std::function<bool(const CompressionEstimate&)> compress_if;
  // Hash and compression workers; 0: one per CPU, at most 4.
  unsigned threads = 0;
  // Read the snapshot through read-only mappings of its files where they
  // allow it (BlockFile::Map), so stored data goes from the page cache to
  // the writer (StreamWriter::WriteStable) without being read into
  // buffers first: for a snapshot in the page cache. False (the default)
  // reads it ahead with direct I/O (ReadAhead), which keeps the disk
  // busier on a cold snapshot and leaves the page cache to others. The
  // stream's bytes are the same either way. A mapped page that cannot be
  // read (the file shrank under us, or the device failed) raises SIGBUS
  // instead of returning an error: only a caller that handles SIGBUS (as
  // `ploop send` does) should set it. The chain's pages may outlive the
  // send in a pipe whose reader splices them on (`pv`): a write to the
  // disk right after the send can change what is still to be read there,
  // which the receiver's digests then refuse.
  bool map_source = false;
  StreamProgressFn progress;
};

struct SendSummary {
  uint64_t stream_bytes = 0;
  uint64_t data_clusters = 0;  // clusters sent with data
  uint64_t zero_clusters = 0;  // clusters sent as holes
  uint64_t chunks = 0;
};

// Writes the stream of `options` for the disk of descriptor `dd_path` to
// `out`. The chain is opened read-only with reader locks, so nobody writes
// to it meanwhile. Errors:
//   NotFound            an unknown GUID;
//   InvalidArgument     `from_guid` not an ancestor of `guid` (or the top,
//                       or the same), a malformed GUID or token;
//   FailedPrecondition  an interrupted merge in the chain; a resume token
//                       of another stream (other snapshots, options or
//                       content);
//   NotSupported        a disk size that is not a multiple of the cluster
//                       size (a raw base of odd size), --layers with more
//                       layers than a stream may carry;
//   Busy                a delta is open for writing elsewhere;
//   IOError             reading the disk or writing `out` failed.
Result<SendSummary> SendStream(FileSystem& fs, const std::string& dd_path, StreamWriter& out,
                               const SendOptions& options, const DescriptorLoadOptions& load = {});

struct ReceiveOptions {
  // Continue the interrupted receive in the folder (the stream must be the
  // continuation the sender made from its resume token).
  bool resume = false;
  unsigned threads = 0;
  StreamProgressFn progress;
  // How much cluster data may arrive between two checkpoints (data and the
  // resume state made durable): what a crash of the receiver may make it
  // receive again. Tests make it small.
  uint64_t checkpoint_bytes = 1ull << 30;
  // Write the received clusters with direct I/O where the file system
  // allows it (the header and BAT stay buffered), queued on a writer
  // thread so that the device works while the next chunks are checked.
  // Off: through the page cache, whose write-back then does the work.
  bool direct_io = true;
};

struct ReceiveSummary {
  bool incremental = false;
  // The GUIDs of the deltas received, base first; the last is the snapshot
  // (or the top) the stream was made of.
  std::vector<std::string> guids;
  uint64_t stream_bytes = 0;
  uint64_t data_clusters = 0;
  uint64_t zero_clusters = 0;
};

// Reads a stream from `in` into folder `dir` (which must exist): a full
// stream makes a new disk there (DiskDescriptor.xml written last); an
// incremental one adds its deltas over the base snapshot of the disk there
// and moves the disk's top onto them (the top must hold no data: it is
// replaced by an empty one, as after `snapshot-switch`). Errors, with
// nothing written unless said:
//   Corruption          the stream is malformed, corrupt, truncated or
//                       hostile (a one-line reason);
//   NotSupported        a stream version this code does not read;
//   AlreadyExists       a full stream into a folder holding a disk, or
//                       deltas whose GUIDs the disk already has;
//   NotFound            an incremental stream whose base is not there;
//                       `resume` without an interrupted receive;
//   FailedPrecondition  the base's content digest differs from the
//                       sender's; the disk's top holds data; an interrupted
//                       receive is in the folder and `resume` is not set;
//                       `resume` with a stream that does not continue it;
//   InvalidArgument     a continuation stream without `resume`;
//   NoSpace, IOError    the file system's.
// Once the header and the base have been checked, a failure leaves the
// partial state in `dir` (HasInterruptedReceive() is then true): the
// received prefix, checkpointed, to be continued with `resume`.
Result<ReceiveSummary> ReceiveStream(FileSystem& fs, const std::string& dir, StreamReader& in,
                                     const ReceiveOptions& options);

// Whether `dir` holds an interrupted receive.
Result<bool> HasInterruptedReceive(FileSystem& fs, const std::string& dir);

// The resume token of the interrupted receive in `dir`, for `send
// --resume`. NotFound when there is none; Corruption when its state file is
// damaged.
Result<std::string> ReceiveResumeToken(FileSystem& fs, const std::string& dir);

// Discards the interrupted receive in `dir`: its partial delta files and
// its state. The disk that was there before (for an incremental receive)
// is untouched. NotFound when there is none.
Status AbortReceive(FileSystem& fs, const std::string& dir);

// The name of the file holding an interrupted receive's state, in the
// receiving folder.
inline constexpr char kReceiveStateFileName[] = "ploop-receive.state";

}  // namespace ploop
