// FaultFileSystem: wraps another FileSystem and injects faults, for crash
// and error-path tests (in-process) and for shell tests of the CLI (through
// the PLOOP_FAULT environment variable, see Configure()).
//
// What it can do:
//   - fail the Nth operation of a kind with a chosen errno (FailNth);
//   - "cut the power" after N mutating operations: every later operation
//     fails with EIO, optionally tearing the write at the cut (CutAfter);
//   - Crash(): forget writes not made durable by Sync(), keeping none, all,
//     or a seeded random subset of them, so ordering bugs (a BAT written
//     before its data was synced) show up as reads of unwritten data;
//   - log every operation, for debugging a failing crash test.
// Directory operations (create, rename, remove) are treated as durable at
// once; only file contents and sizes are subject to Crash().
//
// Concurrent use (a served disk's worker threads): operations on disjoint
// ranges may run at once. A Sync() makes durable exactly the operations that
// had completed when it started, as fsync(2) does; one still running may or
// may not survive a Crash(). The cut counts operations in the order they
// reach Before().
//
// Thread-safety: thread-safe; fault state is guarded by one mutex.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "ploop/io/file_system.h"

namespace ploop {

enum class FaultOp {
  kRead,
  kWrite,
  kSync,
  kTruncate,
  kPunchHole,
  kAllocate,
  kOpen,
  kCreate,
  kRename,
  kRemove
};

// Which unsynced writes survive a Crash().
enum class CrashMode {
  kDropAll,  // every unsynced write is lost (power cut before write-back)
  kKeepAll,  // every write survives (the process died, the kernel did not)
  kRandom,   // each unsynced write survives or not, chosen by a seeded RNG
};

class FaultFileSystem final : public FileSystem {
 public:
  explicit FaultFileSystem(FileSystem& base);
  ~FaultFileSystem() override;

  // Makes the `n`-th (1-based, counted from now) operation of kind `op` fail
  // with `err`. Later operations of that kind succeed again.
  void FailNth(FaultOp op, uint64_t n, int err);
  // Makes every operation of kind `op` from the `n`-th on fail with `err`.
  void FailFrom(FaultOp op, uint64_t n, int err);
  // After `n` more mutating operations (write, truncate, punch, allocate,
  // sync), every operation fails with EIO until Crash() or Reset(). With
  // `torn`, the write at the cut is half applied (a whole-sector prefix)
  // before failing.
  void CutAfter(uint64_t n, bool torn = false);
  // Forgets writes that no Sync() made durable, per `mode`, then clears
  // every armed fault so the files can be reopened and inspected.
  Status Crash(CrashMode mode, uint64_t seed = 0);
  // Clears armed faults without touching data.
  void Reset();

  // Mutating operations so far (what CutAfter counts).
  uint64_t mutation_count() const;
  // True once a cut has happened.
  bool cut() const;
  // One line per operation: "write img 4096+512", "sync img", ...
  std::vector<std::string> log() const;
  void set_logging(bool on);

  // Parses a comma-separated spec, as read from PLOOP_FAULT:
  //   fail=OP:N:ERRNO    fail the Nth OP (write, sync, read, truncate, punch,
  //                      allocate, open, create, rename, remove) with ERRNO
  //                      (a number or a name: EIO, ENOSPC, EDQUOT, EROFS)
  //   failfrom=OP:N:ERRNO  every OP from the Nth on
  //   cut=N              cut after N mutating operations
  //   torn               tear the write at the cut
  // InvalidArgument on anything else.
  Status Configure(std::string_view spec);

  Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) override;
  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status Remove(const std::string& path) override;
  Status SyncDir(const std::string& dir) override;
  Result<bool> Exists(const std::string& path) override;
  Result<uint64_t> FreeSpace(const std::string& path) override;
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;
  Result<std::string> RealPath(const std::string& path) override;

  // Internal: called by FaultFile.
  struct Journal;
  enum class JournalKind { kWrite, kTruncate, kPunch, kAllocate };
  Status Before(FaultOp op, const std::string& path, std::string detail, size_t* torn_bytes);
  // Records, before it happens, an operation that changes [offset,
  // offset+length) (for a truncate: everything past `new_size`). Returns the
  // entry's id for Completed().
  uint64_t Record(const std::string& path, BlockFile& file, JournalKind kind, uint64_t offset,
                  uint64_t length, uint64_t new_size, std::span<const std::byte> new_bytes);
  // The base file system finished the recorded operation `id`; `ok` false
  // when it refused it (a crash must then not replay it).
  void Completed(const std::string& path, uint64_t id, bool ok);
  // A Sync() of `path` starts: the ids of the operations it covers (those
  // completed by now).
  std::vector<uint64_t> SyncStarts(const std::string& path);
  // That Sync() succeeded: its operations are durable.
  void Synced(const std::string& path, const std::vector<uint64_t>& ids);

 private:
  FileSystem& base_;
  mutable std::mutex mu_;
  std::map<FaultOp, uint64_t> counts_;
  struct Rule {
    FaultOp op;
    uint64_t n;
    int err;
    bool from;
  };
  std::vector<Rule> rules_;
  uint64_t mutations_ = 0;
  uint64_t cut_after_ = UINT64_MAX;
  bool torn_ = false;
  bool cut_ = false;
  bool logging_ = false;
  std::vector<std::string> log_;
  // Per path: what changed since that file's last Sync().
  std::map<std::string, std::unique_ptr<Journal>> journals_;
  uint64_t next_entry_id_ = 1;
};

}  // namespace ploop
