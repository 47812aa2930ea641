// TarSource: a tarball as a TreeSource, read with libarchive.
//
// Each scan opens the file afresh (Rewind() closes and reopens it), so the
// plan scan and the write scan see the same members in the same order.
// libarchive detects the compression and the tar dialect from the bytes.
//
// Member -> entry, per scan:
//
//   "./a//b/" ------- normalize --------> "a/b"
//   "/etc/x", "a/../b"                    skipped (absolute, "..")
//   "lnk/x" where lnk is a symlink        skipped (would write through it)
//   parents of "a/b/c" not seen yet       synthesized directory entries
//   hard link to "t"                      only if t was an earlier regular
//                                         file of the archive, else skipped
//
// A tarball need not list directories before their contents (or at all),
// so the parents a member needs are made up first (Entry::synthesized);
// the directory's own member, if it comes later, then updates its
// metadata. `kinds_` remembers what each path is in this scan, which is
// how members that go through a symlink or a file are caught: Populate
// only ever sees paths whose parents are directories of this scan.
//
// Data: archive_read_data_block() returns runs with their file offsets and
// skips the holes of sparse members, which is what DataFn wants.
// Warnings are recorded once per text although the archive is scanned
// twice.
#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <set>
#include <tuple>
#include <unordered_map>

#include "fsimage/tree.h"

