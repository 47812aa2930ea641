// MemoryFileSystem: files held in memory, for unit tests that need no disk.
//
// Semantics follow POSIX closely enough for the image library: reads past
// EOF fail, writes extend, holes read as zeros, renames are atomic, and
// byte-range locks conflict between different opens of one file as OFD locks
// do. Nothing is lost on "crash" here; wrap it in FaultFileSystem for that.
//
// Thread-safety: all methods are thread-safe (one mutex per file system).
#pragma once

#include <map>
#include <memory>
#include <mutex>

#include "ploop/io/file_system.h"

namespace ploop {

class MemoryFileSystem final : public FileSystem {
 public:
  MemoryFileSystem();
  ~MemoryFileSystem() override;

  Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) override;
  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status Remove(const std::string& path) override;
  Status SyncDir(const std::string& dir) override;
  Result<bool> Exists(const std::string& path) override;
  Result<uint64_t> FreeSpace(const std::string& path) override;
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;

  // Limits the total bytes all files may hold; writes past it fail with
  // ENOSPC. 0 (the default) means unlimited.
  void set_capacity_bytes(uint64_t capacity);
  // Bytes held by all files (holes not counted).
  uint64_t used_bytes() const;
  // A copy of a file's whole content, for assertions; empty when missing.
  std::vector<std::byte> Contents(const std::string& path) const;

  struct Node;
  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace ploop
