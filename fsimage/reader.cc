// Ext4Reader: read-only access to an ext4 file system through libext2fs.
// Paths resolve with ext2fs_namei (no following of a final symlink);
// metadata decodes the same fields populate.cc encodes (32-bit ids in two
// halves, timestamps with nanoseconds and epoch bits in the extra fields,
// old and new device-number encodings); xattrs come back as libext2fs
// presents them (POSIX ACLs in the kernel's xattr format).
#include "fsimage/reader.h"

#include <algorithm>
#include <array>
#include <cstring>

#include "fsimage/ext4.h"

namespace ploop::fsimage {

Result<std::optional<uint64_t>> ProbeExt4SizeBytes(Image& image) {
  // The superblock: 1024 bytes at offset 1024 (little-endian fields).
  constexpr uint64_t kSuperOffset = 1024;
  if (image.size_bytes() < 2 * kSuperOffset) return std::optional<uint64_t>();
  std::array<std::byte, 1024> sb;
  TRY(image.Read(kSuperOffset, sb));
  auto u16 = [&](size_t off) {
    return static_cast<uint32_t>(sb[off]) | static_cast<uint32_t>(sb[off + 1]) << 8;
  };
  auto u32 = [&](size_t off) { return u16(off) | u16(off + 2) << 16; };
  if (u16(0x38) != 0xEF53) return std::optional<uint64_t>();  // s_magic
  const uint32_t log_block = u32(0x18);                       // s_log_block_size
  if (log_block > 6) return std::optional<uint64_t>();
  uint64_t blocks = u32(0x04);  // s_blocks_count_lo
  constexpr uint32_t kIncompat64Bit = 0x80;
  if (u32(0x60) & kIncompat64Bit) blocks |= static_cast<uint64_t>(u32(0x150)) << 32;
  return std::optional<uint64_t>(blocks * (1024ull << log_block));
}
namespace {

Timestamp DecodeTime(uint32_t base, uint32_t extra, bool has_extra) {
  Timestamp t;
  t.seconds = static_cast<int32_t>(base);
  if (has_extra) {
    t.seconds += static_cast<int64_t>(extra & 3) << 32;
    t.nanoseconds = extra >> 2;
  }
  return t;
}

EntryType TypeOf(uint16_t mode) {
  switch (mode & LINUX_S_IFMT) {
    case LINUX_S_IFDIR:
      return EntryType::kDirectory;
    case LINUX_S_IFLNK:
      return EntryType::kSymlink;
    case LINUX_S_IFCHR:
      return EntryType::kCharDevice;
    case LINUX_S_IFBLK:
      return EntryType::kBlockDevice;
    case LINUX_S_IFIFO:
      return EntryType::kFifo;
    case LINUX_S_IFSOCK:
      return EntryType::kSocket;
    default:
      return EntryType::kRegular;
  }
}

// libext2fs returns POSIX ACLs with id 0 in entries that carry no id; the
// kernel reports those as ACL_UNDEFINED_ID (0xffffffff). Report what the
// kernel would, so a tree reads back equal to the host's.
void NormalizeAcl(const std::string& name, std::string* value) {
  if (name != "system.posix_acl_access" && name != "system.posix_acl_default") return;
  // Header: u32 version; entries: u16 tag, u16 perm, u32 id (little-endian).
  for (size_t off = 4; off + 8 <= value->size(); off += 8) {
    uint16_t tag = static_cast<uint8_t>((*value)[off]) | static_cast<uint8_t>((*value)[off + 1])
                                                             << 8;
    constexpr uint16_t kAclUser = 0x02, kAclGroup = 0x08;
    if (tag != kAclUser && tag != kAclGroup) value->replace(off + 4, 4, 4, '\xff');
  }
}

int CollectXattr(char* name, char* value, size_t value_len, void* data) {
  auto* out = static_cast<std::vector<std::pair<std::string, std::string>>*>(data);
  out->emplace_back(name, std::string(value, value_len));
  return 0;
}

}  // namespace

Ext4Reader::Ext4Reader(std::unique_ptr<Ext4> ext4) : ext4_(std::move(ext4)) {}
Ext4Reader::~Ext4Reader() = default;

Result<std::unique_ptr<Ext4Reader>> Ext4Reader::Open(Image& image) {
  ASSIGN_OR_RETURN(auto ext4, Ext4::Open(image, /*writable=*/false));
  return std::unique_ptr<Ext4Reader>(new Ext4Reader(std::move(ext4)));
}

Result<uint32_t> Ext4Reader::Resolve(const std::string& path) {
  if (path.empty() || path[0] != '/') {
    return Status::InvalidArgument("'" + path + "': give an absolute path in the file system");
  }
  ext2_ino_t ino = 0;
  errcode_t err = ext2fs_namei(ext4_->fs(), EXT2_ROOT_INO, EXT2_ROOT_INO, path.c_str(), &ino);
  if (err == EXT2_ET_FILE_NOT_FOUND || err == EXT2_ET_NO_DIRECTORY) {
    return Status::NotFound(path + ": no such file in the file system");
  }
  TRY(ext4_->Check(err, "look up " + path));
  return ino;
}

Result<FileInfo> Ext4Reader::StatInode(uint32_t ino, std::string name) {
  ext2_filsys fs = ext4_->fs();
  struct ext2_inode_large inode;
  std::memset(&inode, 0, sizeof(inode));
  TRY(ext4_->Check(
      ext2fs_read_inode_full(fs, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode)),
      "read inode of " + name));
  FileInfo info;
  info.inode = ino;
  info.links = inode.i_links_count;
  info.allocated_bytes = ext2fs_get_stat_i_blocks(fs, reinterpret_cast<ext2_inode*>(&inode)) * 512;
  Entry& e = info.entry;
  e.path = std::move(name);
  e.type = TypeOf(inode.i_mode);
  e.mode = inode.i_mode & 07777;
  e.uid = inode_uid(inode);
  e.gid = inode_gid(inode);
  bool extra = EXT2_INODE_SIZE(fs->super) > EXT2_GOOD_OLD_INODE_SIZE &&
               inode.i_extra_isize >= 4 * sizeof(uint32_t);
  e.atime = DecodeTime(inode.i_atime, inode.i_atime_extra, extra);
  e.mtime = DecodeTime(inode.i_mtime, inode.i_mtime_extra, extra);
  e.ctime = DecodeTime(inode.i_ctime, inode.i_ctime_extra, extra);
  e.size_bytes = EXT2_I_SIZE(&inode);
  if (e.type == EntryType::kCharDevice || e.type == EntryType::kBlockDevice) {
    if (inode.i_block[0] != 0) {
      e.dev_major = (inode.i_block[0] >> 8) & 255;
      e.dev_minor = inode.i_block[0] & 255;
    } else {
      e.dev_major = (inode.i_block[1] & 0xfff00) >> 8;
      e.dev_minor = (inode.i_block[1] & 0xff) | ((inode.i_block[1] >> 12) & 0xfff00);
    }
  }
  if (e.type == EntryType::kSymlink) {
    if (ext2fs_is_fast_symlink(reinterpret_cast<ext2_inode*>(&inode))) {
      e.link_target.assign(reinterpret_cast<const char*>(inode.i_block), e.size_bytes);
    } else {
      std::string target;
      TRY(Read(ino, e.size_bytes, [&](uint64_t, std::span<const std::byte> d) {
        target.append(reinterpret_cast<const char*>(d.data()), d.size());
        return Status::Ok();
      }));
      e.link_target = target;
    }
  }
  struct ext2_xattr_handle* h = nullptr;
  TRY(ext4_->Check(ext2fs_xattrs_open(fs, ino, &h), "xattrs of " + e.path));
  errcode_t err = ext2fs_xattrs_read(h);
  std::vector<std::pair<std::string, std::string>> raw;
  if (!err) err = ext2fs_xattrs_iterate(h, CollectXattr, &raw);
  // Iteration shows stored values; ext2fs_xattr_get translates the ones
  // ext4 stores in its own format (POSIX ACLs) back to the kernel's.
  for (size_t i = 0; !err && i < raw.size(); ++i) {
    void* value = nullptr;
    size_t len = 0;
    err = ext2fs_xattr_get(h, raw[i].first.c_str(), &value, &len);
    if (!err) {
      std::string v(static_cast<char*>(value), len);
      NormalizeAcl(raw[i].first, &v);
      e.xattrs.emplace_back(raw[i].first, std::move(v));
      ext2fs_free_mem(&value);
    }
  }
  ext2fs_xattrs_close(&h);
  TRY(ext4_->Check(err, "read xattrs of " + e.path));
  std::sort(e.xattrs.begin(), e.xattrs.end());
  return info;
}

