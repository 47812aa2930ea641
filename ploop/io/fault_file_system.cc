// Design: every mutating call on a FaultFile first asks Before() whether it
// may run (armed rules, the cut), then records an undo/redo entry in the
// file's Journal: the bytes and size it is about to overwrite and what it
// writes, and marks it completed once the base file system returned. Sync()
// removes the entries that had completed when it started, since those are
// now durable; entries of operations still running on other threads stay.
// Crash() rolls each journal back to the last synced state (undo in reverse)
// and then replays the entries the CrashMode keeps (redo in order), which
// models a disk that wrote back an arbitrary subset of the dirty data.
#include "ploop/io/fault_file_system.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <random>

namespace ploop {

namespace {

bool IsMutation(FaultOp op) {
  return op == FaultOp::kWrite || op == FaultOp::kSync || op == FaultOp::kTruncate ||
         op == FaultOp::kPunchHole || op == FaultOp::kAllocate;
}

const char* OpName(FaultOp op) {
  switch (op) {
    case FaultOp::kRead:
      return "read";
    case FaultOp::kWrite:
      return "write";
    case FaultOp::kSync:
      return "sync";
    case FaultOp::kTruncate:
      return "truncate";
    case FaultOp::kPunchHole:
      return "punch";
    case FaultOp::kAllocate:
      return "allocate";
    case FaultOp::kOpen:
      return "open";
    case FaultOp::kCreate:
      return "create";
    case FaultOp::kRename:
      return "rename";
    case FaultOp::kRemove:
      return "remove";
  }
  return "?";
}

}  // namespace

struct FaultFileSystem::Journal {
  struct Entry {
    JournalKind kind;
    uint64_t offset = 0;
    uint64_t length = 0;
    uint64_t old_size = 0;
    uint64_t new_size = 0;
    std::vector<std::byte> old_bytes;  // [offset, offset+old_bytes.size()) before the op
    std::vector<std::byte> new_bytes;  // for writes: the data written
    bool refused = false;              // the base failed it: undo only, never redo
    bool completed = false;            // the base returned (a Sync() now covers it)
    uint64_t id = 0;
  };
  std::vector<Entry> entries;
  // The file's size as the durable state has it: its size when the journal
  // began, changed by every entry a Sync() covered since.
  uint64_t durable_size = 0;
};

namespace {

// The file size after entry `e` applied to a file of `size` bytes.
uint64_t SizeAfter(const FaultFileSystem::Journal::Entry& e, uint64_t size) {
  switch (e.kind) {
    case FaultFileSystem::JournalKind::kWrite:
      return std::max(size, e.offset + e.new_bytes.size());
    case FaultFileSystem::JournalKind::kTruncate:
      return e.new_size;
    case FaultFileSystem::JournalKind::kAllocate:
      return std::max(size, e.new_size);
    case FaultFileSystem::JournalKind::kPunch:
      return size;
  }
  return size;
}

class FaultFile final : public BlockFile {
  using Kind = FaultFileSystem::JournalKind;

 public:
  FaultFile(FaultFileSystem& fs, std::unique_ptr<BlockFile> base)
      : fs_(fs), base_(std::move(base)) {}

  Status ReadAt(uint64_t offset, std::span<std::byte> out) override {
    TRY(fs_.Before(FaultOp::kRead, path(),
                   std::to_string(offset) + "+" + std::to_string(out.size()), nullptr));
    return base_->ReadAt(offset, out);
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    size_t torn = 0;
    Status s = fs_.Before(FaultOp::kWrite, path(),
                          std::to_string(offset) + "+" + std::to_string(data.size()), &torn);
    if (!s.ok()) {
      if (torn > 0) {
        uint64_t id = fs_.Record(path(), *base_, Kind::kWrite, offset, torn, 0, data.first(torn));
        Status torn_write = base_->WriteAt(offset, data.first(torn));
        fs_.Completed(path(), id, torn_write.ok());
      }
      return s;
    }
    uint64_t id = fs_.Record(path(), *base_, Kind::kWrite, offset, data.size(), 0, data);
    return Finish(id, base_->WriteAt(offset, data));
  }

