// Populate: writes a TreeSource into an ext4 file system with libext2fs.
//
// Plan scan (nothing written):
//   - every path component <= 255 bytes, else the entry (and everything
//     under it) is skipped with a warning;
//   - uid/gid + shift <= 2^32-1, else the whole call fails;
//   - blocks needed = data blocks (holes excluded) + extent-tree blocks +
//     directory blocks + long-symlink blocks + xattr blocks, inodes needed
//     = entries that are not hard links; both must be free.
// Write scan, in source order (parents first):
//   path -> inode map; existing names: dir+dir merges, file replaces file,
//   dir is never replaced by a file; an entry whose parent is not a
//   directory is skipped (a source bug, never a corrupt file system). In
//   directories this scan created, a name can only exist if this scan
//   added it, so the linear ext2fs_lookup is skipped there. Each inode is
//   created, linked (see "Directories" below), filled
//   (data through ext2fs_file_*, skipping holes), then given its metadata
//   and xattrs. Metadata reaches disk only at Ext4::Close(), which writes
//   bitmaps and counters last, so an I/O error mid-way leaves the old
//   bitmaps describing allocated blocks as free, never the reverse.
//
// Directories: a new directory is one linear block. When it is full and
// the file system has dir_index, it becomes an htree, as the kernel does:
//
//   block 0: "." ".." | dx_root_info | count/limit | (hash, block)... | tail
//   block 1: entries with hash <  split   (sorted by hash, csum tail)
//   block 2: entries with hash >= split
//
// after which ext2fs_link (libext2fs >= 1.46) inserts through the index,
// splitting leaves and adding an index level as needed. A directory that
// is already linear past one block (from an older tool) just grows.
#include "fsimage/populate.h"

#include <algorithm>
#include <cstring>
#include <ctime>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "fsimage/ext4.h"