Result<FileInfo> Ext4Reader::Stat(const std::string& path) {
  ASSIGN_OR_RETURN(uint32_t ino, Resolve(path));
  return StatInode(ino, path);
}

Result<std::vector<FileInfo>> Ext4Reader::List(const std::string& path) {
  ASSIGN_OR_RETURN(uint32_t dir, Resolve(path));
  struct ext2_inode inode;
  TRY(ext4_->Check(ext2fs_read_inode(ext4_->fs(), dir, &inode), "read " + path));
  if (!LINUX_S_ISDIR(inode.i_mode)) return Status::InvalidArgument(path + " is not a directory");
  std::vector<std::pair<std::string, uint32_t>> names;
  auto collect = [](ext2_ino_t, int, struct ext2_dir_entry* dirent, int, int, char*,
                    void* data) -> int {
    auto* out = static_cast<std::vector<std::pair<std::string, uint32_t>>*>(data);
    std::string name(dirent->name, ext2fs_dirent_name_len(dirent));
    if (name != "." && name != "..") out->emplace_back(name, dirent->inode);
    return 0;
  };
  TRY(ext4_->Check(ext2fs_dir_iterate2(ext4_->fs(), dir, 0, nullptr, collect, &names),
                   "list " + path));
  std::sort(names.begin(), names.end());
  std::vector<FileInfo> out;
  for (auto& [name, ino] : names) {
    ASSIGN_OR_RETURN(FileInfo info, StatInode(ino, name));
    out.push_back(std::move(info));
  }
  return out;
}

