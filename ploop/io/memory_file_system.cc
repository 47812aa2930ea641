// Design: each file is a Node holding its bytes in a map of 64 KiB pages so
// that sparse files and hole punching cost nothing; a page absent from the
// map reads as zeros. Open handles share the Node, so a rename or remove of
// the path leaves open handles working, as on POSIX.
#include "ploop/io/memory_file_system.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace ploop {

namespace {
constexpr uint64_t kPageBytes = 64 * 1024;
}

struct MemoryFileSystem::Node {
  uint64_t size = 0;
  std::map<uint64_t, std::vector<std::byte>> pages;  // page index -> kPageBytes bytes
  // Shared lock holders per byte: handle id -> count.
  std::map<uint64_t, std::map<uint64_t, int>> locks;
};

struct MemoryFileSystem::State {
  mutable std::mutex mu;
  std::map<std::string, std::shared_ptr<Node>> files;
  uint64_t capacity = 0;
  uint64_t next_handle = 1;

  uint64_t UsedLocked() const {
    uint64_t used = 0;
    for (const auto& [path, node] : files) used += node->pages.size() * kPageBytes;
    return used;
  }
};

namespace {

using Node = MemoryFileSystem::Node;
using State = MemoryFileSystem::State;

void ReadNode(const Node& node, uint64_t offset, std::span<std::byte> out) {
  size_t done = 0;
  while (done < out.size()) {
    uint64_t pos = offset + done;
    uint64_t page = pos / kPageBytes;
    uint64_t in_page = pos % kPageBytes;
    size_t n = static_cast<size_t>(std::min<uint64_t>(kPageBytes - in_page, out.size() - done));
    auto it = node.pages.find(page);
    if (it == node.pages.end()) {
      std::memset(out.data() + done, 0, n);
    } else {
      std::memcpy(out.data() + done, it->second.data() + in_page, n);
    }
    done += n;
  }
}

// Zeroes [offset, offset+len) dropping whole pages.
void ZeroNode(Node& node, uint64_t offset, uint64_t len) {
  uint64_t end = offset + len;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t page = pos / kPageBytes;
    uint64_t in_page = pos % kPageBytes;
    uint64_t n = std::min(kPageBytes - in_page, end - pos);
    auto it = node.pages.find(page);
    if (it != node.pages.end()) {
      if (n == kPageBytes) {
        node.pages.erase(it);
      } else {
        std::memset(it->second.data() + in_page, 0, n);
      }
    }
    pos += n;
  }
}

class MemoryFile final : public BlockFile {
 public:
  MemoryFile(std::shared_ptr<State> state, std::shared_ptr<Node> node, std::string path,
             bool writable)
      : state_(std::move(state)),
        node_(std::move(node)),
        path_(std::move(path)),
        writable_(writable) {
    std::lock_guard lock(state_->mu);
    handle_ = state_->next_handle++;
  }

  ~MemoryFile() override {
    std::lock_guard lock(state_->mu);
    for (auto& [byte, holders] : node_->locks) holders.erase(handle_);
  }

  Status ReadAt(uint64_t offset, std::span<std::byte> out) override {
    std::lock_guard lock(state_->mu);
    if (offset + out.size() > node_->size) {
      return Status::Corruption("short read of " + path_ + " at " + std::to_string(offset) +
                                ": unexpected end of file");
    }
    ReadNode(*node_, offset, out);
    return Status::Ok();
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    if (!writable_) return Status::FromErrno(EBADF, "write " + path_);
    std::lock_guard lock(state_->mu);
    // Count the pages this write would add, for the capacity check.
    uint64_t new_pages = 0;
    for (uint64_t p = offset / kPageBytes;
         data.size() > 0 && p <= (offset + data.size() - 1) / kPageBytes; ++p) {
      if (!node_->pages.count(p)) ++new_pages;
    }
    if (state_->capacity != 0 && state_->UsedLocked() + new_pages * kPageBytes > state_->capacity) {
      return Status::FromErrno(ENOSPC, "write " + path_ + " at " + std::to_string(offset));
    }
    size_t done = 0;
    while (done < data.size()) {
      uint64_t pos = offset + done;
      uint64_t page = pos / kPageBytes;
      uint64_t in_page = pos % kPageBytes;
      size_t n = static_cast<size_t>(std::min<uint64_t>(kPageBytes - in_page, data.size() - done));
      auto& bytes = node_->pages[page];
      if (bytes.empty()) bytes.resize(kPageBytes);
      std::memcpy(bytes.data() + in_page, data.data() + done, n);
      done += n;
    }
    node_->size = std::max<uint64_t>(node_->size, offset + data.size());
    return Status::Ok();
  }