namespace ploop::fsimage {
namespace {

constexpr uint64_t kMaxId = 0xffffffffull;

std::string Parent(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

std::string Base(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool UnderSkipped(const std::set<std::string>& skipped, const std::string& path) {
  for (std::string p = Parent(path);; p = Parent(p)) {
    if (skipped.count(p)) return true;
    if (p.empty()) return false;
  }
}

uint32_t ModeType(EntryType type) {
  switch (type) {
    case EntryType::kRegular:
    case EntryType::kHardLink:
      return LINUX_S_IFREG;
    case EntryType::kDirectory:
      return LINUX_S_IFDIR;
    case EntryType::kSymlink:
      return LINUX_S_IFLNK;
    case EntryType::kCharDevice:
      return LINUX_S_IFCHR;
    case EntryType::kBlockDevice:
      return LINUX_S_IFBLK;
    case EntryType::kFifo:
      return LINUX_S_IFIFO;
    case EntryType::kSocket:
      return LINUX_S_IFSOCK;
  }
  return LINUX_S_IFREG;
}

int FileType(uint32_t mode) {
  switch (mode & LINUX_S_IFMT) {
    case LINUX_S_IFREG:
      return EXT2_FT_REG_FILE;
    case LINUX_S_IFDIR:
      return EXT2_FT_DIR;
    case LINUX_S_IFLNK:
      return EXT2_FT_SYMLINK;
    case LINUX_S_IFCHR:
      return EXT2_FT_CHRDEV;
    case LINUX_S_IFBLK:
      return EXT2_FT_BLKDEV;
    case LINUX_S_IFIFO:
      return EXT2_FT_FIFO;
    case LINUX_S_IFSOCK:
      return EXT2_FT_SOCK;
  }
  return EXT2_FT_UNKNOWN;
}

// ext4 timestamps: 32 low bits of seconds in the base field; the extra
// field holds nanoseconds << 2 and two epoch bits extending the seconds.
void EncodeTime(const Timestamp& t, uint32_t* base, uint32_t* extra) {
  *base = static_cast<uint32_t>(t.seconds);
  uint32_t epoch = static_cast<uint32_t>(
      ((t.seconds - static_cast<int64_t>(static_cast<int32_t>(*base))) >> 32) & 3);
  *extra = (t.nanoseconds << 2) | epoch;
}

class Writer {
 public:
  Writer(Ext4& ext4, TreeSource& source, const PopulateOptions& options, PopulateReport& report)
      : ext4_(ext4), fs_(ext4.fs()), source_(source), options_(options), report_(report) {}

  Status Plan() {
    TRY(source_.Rewind());
    const uint64_t bs = fs_->blocksize;
    uint64_t blocks = 0, inodes = 0;
    std::unordered_map<std::string, uint64_t> dir_bytes;
    Entry e;
    while (true) {
      ASSIGN_OR_RETURN(bool more, source_.Next(&e));
      if (!more) break;
      if (!e.path.empty() && UnderSkipped(skipped_, e.path)) {
        skipped_.insert(e.path);
        continue;
      }
      if (Base(e.path).size() > EXT2_NAME_LEN) {
        Warn(e.path + ": name longer than 255 bytes, too long for ext4 (skipped)");
        skipped_.insert(e.path);
        continue;
      }
      if (e.uid + options_.uid_shift > kMaxId) {
        return Status::InvalidArgument((e.path.empty() ? "." : e.path) + ": owned by uid " +
                                       std::to_string(e.uid) + ", which with --uid-shift " +
                                       std::to_string(options_.uid_shift) +
                                       " passes the largest id 4294967295");
      }
      if (e.gid + options_.gid_shift > kMaxId) {
        return Status::InvalidArgument((e.path.empty() ? "." : e.path) + ": group " +
                                       std::to_string(e.gid) + ", which with --gid-shift " +
                                       std::to_string(options_.gid_shift) +
                                       " passes the largest id 4294967295");
      }
      if (!e.path.empty()) dir_bytes[Parent(e.path)] += 8 + ((Base(e.path).size() + 3) & ~3u);
      if (e.type == EntryType::kHardLink) continue;
      ++inodes;
      ++progress_.files_total;
      if (e.type == EntryType::kRegular) {
        progress_.bytes_total += e.data_bytes;
        uint64_t data_blocks = (e.data_bytes + bs - 1) / bs;
        // One extent maps up to 32768 blocks; an extent block holds
        // (bs-12)/12 extents and the inode 4.
        uint64_t extents = data_blocks / 32768 + 1;
        uint64_t extent_blocks = extents > 4 ? (extents * 12 + bs - 13) / (bs - 12) : 0;
        blocks += data_blocks + extent_blocks;
      } else if (e.type == EntryType::kSymlink && e.link_target.size() >= 60) {
        blocks += 1;
      } else if (e.type == EntryType::kDirectory) {
        dir_bytes[e.path] += 24;  // "." and ".."
      }
      uint64_t xattr_bytes = 0;
      for (const auto& [name, value] : e.xattrs) xattr_bytes += name.size() + value.size() + 20;
      if (xattr_bytes > 80) blocks += (xattr_bytes + bs - 1) / bs;  // past the in-inode space
    }
    for (const auto& [dir, bytes] : dir_bytes) {
      // Past one block, an htree: its leaves are half to fully used, and
      // it has index blocks.
      uint64_t n = (bytes + bs - 13) / (bs - 12);
      blocks += n > 1 ? 2 * n + 1 + n / ((bs - 32) / 8) : n;
    }
    uint64_t free_blocks = ext2fs_free_blocks_count(fs_->super);
    uint64_t free_inodes = fs_->super->s_free_inodes_count;
    if (blocks > free_blocks) {
      return Status::NoSpace("the tree needs " + std::to_string((blocks - free_blocks) * bs) +
                             " more bytes than the file system has free (needs " +
                             std::to_string(blocks * bs) + ", free " +
                             std::to_string(free_blocks * bs) + ")");
    }
    if (inodes > free_inodes) {
      return Status::NoSpace("the tree needs " + std::to_string(inodes) +
                             " inodes; the file system has " + std::to_string(free_inodes) +
                             " free (make it with more --inodes)");
    }
    return Status::Ok();
  }

  Status Write() {
    TRY(source_.Rewind());
    ASSIGN_OR_RETURN(ext2_ino_t top, MakeDirs(options_.at));
    Entry e;
    while (true) {
      ASSIGN_OR_RETURN(bool more, source_.Next(&e));
      if (!more) break;
      if (skipped_.count(e.path)) continue;
      if (e.path.empty()) {
        inodes_[""] = top;
        dirs_.insert("");
        if (!e.synthesized) {
          TRY(SetAttrs(top, e));
          TRY(SetXattrs(top, e));
        }
        Progress();
        continue;
      }
      std::string parent_path = Parent(e.path);
      auto parent = inodes_.find(parent_path);
      if (parent == inodes_.end()) {  // under something skipped
        skipped_.insert(e.path);
        continue;
      }
      if (!dirs_.count(parent_path)) {
        Warn(e.path + ": " + parent_path + " is not a directory (skipped)");
        skipped_.insert(e.path);
        continue;
      }
      TRY(Add(parent->second, parent_path, e));
      if (e.type != EntryType::kHardLink) Progress();
    }
    return Status::Ok();
  }

 private:
  void Warn(std::string text) { report_.warnings.push_back(std::move(text)); }

  void Progress() {
    ++progress_.files_done;
    if (options_.progress) options_.progress(progress_);
  }

  // Resolves `path` (absolute in the file system), creating missing
  // directories.
  Result<ext2_ino_t> MakeDirs(const std::string& path) {
    ext2_ino_t ino = EXT2_ROOT_INO;
    size_t pos = 0;
    while (pos < path.size()) {
      size_t end = path.find('/', pos);
      if (end == std::string::npos) end = path.size();
      std::string name = path.substr(pos, end - pos);
      pos = end + 1;
      if (name.empty() || name == ".") continue;
      if (name == "..") return Status::InvalidArgument("--at " + path + ": '..' is not allowed");
      ext2_ino_t child = 0;
      errcode_t err = ext2fs_lookup(fs_, ino, name.c_str(), name.size(), nullptr, &child);
      if (err == EXT2_ET_FILE_NOT_FOUND) {
        TRY(Retry([&] { return ext2fs_mkdir(fs_, ino, 0, name.c_str()); }, ino, "mkdir " + path));
        TRY(ext4_.Check(ext2fs_lookup(fs_, ino, name.c_str(), name.size(), nullptr, &child),
                        "look up " + path));
      } else {
        TRY(ext4_.Check(err, "look up " + path));
        struct ext2_inode inode;
        TRY(ext4_.Check(ext2fs_read_inode(fs_, child, &inode), "read " + path));
        if (!LINUX_S_ISDIR(inode.i_mode)) {
          return Status::InvalidArgument("--at " + path + ": " + name + " is not a directory");
        }
      }
      ino = child;
    }
    return ino;
  }

  // Runs `op`, growing directory `dir` once when it is full: into an
  // htree when it is one linear block, else by a block.
  template <typename Op>
  Status Retry(Op op, ext2_ino_t dir, const std::string& context) {
    errcode_t err = op();
    if (err == EXT2_ET_DIR_NO_SPACE) {
      ASSIGN_OR_RETURN(bool indexed, MakeIndexed(dir, context));
      if (!indexed) {
        TRY(ext4_.Check(ext2fs_expand_dir(fs_, dir), context + ": grow directory"));
      }
      err = op();
    }
    return ext4_.Check(err, context);
  }

  // The hash ext2fs_link and the kernel use for names in `dir`.
  int HashVersion() const {
    int version = fs_->super->s_def_hash_version;
    if (version <= EXT2_HASH_TEA && (fs_->super->s_flags & EXT2_FLAGS_UNSIGNED_HASH)) version += 3;
    return version;
  }

  // Turns full one-block linear directory `dir` into an htree with two
  // leaves (see the top of the file). false (nothing changed) when the
  // file system has no dir_index or the directory is not one linear
  // block.
  Result<bool> MakeIndexed(ext2_ino_t dir, const std::string& context) {
    const uint32_t bs = fs_->blocksize;
    if (!ext2fs_has_feature_dir_index(fs_->super)) return false;
    struct ext2_inode inode;
    TRY(ext4_.Check(ext2fs_read_inode(fs_, dir, &inode), context + ": read directory"));
    if ((inode.i_flags & (EXT2_INDEX_FL | EXT4_INLINE_DATA_FL)) || EXT2_I_SIZE(&inode) != bs) {
      return false;
    }
    blk64_t root_block = 0;
    TRY(ext4_.Check(ext2fs_bmap2(fs_, dir, &inode, nullptr, 0, 0, nullptr, &root_block),
                    context + ": map directory"));
    std::vector<char> buf(bs);
    TRY(ext4_.Check(ext2fs_read_dir_block4(fs_, root_block, buf.data(), 0, dir),
                    context + ": read directory"));
    // (hash, minor hash, name, inode, file type) of every entry but . and ..
    using Name = std::tuple<ext2_dirhash_t, ext2_dirhash_t, std::string, ext2_ino_t, int>;
    std::vector<Name> names;
    ext2_ino_t dotdot = 0;
    const int version = HashVersion();
    for (unsigned int off = 0; off + 8 <= bs;) {
      auto* d = reinterpret_cast<struct ext2_dir_entry*>(buf.data() + off);
      unsigned int rec_len = 0;
      TRY(ext4_.Check(ext2fs_get_rec_len(fs_, d, &rec_len), context + ": read directory"));
      if (rec_len < 8 || off + rec_len > bs) break;
      int len = ext2fs_dirent_name_len(d);
      std::string name(d->name, static_cast<size_t>(len));
      if (d->inode != 0) {  // 0: free space or the checksum tail
        if (name == "..") {
          dotdot = d->inode;
        } else if (name != ".") {
          ext2_dirhash_t hash = 0, minor = 0;
          TRY(ext4_.Check(ext2fs_dirhash2(version, name.data(), len, fs_->encoding, 0,
                                          fs_->super->s_hash_seed, &hash, &minor),
                          context + ": hash"));
          names.emplace_back(hash, minor, std::move(name), d->inode, ext2fs_dirent_file_type(d));
        }
      }
      off += rec_len;
    }
    if (names.size() < 2 || dotdot == 0) return false;
    std::sort(names.begin(), names.end());
    // Split in the middle, between two different hashes when there are.
    size_t split = names.size() / 2;
    while (split < names.size() && std::get<0>(names[split]) == std::get<0>(names[split - 1])) {
      ++split;
    }
    if (split == names.size()) split = names.size() / 2;
    ext2_dirhash_t split_hash = std::get<0>(names[split]);
    if (split_hash == std::get<0>(names[split - 1])) split_hash |= 1;  // continued

    // Two new blocks (1, 2) for the leaves.
    for (int i = 0; i < 2; ++i) {
      TRY(ext4_.Check(ext2fs_expand_dir(fs_, dir), context + ": grow directory"));
    }
    TRY(ext4_.Check(ext2fs_read_inode(fs_, dir, &inode), context + ": read directory"));
    const bool csum = ext2fs_has_feature_metadata_csum(fs_->super);
    const unsigned int tail = csum ? sizeof(struct ext2_dir_entry_tail) : 0;
    for (int leaf = 0; leaf < 2; ++leaf) {
      blk64_t block = 0;
      TRY(ext4_.Check(ext2fs_bmap2(fs_, dir, &inode, nullptr, 0, leaf + 1, nullptr, &block),
                      context + ": map directory"));
      std::vector<char> out(bs, 0);
      unsigned int off = 0, last_off = 0;
      struct ext2_dir_entry* last = nullptr;
      size_t begin = leaf == 0 ? 0 : split, end = leaf == 0 ? split : names.size();
      for (size_t i = begin; i < end; ++i) {
        const auto& [hash, minor, name, ino, type] = names[i];
        unsigned int rec_len = (8 + static_cast<unsigned int>(name.size()) + 3) & ~3u;
        auto* d = reinterpret_cast<struct ext2_dir_entry*>(out.data() + off);
        d->inode = ino;
        ext2fs_dirent_set_name_len(d, static_cast<int>(name.size()));
        ext2fs_dirent_set_file_type(d, type);
        std::memcpy(d->name, name.data(), name.size());
        TRY(ext4_.Check(ext2fs_set_rec_len(fs_, rec_len, d), context + ": write directory"));
        last = d;
        last_off = off;
        off += rec_len;
      }
      // The last entry covers the rest of the block (up to the tail).
      if (last == nullptr) last = reinterpret_cast<struct ext2_dir_entry*>(out.data());
      TRY(ext4_.Check(ext2fs_set_rec_len(fs_, bs - tail - last_off, last),
                      context + ": write directory"));
      if (csum) ext2fs_initialize_dirent_tail(fs_, EXT2_DIRENT_TAIL(out.data(), bs));
      TRY(ext4_.Check(ext2fs_write_dir_block4(fs_, block, out.data(), 0, dir),
                      context + ": write directory"));
    }

    // The root: "." and ".." (covering the rest), then the index.
    std::vector<char> root(bs, 0);
    auto* dot = reinterpret_cast<struct ext2_dir_entry*>(root.data());
    dot->inode = dir;
    ext2fs_dirent_set_name_len(dot, 1);
    ext2fs_dirent_set_file_type(dot, EXT2_FT_DIR);
    dot->name[0] = '.';
    TRY(ext4_.Check(ext2fs_set_rec_len(fs_, 12, dot), context + ": write directory"));
    auto* dotdot_entry = reinterpret_cast<struct ext2_dir_entry*>(root.data() + 12);
    dotdot_entry->inode = dotdot;
    ext2fs_dirent_set_name_len(dotdot_entry, 2);
    ext2fs_dirent_set_file_type(dotdot_entry, EXT2_FT_DIR);
    dotdot_entry->name[0] = dotdot_entry->name[1] = '.';
    TRY(ext4_.Check(ext2fs_set_rec_len(fs_, bs - 12, dotdot_entry), context + ": write directory"));
    auto* info = reinterpret_cast<struct ext2_dx_root_info*>(root.data() + 24);
    info->hash_version = static_cast<uint8_t>(fs_->super->s_def_hash_version);
    info->info_length = sizeof(struct ext2_dx_root_info);
    auto* limit = reinterpret_cast<struct ext2_dx_countlimit*>(root.data() + 32);
    limit->limit = static_cast<uint16_t>((bs - 32 - (csum ? sizeof(struct ext2_dx_tail) : 0)) /
                                         sizeof(struct ext2_dx_entry));
    limit->count = 2;
    auto* entries = reinterpret_cast<struct ext2_dx_entry*>(root.data() + 32);
    entries[0].block = 1;  // entries[0].hash is the count/limit
    entries[1].hash = split_hash;
    entries[1].block = 2;
    TRY(ext4_.Check(ext2fs_write_dir_block4(fs_, root_block, root.data(), 0, dir),
                    context + ": write directory index"));
    inode.i_flags |= EXT2_INDEX_FL;
    TRY(ext4_.Check(ext2fs_write_inode(fs_, dir, &inode), context + ": write directory"));
    return true;
  }

  // Drops one link of `ino`, freeing it and its blocks at zero.
  Status Release(ext2_ino_t ino, const std::string& path) {
    struct ext2_inode inode;
    TRY(ext4_.Check(ext2fs_read_inode(fs_, ino, &inode), "read " + path));
    if (inode.i_links_count > 1) {
      --inode.i_links_count;
      return ext4_.Check(ext2fs_write_inode(fs_, ino, &inode), "write " + path);
    }
    inode.i_links_count = 0;
    if (ext2fs_inode_has_valid_blocks2(fs_, &inode)) {
      TRY(ext4_.Check(ext2fs_punch(fs_, ino, &inode, nullptr, 0, ~0ULL), "free " + path));
    }
    TRY(ext4_.Check(ext2fs_free_ext_attr(fs_, ino, reinterpret_cast<ext2_inode_large*>(&inode)),
                    "free xattrs of " + path));
    inode.i_dtime = static_cast<uint32_t>(fs_->now ? fs_->now : time(nullptr));
    TRY(ext4_.Check(ext2fs_write_inode(fs_, ino, &inode), "write " + path));
    ext2fs_inode_alloc_stats2(fs_, ino, -1, 0);
    return Status::Ok();
  }

  Status Add(ext2_ino_t parent, const std::string& parent_path, const Entry& e) {
    const std::string name = Base(e.path);
    ext2_ino_t existing = 0;
    errcode_t err = EXT2_ET_FILE_NOT_FOUND;
    if (!fresh_dirs_.count(parent_path) || inodes_.count(e.path)) {
      err = ext2fs_lookup(fs_, parent, name.c_str(), name.size(), nullptr, &existing);
    }
    if (err && err != EXT2_ET_FILE_NOT_FOUND) return ext4_.Check(err, "look up " + e.path);
    if (err == 0) {
      struct ext2_inode old;
      TRY(ext4_.Check(ext2fs_read_inode(fs_, existing, &old), "read " + e.path));
      if (LINUX_S_ISDIR(old.i_mode)) {
        if (e.type == EntryType::kDirectory) {
          inodes_[e.path] = existing;  // merge
          dirs_.insert(e.path);
          if (e.synthesized) return Status::Ok();
          TRY(SetAttrs(existing, e));
          return SetXattrs(existing, e);
        }
        Warn(e.path + ": a directory is in the way (skipped)");
        skipped_.insert(e.path);
        return Status::Ok();
      }
      TRY(ext4_.Check(ext2fs_unlink(fs_, parent, name.c_str(), existing, 0), "unlink " + e.path));
      TRY(Release(existing, e.path));
      inodes_.erase(e.path);
    }

    if (e.type == EntryType::kHardLink) {
      auto target = inodes_.find(e.link_target);
      if (target == inodes_.end()) {
        Warn(e.path + ": hard link to " + e.link_target + ", which was skipped (skipped)");
        return Status::Ok();
      }
      ext2_ino_t ino = target->second;
      TRY(Retry([&] { return ext2fs_link(fs_, parent, name.c_str(), ino, EXT2_FT_REG_FILE); },
                parent, "link " + e.path));
      struct ext2_inode inode;
      TRY(ext4_.Check(ext2fs_read_inode(fs_, ino, &inode), "read " + e.path));
      ++inode.i_links_count;
      TRY(ext4_.Check(ext2fs_write_inode(fs_, ino, &inode), "write " + e.path));
      inodes_[e.path] = ino;
      ++report_.hard_links;
      return Status::Ok();
    }

    ext2_ino_t ino = 0;
    if (e.type == EntryType::kDirectory) {
      TRY(ext4_.Check(ext2fs_new_inode(fs_, parent, LINUX_S_IFDIR | 0755, nullptr, &ino),
                      "allocate inode for " + e.path));
      TRY(Retry([&] { return ext2fs_mkdir(fs_, parent, ino, name.c_str()); }, parent,
                "mkdir " + e.path));
      dirs_.insert(e.path);
      fresh_dirs_.insert(e.path);
    } else if (e.type == EntryType::kSymlink) {
      if (e.link_target.size() >= fs_->blocksize) {
        Warn(e.path + ": symlink target longer than a block (skipped)");
        return Status::Ok();
      }
      TRY(ext4_.Check(ext2fs_new_inode(fs_, parent, LINUX_S_IFLNK | 0777, nullptr, &ino),
                      "allocate inode for " + e.path));
      TRY(Retry(
          [&] { return ext2fs_symlink(fs_, parent, ino, name.c_str(), e.link_target.c_str()); },
          parent, "symlink " + e.path));
    } else {
      uint32_t mode = ModeType(e.type) | e.mode;
      TRY(ext4_.Check(ext2fs_new_inode(fs_, parent, static_cast<int>(mode), nullptr, &ino),
                      "allocate inode for " + e.path));
      TRY(Retry([&] { return ext2fs_link(fs_, parent, name.c_str(), ino, FileType(mode)); }, parent,
                "link " + e.path));
      ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
      struct ext2_inode inode;
      std::memset(&inode, 0, sizeof(inode));
      inode.i_mode = static_cast<uint16_t>(mode);
      inode.i_links_count = 1;
      if (e.type == EntryType::kCharDevice || e.type == EntryType::kBlockDevice) {
        // Old encoding when both fit a byte, else the new one (as the kernel).
        if (e.dev_major < 256 && e.dev_minor < 256) {
          inode.i_block[0] = e.dev_major * 256 + e.dev_minor;
        } else {
          inode.i_block[1] =
              (e.dev_minor & 0xff) | (e.dev_major << 8) | ((e.dev_minor & ~0xffu) << 12);
        }
      } else if (e.type == EntryType::kRegular && ext2fs_has_feature_extents(fs_->super)) {
        ext2_extent_handle_t handle;
        TRY(ext4_.Check(ext2fs_extent_open2(fs_, ino, &inode, &handle),
                        "extent tree of " + e.path));
        ext2fs_extent_free(handle);
      }
      TRY(ext4_.Check(ext2fs_write_new_inode(fs_, ino, &inode), "write " + e.path));
      if (e.type == EntryType::kRegular) TRY(WriteData(ino, e));
    }
    inodes_[e.path] = ino;
    ++report_.files;
    TRY(SetAttrs(ino, e));
    return SetXattrs(ino, e);
  }

  Status WriteData(ext2_ino_t ino, const Entry& e) {
    ext2_file_t file = nullptr;
    TRY(ext4_.Check(ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &file), "open " + e.path));
    Status s = source_.ReadData([&](uint64_t offset, std::span<const std::byte> data) -> Status {
      if (offset + data.size() > e.size_bytes) data = data.first(e.size_bytes - offset);
      TRY(ext4_.Check(ext2fs_file_llseek(file, offset, EXT2_SEEK_SET, nullptr), "seek " + e.path));
      while (!data.empty()) {
        unsigned int chunk = static_cast<unsigned int>(std::min<size_t>(data.size(), 1 << 20));
        unsigned int written = 0;
        TRY(ext4_.Check(ext2fs_file_write(file, data.data(), chunk, &written), "write " + e.path));
        if (written == 0) return Status::NoSpace("write " + e.path + ": no space");
        data = data.subspan(written);
        report_.data_bytes += written;
        progress_.bytes_done += written;
      }
      if (options_.progress) options_.progress(progress_);
      return Status::Ok();
    });
    if (s.ok()) s = ext4_.Check(ext2fs_file_set_size2(file, e.size_bytes), "size " + e.path);
    errcode_t close_err = ext2fs_file_close(file);
    TRY(s);
    return ext4_.Check(close_err, "close " + e.path);
  }

  Status SetAttrs(ext2_ino_t ino, const Entry& e) {
    struct ext2_inode_large inode;
    std::memset(&inode, 0, sizeof(inode));
    TRY(ext4_.Check(
        ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode)),
        "read " + e.path));
    inode.i_mode = static_cast<uint16_t>((inode.i_mode & LINUX_S_IFMT) | (e.mode & 07777));
    uint32_t uid = static_cast<uint32_t>(e.uid + options_.uid_shift);
    uint32_t gid = static_cast<uint32_t>(e.gid + options_.gid_shift);
    inode.i_uid = static_cast<uint16_t>(uid);
    ext2fs_set_i_uid_high(inode, uid >> 16);
    inode.i_gid = static_cast<uint16_t>(gid);
    ext2fs_set_i_gid_high(inode, gid >> 16);
    EncodeTime(e.atime, &inode.i_atime, &inode.i_atime_extra);
    EncodeTime(e.mtime, &inode.i_mtime, &inode.i_mtime_extra);
    EncodeTime(e.ctime, &inode.i_ctime, &inode.i_ctime_extra);
    if (inode.i_extra_isize < 4 * sizeof(uint32_t) + 4) {
      inode.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
    }
    return ext4_.Check(
        ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode)),
        "write " + e.path);
  }

  Status SetXattrs(ext2_ino_t ino, const Entry& e) {
    if (e.xattrs.empty()) return Status::Ok();
    struct ext2_xattr_handle* h = nullptr;
    TRY(ext4_.Check(ext2fs_xattrs_open(fs_, ino, &h), "xattrs of " + e.path));
    Status s = ext4_.Check(ext2fs_xattrs_read(h), "read xattrs of " + e.path);
    for (const auto& [name, value] : e.xattrs) {
      if (!s.ok()) break;
      s = ext4_.Check(ext2fs_xattr_set(h, name.c_str(), value.data(), value.size()),
                      "set xattr " + name + " of " + e.path);
    }
    errcode_t close_err = ext2fs_xattrs_close(&h);
    TRY(s);
    return ext4_.Check(close_err, "write xattrs of " + e.path);
  }

  Ext4& ext4_;
  ext2_filsys fs_;
  TreeSource& source_;
  const PopulateOptions& options_;
  PopulateReport& report_;
  std::set<std::string> skipped_;
  std::unordered_map<std::string, ext2_ino_t> inodes_;
  // Paths of inodes_ that are directories, and those of them this scan
  // created.
  std::unordered_set<std::string> dirs_;
  std::unordered_set<std::string> fresh_dirs_;
  PopulateProgress progress_;
};

}  // namespace

Result<PopulateReport> Populate(Image& image, TreeSource& source, const PopulateOptions& options) {
  ASSIGN_OR_RETURN(auto ext4, Ext4::Open(image, /*writable=*/true));
  PopulateReport report;
  Writer writer(*ext4, source, options, report);
  TRY(writer.Plan());
  TRY(writer.Write());
  TRY(ext4->Close());
  std::vector<std::string> warnings = source.warnings();
  warnings.insert(warnings.end(), report.warnings.begin(), report.warnings.end());
  report.warnings = std::move(warnings);
  return report;
}

}  // namespace ploop::fsimage
