// The I/O abstraction every ploop library goes through.
//
// BlockFile is one open file addressed by byte offset; FileSystem opens,
// creates, renames and removes them. Three implementations:
//   - PosixFileSystem (posix_file_system.h): production, pread/pwrite/fdatasync.
//   - MemoryFileSystem (memory_file_system.h): unit tests, no disk.
//   - FaultFileSystem (fault_file_system.h): wraps either and injects errors,
//     crashes (drops unsynced writes) and torn writes.
//
// Thread-safety: a BlockFile may be used from several threads at once for
// ReadAt/WriteAt on disjoint ranges, and Sync() may run alongside them (it
// makes durable at least what completed before it was called); everything
// else needs external serialisation. FileSystem methods are thread-safe.
// Ownership: a FileSystem must outlive every BlockFile it opened.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ploop/status.h"

namespace ploop {

// A byte-range lock request in the QEMU/OpenVZ convention: shared (read)
// locks on single bytes, checked beforehand by probing other holders with a
// write-lock query (F_OFD_GETLK). See lock.h for the byte numbers.
struct LockRequest {
  // Bytes that must not be locked by anyone else.
  std::vector<uint64_t> probe_bytes;
  // Bytes to hold a shared lock on while the file is open.
  std::vector<uint64_t> hold_bytes;
};

// A read-only view of part of a file in memory (BlockFile::Map): reads of
// data() see the file's page cache without copying it. Unmapped when
// destroyed; what was taken from data() (pointers, page references a pipe
// holds after vmsplice) must not be used through it afterwards.
class FileMapping {
 public:
  virtual ~FileMapping() = default;
  virtual std::span<const std::byte> data() const = 0;
};

class BlockFile {
 public:
  virtual ~BlockFile() = default;

  // Reads exactly out.size() bytes at `offset_bytes`. Reading past EOF is a
  // kCorruption error ("short read"); I/O failures are kIOError.
  virtual Status ReadAt(uint64_t offset_bytes, std::span<std::byte> out) = 0;
  // Writes all of `data` at `offset_bytes`, extending the file if needed.
  // kNoSpace when the host file system is full.
  virtual Status WriteAt(uint64_t offset_bytes, std::span<const std::byte> data) = 0;
  // WriteAt through the page cache even where direct I/O is enabled and the
  // request is aligned (see EnableDirectIo): for small writes that the host
  // may batch. What is written and what Sync() makes durable are the same.
  virtual Status WriteAtBuffered(uint64_t offset_bytes, std::span<const std::byte> data) {
    return WriteAt(offset_bytes, data);
  }
  // Makes every completed write and size change durable (fdatasync).
  virtual Status Sync() = 0;
  virtual Result<uint64_t> Size() = 0;
  // Sets the file's length; growing adds a hole that reads as zeros.
  virtual Status Truncate(uint64_t size_bytes) = 0;
  // Deallocates a range, which then reads as zeros; the length is kept.
  // kNotSupported when the file system cannot (see CanPunchHole()).
  virtual Status PunchHole(uint64_t offset_bytes, uint64_t length_bytes) = 0;
  // Reserves space for a range (fallocate, keeping zeros where there were
  // holes), extending the file when the range passes EOF.
  virtual Status Allocate(uint64_t offset_bytes, uint64_t length_bytes) = 0;
  // The first offset >= `offset_bytes` that holds data (SEEK_DATA), or
  // nullopt when only holes remain. Files that cannot tell say every offset
  // holds data.
  virtual Result<std::optional<uint64_t>> NextData(uint64_t offset_bytes) = 0;
  // The first offset >= `offset_bytes` inside a hole (SEEK_HOLE); EOF counts
  // as a hole.
  virtual Result<uint64_t> NextHole(uint64_t offset_bytes) = 0;
  // A hint that [offset_bytes, offset_bytes + length_bytes) will be read
  // soon: the file may start reading it in the background, so a sequential
  // reader keeps several requests in flight without threads. It never
  // changes what reads return or what is durable, and cannot fail; the
  // default ignores it.
  virtual void Prefetch(uint64_t offset_bytes, uint64_t length_bytes) {
    (void)offset_bytes;
    (void)length_bytes;
  }
  // From now on, reads and writes whose offset, length and buffer address
  // are multiples of the returned alignment bypass the page cache (O_DIRECT);
  // the rest stay buffered. What reads return and what Sync() makes durable
  // do not change. A served disk uses it so that data is not cached twice
  // (once above the disk, once for the image file). Call it before sharing
  // the file between threads. NotSupported (the default) when the file
  // system cannot.
  virtual Result<uint64_t> EnableDirectIo() {
    return Status::NotSupported(path() + ": no direct I/O");
  }
  // Maps [offset_bytes, offset_bytes + length_bytes) of the file read-only
  // (mmap MAP_SHARED, PROT_READ), for a reader that wants the page cache's
  // bytes without reading them into a buffer. The range must lie inside the
  // file as it is now (InvalidArgument otherwise). Touching the mapping
  // after the file shrank below it kills the process with SIGBUS, so map
  // only files nobody may shrink meanwhile (opened with reader locks) and
  // check sizes first. NotSupported (the default) when the file system
  // cannot: the in-memory and fault-injecting ones decline, so that their
  // reads keep going through ReadAt(); an mmap failure is an IOError.
  // Either way the caller can fall back to ReadAt().
  virtual Result<std::unique_ptr<FileMapping>> Map(uint64_t offset_bytes, uint64_t length_bytes) {
    (void)offset_bytes;
    (void)length_bytes;
    return Status::NotSupported(path() + ": cannot be mapped");
  }
  // Takes the byte-range locks of `request`; kBusy, naming the byte, when a
  // probed byte is locked through another open of the same file (in this
  // process or another).
  virtual Status Lock(const LockRequest& request) = 0;
  // A new descriptor (close-on-exec, owned by the caller) for this file's
  // open file description: it shares the description's access mode and the
  // locks Lock() took, which last until the last descriptor of the
  // description is closed. For handing the open, locked file to the kernel
  // (a loop device) with no moment in which the locks are released.
  // NotSupported (the default) for files that are not kernel files.
  virtual Result<int> DuplicateDescriptor() {
    return Status::NotSupported(path() + ": no kernel file descriptor");
  }
  // For a caller that does this file's I/O itself, asynchronously
  // (io_uring): the kernel descriptor that ReadAt() -- or WriteAt(), or
  // WriteAtBuffered() when `buffered` -- would use for this request, valid
  // while the file is open; -1 (the default) for files that are not kernel
  // files or that must see every access themselves (the fault-injecting
  // one). A short transfer through the descriptor is the caller's to finish
  // (ReadAt()/WriteAt() of the rest).
  virtual int DescriptorFor(uint64_t offset_bytes, const void* buffer, uint64_t length_bytes,
                            bool buffered) const {
    (void)offset_bytes;
    (void)buffer;
    (void)length_bytes;
    (void)buffered;
    return -1;
  }

