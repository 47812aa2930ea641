// PosixFileSystem: the production FileSystem over open(2), pread(2),
// pwrite(2), fdatasync(2), fallocate(2) and OFD byte-range locks.
//
// Thread-safety: as FileSystem; a PosixFile may be read and written from
// several threads at once (pread/pwrite are positionless).
#pragma once

#include "ploop/io/file_system.h"

namespace ploop {

class PosixFileSystem final : public FileSystem {
 public:
  Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) override;
  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status Remove(const std::string& path) override;
  Status SyncDir(const std::string& dir) override;
  Result<bool> Exists(const std::string& path) override;
  Result<uint64_t> FreeSpace(const std::string& path) override;
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;
  Result<std::string> RealPath(const std::string& path) override;
};

}  // namespace ploop