  Status Sync() override { return Status::Ok(); }

  Result<uint64_t> Size() override {
    std::lock_guard lock(state_->mu);
    return node_->size;
  }

  Status Truncate(uint64_t size) override {
    if (!writable_) return Status::FromErrno(EBADF, "truncate " + path_);
    std::lock_guard lock(state_->mu);
    if (size < node_->size) {
      ZeroNode(*node_, size, node_->size - size);
      // Drop pages wholly past the end.
      node_->pages.erase(node_->pages.lower_bound((size + kPageBytes - 1) / kPageBytes),
                         node_->pages.end());
    }
    node_->size = size;
    return Status::Ok();
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    if (!writable_) return Status::FromErrno(EBADF, "punch hole in " + path_);
    std::lock_guard lock(state_->mu);
    uint64_t end = std::min(offset + length, node_->size);
    if (offset < end) ZeroNode(*node_, offset, end - offset);
    return Status::Ok();
  }

  Status Allocate(uint64_t offset, uint64_t length) override {
    if (!writable_) return Status::FromErrno(EBADF, "allocate " + path_);
    std::lock_guard lock(state_->mu);
    uint64_t end = offset + length;
    uint64_t new_pages = 0;
    for (uint64_t p = offset / kPageBytes; length > 0 && p <= (end - 1) / kPageBytes; ++p) {
      if (!node_->pages.count(p)) ++new_pages;
    }
    if (state_->capacity != 0 && state_->UsedLocked() + new_pages * kPageBytes > state_->capacity) {
      return Status::FromErrno(ENOSPC, "allocate " + path_);
    }
    for (uint64_t p = offset / kPageBytes; length > 0 && p <= (end - 1) / kPageBytes; ++p) {
      auto& bytes = node_->pages[p];
      if (bytes.empty()) bytes.resize(kPageBytes);
    }
    node_->size = std::max(node_->size, end);
    return Status::Ok();
  }

  Result<std::optional<uint64_t>> NextData(uint64_t offset) override {
    std::lock_guard lock(state_->mu);
    if (offset >= node_->size) return std::optional<uint64_t>();
    auto it = node_->pages.lower_bound(offset / kPageBytes);
    if (it == node_->pages.end()) return std::optional<uint64_t>();
    uint64_t start = std::max(offset, it->first * kPageBytes);
    if (start >= node_->size) return std::optional<uint64_t>();
    return std::optional<uint64_t>(start);
  }

  Result<uint64_t> NextHole(uint64_t offset) override {
    std::lock_guard lock(state_->mu);
    uint64_t page = offset / kPageBytes;
    while (page * kPageBytes < node_->size && node_->pages.count(page)) ++page;
    return std::min(std::max(offset, page * kPageBytes), node_->size);
  }

  Status Lock(const LockRequest& request) override {
    std::lock_guard lock(state_->mu);
    for (uint64_t byte : request.probe_bytes) {
      auto it = node_->locks.find(byte);
      if (it == node_->locks.end()) continue;
      for (const auto& [holder, count] : it->second) {
        if (holder != handle_ && count > 0) {
          return Status::Busy(path_ + " is in use by another program: lock byte " +
                              std::to_string(byte) + " is held");
        }
      }
    }
    for (uint64_t byte : request.hold_bytes) node_->locks[byte][handle_] = 1;
    return Status::Ok();
  }

  bool CanPunchHole() const override { return true; }
  const std::string& path() const override { return path_; }