  Status Sync() override {
    TRY(fs_.Before(FaultOp::kSync, path(), "", nullptr));
    std::vector<uint64_t> covered = fs_.SyncStarts(path());
    TRY(base_->Sync());
    fs_.Synced(path(), covered);
    return Status::Ok();
  }

  Result<uint64_t> Size() override { return base_->Size(); }

  Status Truncate(uint64_t size) override {
    TRY(fs_.Before(FaultOp::kTruncate, path(), std::to_string(size), nullptr));
    uint64_t id = fs_.Record(path(), *base_, Kind::kTruncate, size, 0, size, {});
    return Finish(id, base_->Truncate(size));
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    TRY(fs_.Before(FaultOp::kPunchHole, path(),
                   std::to_string(offset) + "+" + std::to_string(length), nullptr));
    uint64_t id = fs_.Record(path(), *base_, Kind::kPunch, offset, length, 0, {});
    return Finish(id, base_->PunchHole(offset, length));
  }

  Status Allocate(uint64_t offset, uint64_t length) override {
    TRY(fs_.Before(FaultOp::kAllocate, path(),
                   std::to_string(offset) + "+" + std::to_string(length), nullptr));
    uint64_t id = fs_.Record(path(), *base_, Kind::kAllocate, offset, 0, offset + length, {});
    return Finish(id, base_->Allocate(offset, length));
  }

  Result<std::optional<uint64_t>> NextData(uint64_t offset) override {
    TRY(fs_.Before(FaultOp::kRead, path(), "seek-data", nullptr));
    return base_->NextData(offset);
  }
  Result<uint64_t> NextHole(uint64_t offset) override {
    TRY(fs_.Before(FaultOp::kRead, path(), "seek-hole", nullptr));
    return base_->NextHole(offset);
  }
  // A hint: not an operation that can fail, change data or count.
  void Prefetch(uint64_t offset, uint64_t length) override { base_->Prefetch(offset, length); }
  // Changes only how the base does its I/O; every call still comes here.
  Result<uint64_t> EnableDirectIo() override { return base_->EnableDirectIo(); }
  Status Lock(const LockRequest& request) override { return base_->Lock(request); }
  // The kernel's file itself: what goes through it bypasses the faults.
  Result<int> DuplicateDescriptor() override { return base_->DuplicateDescriptor(); }
  bool CanPunchHole() const override { return base_->CanPunchHole(); }
  const std::string& path() const override { return base_->path(); }

 private:
  // The base file system's answer to recorded operation `id`: when it
  // refused (ENOSPC, ...), a crash must not replay the operation.
  Status Finish(uint64_t id, Status s) {
    fs_.Completed(path(), id, s.ok());
    return s;
  }

