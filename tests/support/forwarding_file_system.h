// ForwardingFileSystem: a FileSystem that passes every call to another one;
// ForwardingBlockFile: the same for one file.
// Tests derive from them and override only the calls they watch or change
// (a hook at a rename, directory operations remembered, reads paused,
// writes counted).
//
// Thread-safety: as the base file system. Ownership: the base must outlive
// it.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ploop/io/file_system.h"

namespace ploop::testing {

// Only BlockFile's required calls are passed on. The optional ones keep
// their defaults, which decline (no direct I/O, no mapping, no kernel
// descriptor) or come back through ReadAt()/WriteAt() (WriteAtBuffered):
// every byte read or written then passes where a test can watch it, as
// in FaultFileSystem.
class ForwardingBlockFile : public BlockFile {
 public:
  explicit ForwardingBlockFile(std::unique_ptr<BlockFile> base) : base_(std::move(base)) {}

  Status ReadAt(uint64_t offset, std::span<std::byte> out) override {
    return base_->ReadAt(offset, out);
  }
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    return base_->WriteAt(offset, data);
  }
  Status Sync() override { return base_->Sync(); }
  Result<uint64_t> Size() override { return base_->Size(); }
  Status Truncate(uint64_t size) override { return base_->Truncate(size); }
  Status PunchHole(uint64_t offset, uint64_t length) override {
    return base_->PunchHole(offset, length);
  }
  Status Allocate(uint64_t offset, uint64_t length) override {
    return base_->Allocate(offset, length);
  }
  Result<std::optional<uint64_t>> NextData(uint64_t offset) override {
    return base_->NextData(offset);
  }
  Result<uint64_t> NextHole(uint64_t offset) override { return base_->NextHole(offset); }
  Status Lock(const LockRequest& request) override { return base_->Lock(request); }
  bool CanPunchHole() const override { return base_->CanPunchHole(); }
  const std::string& path() const override { return base_->path(); }

 protected:
  BlockFile& base() { return *base_; }

 private:
  std::unique_ptr<BlockFile> base_;
};

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
