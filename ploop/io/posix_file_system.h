// PosixFileSystem: the production FileSystem over open(2), pread(2),
// pwrite(2), fdatasync(2), fallocate(2) and OFD byte-range locks.
//
// Thread-safety: as FileSystem; a PosixFile may be read and written from
// several threads at once (pread/pwrite are positionless; the only state it
// keeps, whether hole punching works, is atomic).
#pragma once

#include "ploop/io/file_system.h"

namespace ploop {

// Takes the byte-range locks of `request` on the open file description
// `fd` (OFD locks: they live as long as the description, whoever holds it
// -- a loop device attached to it keeps them). Busy, naming the byte and
// `path`, when a probed byte is locked elsewhere. What PosixFile::Lock()
// does, for callers that own a raw descriptor (mount-helper/).
Status LockFileDescriptor(int fd, const std::string& path, const LockRequest& request);

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