  FaultFileSystem& fs_;
  std::unique_ptr<BlockFile> base_;
};

}  // namespace

FaultFileSystem::FaultFileSystem(FileSystem& base) : base_(base) {}
FaultFileSystem::~FaultFileSystem() = default;

void FaultFileSystem::FailNth(FaultOp op, uint64_t n, int err) {
  std::lock_guard lock(mu_);
  rules_.push_back({op, counts_[op] + n, err, false});
}

void FaultFileSystem::FailFrom(FaultOp op, uint64_t n, int err) {
  std::lock_guard lock(mu_);
  rules_.push_back({op, counts_[op] + n, err, true});
}

void FaultFileSystem::CutAfter(uint64_t n, bool torn) {
  std::lock_guard lock(mu_);
  cut_after_ = mutations_ + n;
  torn_ = torn;
}

void FaultFileSystem::Reset() {
  std::lock_guard lock(mu_);
  rules_.clear();
  cut_after_ = UINT64_MAX;
  cut_ = false;
  torn_ = false;
}

uint64_t FaultFileSystem::mutation_count() const {
  std::lock_guard lock(mu_);
  return mutations_;
}

bool FaultFileSystem::cut() const {
  std::lock_guard lock(mu_);
  return cut_;
}

std::vector<std::string> FaultFileSystem::log() const {
  std::lock_guard lock(mu_);
  return log_;
}

void FaultFileSystem::set_logging(bool on) {
  std::lock_guard lock(mu_);
  logging_ = on;
}

Status FaultFileSystem::Before(FaultOp op, const std::string& path, std::string detail,
                               size_t* torn_bytes) {
  std::lock_guard lock(mu_);
  if (logging_) log_.push_back(std::string(OpName(op)) + " " + path + " " + detail);
  if (cut_) return Status::FromErrno(EIO, std::string(OpName(op)) + " " + path + " (after cut)");
  uint64_t count = ++counts_[op];
  for (const Rule& r : rules_) {
    if (r.op == op && (count == r.n || (r.from && count > r.n))) {
      return Status::FromErrno(r.err, std::string(OpName(op)) + " " + path + " (injected)");
    }
  }
  if (IsMutation(op)) {
    ++mutations_;
    if (mutations_ > cut_after_) {
      cut_ = true;
      if (torn_ && op == FaultOp::kWrite && torn_bytes != nullptr) {
        // Half the write, rounded down to whole sectors, reaches the file.
        size_t len = 0;
        size_t plus = detail.find('+');
        if (plus != std::string::npos) len = std::stoull(detail.substr(plus + 1));
        *torn_bytes = (len / 2) & ~size_t{511};
      }
      return Status::FromErrno(EIO, std::string(OpName(op)) + " " + path + " (power cut)");
    }
  }
  return Status::Ok();
}

uint64_t FaultFileSystem::Record(const std::string& path, BlockFile& file, JournalKind kind,
                                 uint64_t offset, uint64_t length, uint64_t new_size,
                                 std::span<const std::byte> new_bytes) {
  Journal::Entry e;
  e.kind = kind;
  e.offset = offset;
  e.length = length;
  e.new_size = new_size;
  e.new_bytes.assign(new_bytes.begin(), new_bytes.end());
  auto size = file.Size();
  e.old_size = size.ok() ? *size : 0;
  // The bytes this operation may change, as they are now.
  uint64_t old_end =
      kind == JournalKind::kTruncate ? e.old_size : std::min(e.old_size, offset + length);
  if (old_end > offset) {
    e.old_bytes.resize(old_end - offset);
    if (!file.ReadAt(offset, e.old_bytes).ok()) e.old_bytes.clear();
  }
  std::lock_guard lock(mu_);
  auto& j = journals_[path];
  if (!j) {
    // No operation of this file is pending, so its size now is durable. (Not
    // e.old_size: another thread's write may have extended the file and been
    // synced since that was read.)
    j = std::make_unique<Journal>();
    auto durable = file.Size();
    j->durable_size = durable.ok() ? *durable : e.old_size;
  }
  e.id = next_entry_id_++;
  j->entries.push_back(std::move(e));
  return j->entries.back().id;
}

void FaultFileSystem::Completed(const std::string& path, uint64_t id, bool ok) {
  std::lock_guard lock(mu_);
  auto it = journals_.find(path);
  if (it == journals_.end()) return;
  for (auto& e : it->second->entries) {
    if (e.id == id) {
      e.completed = true;
      e.refused = !ok;
      return;
    }
  }
}

std::vector<uint64_t> FaultFileSystem::SyncStarts(const std::string& path) {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> ids;
  auto it = journals_.find(path);
  if (it == journals_.end()) return ids;
  for (const auto& e : it->second->entries) {
    if (e.completed) ids.push_back(e.id);
  }
  return ids;
}

void FaultFileSystem::Synced(const std::string& path, const std::vector<uint64_t>& ids) {
  std::lock_guard lock(mu_);
  auto it = journals_.find(path);
  if (it == journals_.end()) return;
  Journal& j = *it->second;
  std::erase_if(j.entries, [&](const Journal::Entry& e) {
    if (!std::binary_search(ids.begin(), ids.end(), e.id)) return false;
    if (!e.refused) j.durable_size = SizeAfter(e, j.durable_size);
    return true;
  });
  if (j.entries.empty()) journals_.erase(it);
}

Status FaultFileSystem::Crash(CrashMode mode, uint64_t seed) {
  std::map<std::string, std::unique_ptr<Journal>> journals;
  {
    std::lock_guard lock(mu_);
    journals.swap(journals_);
    rules_.clear();
    cut_after_ = UINT64_MAX;
    cut_ = false;
    torn_ = false;
  }
  std::mt19937_64 rng(seed);
  for (auto& [path, journal] : journals) {
    auto opened = base_.Open(path, OpenMode::kReadWrite);
    if (!opened.ok()) continue;  // removed since: nothing to roll back
    BlockFile& f = **opened;
    auto& entries = journal->entries;
    // Undo, newest first, back to the durable state: each entry's old bytes
    // come back, and whatever it wrote past the file's end then reads as
    // zeros (the final size below cuts it off unless a surviving entry
    // reaches further). Sizes are settled once at the end, because with
    // concurrent writers an entry still pending may have been recorded
    // before a durable one that extended the file.
    ASSIGN_OR_RETURN(uint64_t size_now, f.Size());
    for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
      if (!it->old_bytes.empty()) TRY(f.WriteAt(it->offset, it->old_bytes));
      if (it->kind == JournalKind::kWrite) {
        uint64_t from = std::max(it->old_size, it->offset);
        uint64_t end = std::min(it->offset + it->new_bytes.size(), size_now);
        if (end > from) TRY(f.WriteAt(from, std::vector<std::byte>(end - from)));
      }
    }
    // Redo the survivors, oldest first.
    uint64_t size = journal->durable_size;
    for (const auto& e : entries) {
      bool keep = mode == CrashMode::kKeepAll || (mode == CrashMode::kRandom && (rng() & 1));
      if (!keep || e.refused) continue;
      size = SizeAfter(e, size);
      switch (e.kind) {
        case JournalKind::kWrite:
          if (!e.new_bytes.empty()) TRY(f.WriteAt(e.offset, e.new_bytes));
          break;
        case JournalKind::kTruncate:
          TRY(f.Truncate(e.new_size));
          break;
        case JournalKind::kPunch:
          TRY(f.PunchHole(e.offset, e.length));
          break;
        case JournalKind::kAllocate:
          break;
      }
    }
    TRY(f.Truncate(size));
    TRY(f.Sync());
  }
  return Status::Ok();
}