  virtual bool CanPunchHole() const = 0;
  virtual const std::string& path() const = 0;
};

enum class OpenMode { kReadOnly, kReadWrite };

class FileSystem {
 public:
  virtual ~FileSystem() = default;

  // Opens an existing file. kNotFound when missing.
  virtual Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) = 0;
  // Creates a new empty file opened read-write; kAlreadyExists when
  // `exclusive` and the path exists, otherwise an existing file is truncated.
  virtual Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) = 0;
  // Atomically replaces `to` with `from`.
  virtual Status Rename(const std::string& from, const std::string& to) = 0;
  virtual Status Remove(const std::string& path) = 0;
  // Makes creations, renames and removals in directory `dir` durable.
  virtual Status SyncDir(const std::string& dir) = 0;
  virtual Result<bool> Exists(const std::string& path) = 0;
  // Bytes available to an unprivileged writer on the file system holding
  // `path`.
  virtual Result<uint64_t> FreeSpace(const std::string& path) = 0;
  // The absolute path `path` really names, with every symlink resolved in
  // the components that exist; components that do not exist (a dangling
  // symlink included) are kept as written. Used to check that a file stays
  // inside a folder. File systems without symlinks (the in-memory one)
  // return `path` unchanged, which is this default.
  virtual Result<std::string> RealPath(const std::string& path) { return path; }
  // Names (not paths) of the regular files in folder `dir` ("" is the
  // current folder), in no particular order. NotFound when it is missing.
  virtual Result<std::vector<std::string>> ListDir(const std::string& dir) = 0;
};

// The process-wide POSIX file system; with PLOOP_FAULT set in the
// environment it is wrapped in a FaultFileSystem configured from it (see
// fault_file_system.h), so shell tests can inject faults into the CLI.
FileSystem& DefaultFileSystem();

}  // namespace ploop