Status Ext4Reader::Read(uint32_t ino, uint64_t size, const DataFn& fn) {
  ext2_file_t file = nullptr;
  TRY(ext4_->Check(ext2fs_file_open(ext4_->fs(), ino, 0, &file), "open file"));
  std::vector<std::byte> buf(1 << 20);
  Status s;
  for (uint64_t off = 0; off < size && s.ok();) {
    unsigned int got = 0;
    unsigned int want = static_cast<unsigned int>(std::min<uint64_t>(buf.size(), size - off));
    s = ext4_->Check(ext2fs_file_read(file, buf.data(), want, &got), "read file");
    if (!s.ok()) break;
    if (got == 0) break;
    s = fn(off, std::span<const std::byte>(buf.data(), got));
    off += got;
  }
  ext2fs_file_close(file);
  return s;
}

Status Ext4Reader::Read(const std::string& path, const DataFn& fn) {
  ASSIGN_OR_RETURN(uint32_t ino, Resolve(path));
  ASSIGN_OR_RETURN(FileInfo info, StatInode(ino, path));
  if (info.entry.type != EntryType::kRegular) {
    return Status::InvalidArgument(path + " is not a regular file");
  }
  return Read(ino, info.entry.size_bytes, fn).WithContext(path);
}

}  // namespace ploop::fsimage