Result<std::unique_ptr<BlockFile>> FaultFileSystem::Open(const std::string& path, OpenMode mode) {
  TRY(Before(FaultOp::kOpen, path, "", nullptr));
  ASSIGN_OR_RETURN(auto base, base_.Open(path, mode));
  return std::unique_ptr<BlockFile>(new FaultFile(*this, std::move(base)));
}

Result<std::unique_ptr<BlockFile>> FaultFileSystem::Create(const std::string& path,
                                                           bool exclusive) {
  TRY(Before(FaultOp::kCreate, path, "", nullptr));
  ASSIGN_OR_RETURN(auto base, base_.Create(path, exclusive));
  {
    std::lock_guard lock(mu_);
    journals_.erase(path);
  }
  return std::unique_ptr<BlockFile>(new FaultFile(*this, std::move(base)));
}

Status FaultFileSystem::Rename(const std::string& from, const std::string& to) {
  TRY(Before(FaultOp::kRename, from, to, nullptr));
  TRY(base_.Rename(from, to));
  std::lock_guard lock(mu_);
  journals_.erase(to);
  auto it = journals_.find(from);
  if (it != journals_.end()) {
    journals_[to] = std::move(it->second);
    journals_.erase(from);
  }
  return Status::Ok();
}

Status FaultFileSystem::Remove(const std::string& path) {
  TRY(Before(FaultOp::kRemove, path, "", nullptr));
  TRY(base_.Remove(path));
  std::lock_guard lock(mu_);
  journals_.erase(path);
  return Status::Ok();
}

