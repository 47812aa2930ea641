// ForwardingFileSystem: a FileSystem that passes every call to another one.
// Tests derive from it and override only the calls they watch or change
// (a hook at a rename, directory operations remembered, reads paused).
//
// Thread-safety: as the base file system. Ownership: the base must outlive
// it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ploop/io/file_system.h"

namespace ploop::testing {

class ForwardingFileSystem : public FileSystem {
 public:
  explicit ForwardingFileSystem(FileSystem& base) : base_(base) {}

  Result<std::unique_ptr<BlockFile>> Open(const std::string& path, OpenMode mode) override {
    return base_.Open(path, mode);
  }
  Result<std::unique_ptr<BlockFile>> Create(const std::string& path, bool exclusive) override {
    return base_.Create(path, exclusive);
  }
  Status Rename(const std::string& from, const std::string& to) override {
    return base_.Rename(from, to);
  }
  Status Remove(const std::string& path) override { return base_.Remove(path); }
  Status SyncDir(const std::string& dir) override { return base_.SyncDir(dir); }
  Result<bool> Exists(const std::string& path) override { return base_.Exists(path); }
  Result<uint64_t> FreeSpace(const std::string& path) override { return base_.FreeSpace(path); }
  Result<std::vector<std::string>> ListDir(const std::string& dir) override {
    return base_.ListDir(dir);
  }
  Result<std::string> RealPath(const std::string& path) override { return base_.RealPath(path); }

 protected:
  FileSystem& base() { return base_; }

 private:
  FileSystem& base_;
};

}  // namespace ploop::testing