namespace ploop::fsimage {
namespace {

// Kernel POSIX ACL xattr format (linux/posix_acl_xattr.h).
constexpr uint32_t kAclVersion = 2;
constexpr uint16_t kAclUserObj = 0x01, kAclUser = 0x02, kAclGroupObj = 0x04, kAclGroup = 0x08,
                   kAclMask = 0x10, kAclOther = 0x20;
constexpr uint32_t kAclUndefinedId = 0xffffffff;

void PutLe16(std::string* out, uint16_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>(v >> 8));
}

void PutLe32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// The kernel's tag for a libarchive ACL tag, 0 for none.
uint16_t KernelAclTag(int tag) {
  switch (tag) {
    case ARCHIVE_ENTRY_ACL_USER_OBJ:
      return kAclUserObj;
    case ARCHIVE_ENTRY_ACL_USER:
      return kAclUser;
    case ARCHIVE_ENTRY_ACL_GROUP_OBJ:
      return kAclGroupObj;
    case ARCHIVE_ENTRY_ACL_GROUP:
      return kAclGroup;
    case ARCHIVE_ENTRY_ACL_MASK:
      return kAclMask;
    case ARCHIVE_ENTRY_ACL_OTHER:
      return kAclOther;
  }
  return 0;
}

// Splits `raw` into components, dropping "" and "."; false for an absolute
// path or one with "..".
bool Normalize(const std::string& raw, std::string* out) {
  if (!raw.empty() && raw[0] == '/') return false;
  out->clear();
  size_t pos = 0;
  while (pos <= raw.size()) {
    size_t end = raw.find('/', pos);
    if (end == std::string::npos) end = raw.size();
    std::string part = raw.substr(pos, end - pos);
    pos = end + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") return false;
    if (!out->empty()) *out += '/';
    *out += part;
  }
  return true;
}

std::string ParentOf(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

class TarSource final : public TreeSource {
 public:
  explicit TarSource(std::string path) : path_(std::move(path)) {}
  ~TarSource() override { Close(); }

  Status Rewind() override {
    Close();
    archive_ = archive_read_new();
    if (archive_ == nullptr) return Status::NoSpace("libarchive: out of memory");
    archive_read_support_filter_all(archive_);
    archive_read_support_format_tar(archive_);
    archive_read_support_format_gnutar(archive_);
    if (archive_read_open_filename(archive_, path_.c_str(), 64 * 1024) != ARCHIVE_OK) {
      int err = archive_errno(archive_);
      std::string text = archive_error_string(archive_) ? archive_error_string(archive_) : "";
      Close();
      if (err == ENOENT) return Status::NotFound(path_ + ": " + text);
      // libarchive reports an unknown format as EILSEQ (or -1) on Linux.
      if (err == EILSEQ || err <= 0) {
        return Status::InvalidArgument(path_ + ": not a tar archive (" + text + ")");
      }
      return Status::FromErrno(err, path_ + ": " + text);
    }
    kinds_.clear();
    pending_.clear();
    has_data_ = false;
    root_done_ = false;
    members_ = 0;
    return Status::Ok();
  }

  Result<bool> Next(Entry* entry) override {
    has_data_ = false;
    if (archive_ == nullptr) TRY(Rewind());
    if (!root_done_) {
      root_done_ = true;
      kinds_[""] = Kind::kDir;
      // The root: the archive's own "." when it comes first, else made up.
      TRY(ReadMember());
      if (!pending_.empty() && pending_.front().first.path.empty()) {
        *entry = std::move(pending_.front().first);
        has_data_ = false;
        pending_.pop_front();
        return true;
      }
      *entry = Synthesized("");
      return true;
    }
    while (pending_.empty()) {
      if (at_end_) return false;
      TRY(ReadMember());
    }
    bool data = pending_.front().second;
    *entry = std::move(pending_.front().first);
    pending_.pop_front();
    has_data_ = data && pending_.empty();
    return true;
  }

  Status ReadData(const DataFn& fn) override {
    if (!has_data_) return Status::FailedPrecondition("no regular file is current");
    has_data_ = false;
    while (true) {
      const void* buf = nullptr;
      size_t size = 0;
      la_int64_t offset = 0;
      int r = archive_read_data_block(archive_, &buf, &size, &offset);
      if (r == ARCHIVE_EOF) return Status::Ok();
      if (r == ARCHIVE_WARN) {
        Warn(path_ + ": " + current_ + ": " + ErrorText());
      } else if (r != ARCHIVE_OK) {
        return Status::Corruption(path_ + ": read " + current_ + ": " + ErrorText());
      }
      if (size == 0) continue;
      TRY(fn(static_cast<uint64_t>(offset),
             std::span<const std::byte>(static_cast<const std::byte*>(buf), size)));
    }
  }

  const std::vector<std::string>& warnings() const override { return warnings_; }

 private:
  enum class Kind { kDir, kRegular, kOther };

  void Close() {
    if (archive_ != nullptr) archive_read_free(archive_);
    archive_ = nullptr;
    at_end_ = false;
  }

  std::string ErrorText() const {
    const char* s = archive_ ? archive_error_string(archive_) : nullptr;
    return s ? s : "unknown libarchive error";
  }

  void Warn(std::string text) {
    if (warned_.insert(text).second) warnings_.push_back(std::move(text));
  }

  Entry Synthesized(const std::string& path) const {
    Entry e;
    e.path = path;
    e.type = EntryType::kDirectory;
    e.mode = 0755;
    e.synthesized = true;
    return e;
  }

  // Reads the next member into pending_ (after any synthesized parents),
  // or sets at_end_. Skipped members leave pending_ empty.
  Status ReadMember() {
    struct archive_entry* ae = nullptr;
    int r = archive_read_next_header(archive_, &ae);
    if (r == ARCHIVE_EOF) {
      at_end_ = true;
      return Status::Ok();
    }
    if (r == ARCHIVE_WARN) {
      Warn(path_ + ": " + ErrorText());
    } else if (r != ARCHIVE_OK) {
      std::string text = ErrorText();
      if (members_ == 0)
        return Status::InvalidArgument(path_ + ": not a tar archive (" + text + ")");
      return Status::Corruption(path_ + ": " + text);
    }
    ++members_;
    const char* name = archive_entry_pathname(ae);
    std::string raw = name ? name : "";
    current_ = raw;
    std::string path;
    if (!Normalize(raw, &path)) {
      Warn("member " + raw + ": absolute path or '..' in the path (skipped)");
      return Status::Ok();
    }
    // Every parent must be a directory of this scan (or not seen yet).
    std::vector<std::string> missing;
    for (std::string p = path.empty() ? "" : ParentOf(path);; p = ParentOf(p)) {
      auto it = kinds_.find(p);
      if (it != kinds_.end()) {
        if (it->second != Kind::kDir) {
          Warn("member " + raw + ": goes through " + p + ", which is not a directory (skipped)");
          return Status::Ok();
        }
        break;
      }
      missing.push_back(p);
      if (p.empty()) break;
    }
    Entry e;
    e.path = path;
    e.mode = archive_entry_perm(ae) & 07777;
    la_int64_t uid = archive_entry_uid(ae), gid = archive_entry_gid(ae);
    if (uid < 0 || gid < 0) {
      Warn("member " + raw + ": negative owner id (skipped)");
      return Status::Ok();
    }
    e.uid = static_cast<uint64_t>(uid);
    e.gid = static_cast<uint64_t>(gid);
    e.mtime = {archive_entry_mtime(ae), static_cast<uint32_t>(archive_entry_mtime_nsec(ae))};
    e.atime = archive_entry_atime_is_set(ae)
                  ? Timestamp{archive_entry_atime(ae),
                              static_cast<uint32_t>(archive_entry_atime_nsec(ae))}
                  : e.mtime;
    e.ctime = archive_entry_ctime_is_set(ae)
                  ? Timestamp{archive_entry_ctime(ae),
                              static_cast<uint32_t>(archive_entry_ctime_nsec(ae))}
                  : e.mtime;
    Kind kind = Kind::kOther;
    bool data = false;
    if (const char* link = archive_entry_hardlink(ae)) {
      std::string target;
      auto it = kinds_.end();
      if (Normalize(link, &target)) it = kinds_.find(target);
      if (it == kinds_.end() || it->second != Kind::kRegular || target == path) {
        Warn("member " + raw + ": hard link to " + link +
             ", which is not an earlier regular file of the archive (skipped)");
        return Status::Ok();
      }
      e.type = EntryType::kHardLink;
      e.link_target = target;
      kind = Kind::kRegular;
    } else {
      switch (archive_entry_filetype(ae)) {
        case AE_IFREG: {
          e.type = EntryType::kRegular;
          kind = Kind::kRegular;
          la_int64_t size = archive_entry_size(ae);
          e.size_bytes = size > 0 ? static_cast<uint64_t>(size) : 0;
          e.data_bytes = e.size_bytes;
          if (archive_entry_sparse_reset(ae) > 0) {
            uint64_t held = 0;
            la_int64_t off, len;
            while (archive_entry_sparse_next(ae, &off, &len) == ARCHIVE_OK) {
              held += static_cast<uint64_t>(len);
            }
            e.data_bytes = std::min(held, e.size_bytes);
          }
          data = true;
          break;
        }
        case AE_IFDIR:
          e.type = EntryType::kDirectory;
          kind = Kind::kDir;
          break;
        case AE_IFLNK: {
          const char* target = archive_entry_symlink(ae);
          e.type = EntryType::kSymlink;
          e.link_target = target ? target : "";
          break;
        }
        case AE_IFCHR:
        case AE_IFBLK:
          e.type = archive_entry_filetype(ae) == AE_IFCHR ? EntryType::kCharDevice
                                                          : EntryType::kBlockDevice;
          e.dev_major = static_cast<uint32_t>(archive_entry_rdevmajor(ae));
          e.dev_minor = static_cast<uint32_t>(archive_entry_rdevminor(ae));
          break;
        case AE_IFIFO:
          e.type = EntryType::kFifo;
          break;
        case AE_IFSOCK:
          e.type = EntryType::kSocket;
          break;
        default:
          Warn("member " + raw + ": unknown file type (skipped)");
          return Status::Ok();
      }
    }
    if (path.empty() && e.type != EntryType::kDirectory) {
      Warn("member " + raw + ": the root of the tree is not a directory (skipped)");
      return Status::Ok();
    }
    ReadXattrs(ae, raw, &e);
    ReadAcl(ae, ARCHIVE_ENTRY_ACL_TYPE_ACCESS, "system.posix_acl_access", &e);
    if (e.type == EntryType::kDirectory) {
      ReadAcl(ae, ARCHIVE_ENTRY_ACL_TYPE_DEFAULT, "system.posix_acl_default", &e);
    }
    if (archive_entry_acl_reset(ae, ARCHIVE_ENTRY_ACL_TYPE_NFS4) > 0) {
      Warn("member " + raw + ": NFSv4 ACL, which ext4 cannot hold (ACL dropped)");
    }
    std::sort(e.xattrs.begin(), e.xattrs.end());

    for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
      if (*it == path) continue;
      kinds_[*it] = Kind::kDir;
      pending_.emplace_back(Synthesized(*it), false);
    }
    // A later member of the same name replaces the earlier one (Populate
    // never replaces a directory by a file, so a directory stays one).
    auto [known, inserted] = kinds_.try_emplace(path, kind);
    if (!inserted && known->second != Kind::kDir) known->second = kind;
    pending_.emplace_back(std::move(e), data);
    return Status::Ok();
  }

  void ReadXattrs(struct archive_entry* ae, const std::string& raw, Entry* e) {
    if (archive_entry_xattr_reset(ae) <= 0) return;
    const char* name = nullptr;
    const void* value = nullptr;
    size_t size = 0;
    while (archive_entry_xattr_next(ae, &name, &value, &size) == ARCHIVE_OK) {
      if (name == nullptr || *name == '\0') continue;
      if (std::strchr(name, '.') == nullptr) {
        Warn("member " + raw + ": xattr " + name + " has no namespace (skipped)");
        continue;
      }
      e->xattrs.emplace_back(name, std::string(static_cast<const char*>(value), size));
    }
  }

  // Adds `want_type`'s ACL of the member as the kernel's xattr `name`,
  // unless the archive carried that xattr itself. An access ACL of only
  // the three entries the mode already holds is not written.
  void ReadAcl(struct archive_entry* ae, int want_type, const char* xattr_name, Entry* e) {
    for (const auto& [n, v] : e->xattrs) {
      if (n == xattr_name) return;
    }
    if (archive_entry_acl_reset(ae, want_type) <= 0) return;
    std::set<std::pair<uint16_t, uint32_t>> seen;
    std::vector<std::tuple<uint16_t, uint32_t, uint16_t>> acl;  // tag, id, perm
    int type, permset, tag, qual;
    const char* qname;
    bool extended = false;
    while (archive_entry_acl_next(ae, want_type, &type, &permset, &tag, &qual, &qname) ==
           ARCHIVE_OK) {
      uint16_t ktag = KernelAclTag(tag);
      if (ktag == 0) continue;
      uint32_t id =
          (ktag == kAclUser || ktag == kAclGroup) ? static_cast<uint32_t>(qual) : kAclUndefinedId;
      if (ktag != kAclUserObj && ktag != kAclGroupObj && ktag != kAclOther) extended = true;
      if (!seen.insert({ktag, id}).second) continue;
      acl.emplace_back(ktag, id, static_cast<uint16_t>(permset & 7));
    }
    if (want_type == ARCHIVE_ENTRY_ACL_TYPE_ACCESS && !extended) return;
    if (acl.empty()) return;
    std::sort(acl.begin(), acl.end());
    std::string value;
    PutLe32(&value, kAclVersion);
    for (const auto& [ktag, id, perm] : acl) {
      PutLe16(&value, ktag);
      PutLe16(&value, perm);
      PutLe32(&value, id);
    }
    e->xattrs.emplace_back(xattr_name, std::move(value));
  }

  std::string path_;
  struct archive* archive_ = nullptr;
  bool at_end_ = false;
  bool root_done_ = false;
  bool has_data_ = false;
  uint64_t members_ = 0;
  std::string current_;
  // Entries ready to hand out; `second`: the entry's data is next in the
  // archive (true only for the member itself, which always comes last).
  std::deque<std::pair<Entry, bool>> pending_;
  std::unordered_map<std::string, Kind> kinds_;
  std::vector<std::string> warnings_;
  std::set<std::string> warned_;
};

}  // namespace

Result<std::unique_ptr<TreeSource>> OpenTarSource(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, path);
  if (S_ISDIR(st.st_mode)) return Status::InvalidArgument(path + " is a directory, not a tarball");
  auto source = std::make_unique<TarSource>(path);
  TRY(source->Rewind());
  return std::unique_ptr<TreeSource>(std::move(source));
}

}  // namespace ploop::fsimage