Status FaultFileSystem::SyncDir(const std::string& dir) {
  TRY(Before(FaultOp::kSync, dir, "dir", nullptr));
  return base_.SyncDir(dir);
}

Result<bool> FaultFileSystem::Exists(const std::string& path) { return base_.Exists(path); }
Result<uint64_t> FaultFileSystem::FreeSpace(const std::string& path) {
  return base_.FreeSpace(path);
}
Result<std::vector<std::string>> FaultFileSystem::ListDir(const std::string& dir) {
  return base_.ListDir(dir);
}
Result<std::string> FaultFileSystem::RealPath(const std::string& path) {
  return base_.RealPath(path);
}

namespace {

bool ParseErrno(std::string_view s, int* err) {
  static const std::pair<const char*, int> kNames[] = {
      {"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT}, {"EROFS", EROFS},
      {"EACCES", EACCES}, {"EPERM", EPERM},   {"EFBIG", EFBIG},   {"EINTR", EINTR}};
  for (const auto& [name, value] : kNames) {
    if (s == name) {
      *err = value;
      return true;
    }
  }
  auto r = std::from_chars(s.data(), s.data() + s.size(), *err);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

// A whole decimal number: "5x" is refused, not read as 5.
bool ParseCount(std::string_view s, uint64_t* n) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), *n);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

bool ParseOp(std::string_view s, FaultOp* op) {
  static const std::pair<const char*, FaultOp> kOps[] = {
      {"read", FaultOp::kRead},       {"write", FaultOp::kWrite},
      {"sync", FaultOp::kSync},       {"truncate", FaultOp::kTruncate},
      {"punch", FaultOp::kPunchHole}, {"allocate", FaultOp::kAllocate},
      {"open", FaultOp::kOpen},       {"create", FaultOp::kCreate},
      {"rename", FaultOp::kRename},   {"remove", FaultOp::kRemove}};
  for (const auto& [name, value] : kOps) {
    if (s == name) {
      *op = value;
      return true;
    }
  }
  return false;
}

}  // namespace

Status FaultFileSystem::Configure(std::string_view spec) {
  while (!spec.empty()) {
    size_t comma = spec.find(',');
    std::string_view item = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    if (item.empty()) continue;
    if (item == "torn") {
      std::lock_guard lock(mu_);
      torn_ = true;
      continue;
    }
    size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      return Status::InvalidArgument("fault spec: unknown item '" + std::string(item) + "'");
    }
    std::string_view key = item.substr(0, eq);
    std::string_view value = item.substr(eq + 1);
    if (key == "cut") {
      uint64_t n = 0;
      if (!ParseCount(value, &n)) return Status::InvalidArgument("fault spec: bad cut count");
      std::lock_guard lock(mu_);
      cut_after_ = mutations_ + n;
      continue;
    }
    if (key == "fail" || key == "failfrom") {
      size_t c1 = value.find(':');
      size_t c2 = c1 == std::string_view::npos ? c1 : value.find(':', c1 + 1);
      FaultOp op;
      uint64_t n = 0;
      int err = 0;
      if (c2 == std::string_view::npos || !ParseOp(value.substr(0, c1), &op) ||
          !ParseCount(value.substr(c1 + 1, c2 - c1 - 1), &n) ||
          !ParseErrno(value.substr(c2 + 1), &err)) {
        return Status::InvalidArgument("fault spec: expected " + std::string(key) +
                                       "=OP:N:ERRNO, got '" + std::string(value) + "'");
      }
      if (key == "fail") {
        FailNth(op, n, err);
      } else {
        FailFrom(op, n, err);
      }
      continue;
    }
    return Status::InvalidArgument("fault spec: unknown key '" + std::string(key) + "'");
  }
  return Status::Ok();
}

}  // namespace ploop