 private:
  std::shared_ptr<State> state_;
  std::shared_ptr<Node> node_;
  std::string path_;
  bool writable_;
  uint64_t handle_ = 0;
};

}  // namespace

MemoryFileSystem::MemoryFileSystem() : state_(std::make_shared<State>()) {}
MemoryFileSystem::~MemoryFileSystem() = default;

Result<std::unique_ptr<BlockFile>> MemoryFileSystem::Open(const std::string& path, OpenMode mode) {
  std::shared_ptr<Node> node;
  {
    std::lock_guard lock(state_->mu);
    auto it = state_->files.find(path);
    if (it == state_->files.end()) return Status::FromErrno(ENOENT, "open " + path);
    node = it->second;
  }
  return std::unique_ptr<BlockFile>(
      new MemoryFile(state_, std::move(node), path, mode == OpenMode::kReadWrite));
}

Result<std::unique_ptr<BlockFile>> MemoryFileSystem::Create(const std::string& path,
                                                            bool exclusive) {
  std::shared_ptr<Node> node;
  {
    std::lock_guard lock(state_->mu);
    auto it = state_->files.find(path);
    if (it != state_->files.end()) {
      if (exclusive) return Status::FromErrno(EEXIST, "create " + path);
      it->second->pages.clear();
      it->second->size = 0;
      node = it->second;
    } else {
      node = std::make_shared<Node>();
      state_->files[path] = node;
    }
  }
  return std::unique_ptr<BlockFile>(new MemoryFile(state_, std::move(node), path, true));
}

Status MemoryFileSystem::Rename(const std::string& from, const std::string& to) {
  std::lock_guard lock(state_->mu);
  auto it = state_->files.find(from);
  if (it == state_->files.end()) return Status::FromErrno(ENOENT, "rename " + from);
  auto node = it->second;
  state_->files.erase(it);
  state_->files[to] = std::move(node);
  return Status::Ok();
}

Status MemoryFileSystem::Remove(const std::string& path) {
  std::lock_guard lock(state_->mu);
  if (state_->files.erase(path) == 0) return Status::FromErrno(ENOENT, "remove " + path);
  return Status::Ok();
}

Status MemoryFileSystem::SyncDir(const std::string& dir) { return Status::Ok(); }

Result<bool> MemoryFileSystem::Exists(const std::string& path) {
  std::lock_guard lock(state_->mu);
  return state_->files.count(path) > 0;
}

Result<uint64_t> MemoryFileSystem::FreeSpace(const std::string& path) {
  std::lock_guard lock(state_->mu);
  if (state_->capacity == 0) return uint64_t{1} << 50;
  uint64_t used = state_->UsedLocked();
  return used >= state_->capacity ? 0 : state_->capacity - used;
}

Result<std::vector<std::string>> MemoryFileSystem::ListDir(const std::string& dir) {
  // Paths are plain strings here: a file is in `dir` when its path is
  // "dir/name" with no further slash ("name" alone for the current folder).
  std::lock_guard lock(state_->mu);
  std::string prefix = dir.empty() || dir == "." ? "" : dir + "/";
  std::vector<std::string> names;
  for (const auto& [path, node] : state_->files) {
    if (path.compare(0, prefix.size(), prefix) != 0) continue;
    std::string rest = path.substr(prefix.size());
    if (!rest.empty() && rest.find('/') == std::string::npos) names.push_back(rest);
  }
  return names;
}

void MemoryFileSystem::set_capacity_bytes(uint64_t capacity) {
  std::lock_guard lock(state_->mu);
  state_->capacity = capacity;
}

uint64_t MemoryFileSystem::used_bytes() const {
  std::lock_guard lock(state_->mu);
  return state_->UsedLocked();
}

std::vector<std::byte> MemoryFileSystem::Contents(const std::string& path) const {
  std::lock_guard lock(state_->mu);
  auto it = state_->files.find(path);
  if (it == state_->files.end()) return {};
  std::vector<std::byte> out(it->second->size);
  ReadNode(*it->second, 0, out);
  return out;
}

}  // namespace ploop
