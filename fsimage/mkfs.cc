// mkfs: an ext4 file system written through libext2fs onto an Image.
//
// The order follows mke2fs, minus what a fresh image makes unnecessary:
//
//   ext2fs_initialize(params)      superblock + group descriptors in memory
//   uuid, hash seed, csum seed     before anything checksummed is written
//   ext2fs_allocate_tables         bitmaps and inode tables (flex_bg packed)
//   inode tables                   not written: the image reads as zeros, so
//                                  every group is marked INODE_ZEROED and the
//                                  kernel never zeroes them lazily
//   reserved inodes 1..10          written once so their checksums are valid
//   /, /lost+found (16K)           ext2fs_mkdir, ext2fs_expand_dir
//   bad-block and resize inodes
//   journal                        ext2fs_add_journal_inode3, LAZYINIT (zeros
//                                  are already there)
//   ext2fs_close_free              flushes bitmaps, descriptors, superblocks
//   Image::Flush                   durable
//
// Invariant: nothing is written outside libext2fs' own calls, so the
// resulting file system is exactly what libext2fs believes it wrote, and
// e2fsck -fn finds it clean.
#include "fsimage/mkfs.h"

#include <cstring>
#include <random>

#include "fsimage/io_manager.h"

namespace ploop::fsimage {
namespace {

// mke2fs.conf's [fs_types] ratios, picked by disk size.
uint64_t DefaultInodeRatio(uint64_t size_bytes) {
  constexpr uint64_t kMiB = 1024 * 1024;
  if (size_bytes < 3 * kMiB) return 8192;
  if (size_bytes < 512 * kMiB) return 4096;
  if (size_bytes >= 16 * 1024 * 1024 * kMiB) return 65536;
  if (size_bytes >= 4 * 1024 * 1024 * kMiB) return 32768;
  return 16384;
}

std::array<uint8_t, 16> RandomUuid() {
  std::random_device rd;
  std::array<uint8_t, 16> u;
  for (auto& b : u) b = static_cast<uint8_t>(rd());
  u[6] = static_cast<uint8_t>((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = static_cast<uint8_t>((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return u;
}

// Owns an ext2_filsys until Close(); frees it without flushing otherwise.
class FsHolder {
 public:
  ~FsHolder() {
    if (fs_ != nullptr) ext2fs_free(fs_);
  }
  ext2_filsys* out() { return &fs_; }
  ext2_filsys get() const { return fs_; }
  errcode_t Close() { return ext2fs_close_free(&fs_); }

 private:
  ext2_filsys fs_ = nullptr;
};

}  // namespace

std::string FormatUuid(const std::array<uint8_t, 16>& uuid) {
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += kHex[uuid[i] >> 4];
    out += kHex[uuid[i] & 15];
  }
  return out;
}

std::optional<std::array<uint8_t, 16>> ParseUuid(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  std::array<uint8_t, 16> out{};
  size_t n = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return std::nullopt;
      ++i;
      continue;
    }
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = hex(text[i]), lo = hex(text[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[n++] = static_cast<uint8_t>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

Result<MkfsResult> MakeExt4(Image& image, const MkfsOptions& options) {
  const uint32_t bs = options.block_bytes;
  if (bs < EXT2_MIN_BLOCK_SIZE || bs > EXT2_MAX_BLOCK_SIZE || (bs & (bs - 1)) != 0) {
    return Status::InvalidArgument("block size " + std::to_string(bs) +
                                   " is not a power of two from 1024 to 65536");
  }
  if (options.label.size() > EXT2_LABEL_LEN) {
    return Status::InvalidArgument("label '" + options.label + "' is longer than 16 bytes");
  }
  if (options.reserved_percent < 0 || options.reserved_percent > 50) {
    return Status::InvalidArgument("reserved blocks percentage must be 0..50");
  }
  if (!image.writable()) return Status::FailedPrecondition("mkfs: the image is read-only");
  const uint64_t blocks = image.size_bytes() / bs;
  if (blocks < 64) {
    return Status::InvalidArgument("mkfs: a disk of " + std::to_string(image.size_bytes()) +
                                   " bytes is too small for an ext4 file system");
  }
  uint64_t inodes = options.inodes;
  if (inodes == 0) {
    uint64_t ratio =
        options.inode_ratio ? options.inode_ratio : DefaultInodeRatio(image.size_bytes());
    if (ratio < bs) ratio = bs;
    inodes = blocks * bs / ratio;
  }
  if (inodes > UINT32_MAX) {
    if (options.inodes != 0) {
      return Status::InvalidArgument("mkfs: " + std::to_string(inodes) +
                                     " inodes is more than ext4 can hold (2^32-1)");
    }
    inodes = UINT32_MAX;
  }
  if (options.inodes != 0 && options.inodes > blocks * bs / 256 / 2) {
    // mke2fs refuses when the inode tables alone would take the disk.
    return Status::InvalidArgument("mkfs: " + std::to_string(options.inodes) +
                                   " inodes do not fit a disk of " + std::to_string(blocks) +
                                   " blocks of " + std::to_string(bs) + " bytes");
  }
  if (options.discard_first) TRY_CTX(image.Discard(0, image.size_bytes()), "mkfs: discard");

  struct ext2_super_block param;
  std::memset(&param, 0, sizeof(param));
  param.s_rev_level = EXT2_DYNAMIC_REV;
  // [defaults] base_features of mke2fs.conf, then the ext4 fs_type's.
  ext2fs_set_feature_sparse_super(&param);
  ext2fs_set_feature_large_file(&param);
  ext2fs_set_feature_filetype(&param);
  ext2fs_set_feature_resize_inode(&param);
  ext2fs_set_feature_dir_index(&param);
  ext2fs_set_feature_xattr(&param);
  ext2fs_set_feature_journal(&param);
  ext2fs_set_feature_extents(&param);
  ext2fs_set_feature_huge_file(&param);
  ext2fs_set_feature_flex_bg(&param);
  ext2fs_set_feature_metadata_csum(&param);
  ext2fs_set_feature_64bit(&param);
  ext2fs_set_feature_dir_nlink(&param);
  ext2fs_set_feature_extra_isize(&param);
  int log_block = 0;
  while ((1024u << log_block) < bs) ++log_block;
  param.s_log_block_size = static_cast<uint32_t>(log_block);
  param.s_log_cluster_size = static_cast<uint32_t>(log_block);
  ext2fs_blocks_count_set(&param, blocks);
  param.s_inode_size = 256;
  param.s_inodes_count = static_cast<uint32_t>(inodes);
  param.s_log_groups_per_flex = 4;  // flex_bg_size 16
  param.s_desc_size = EXT2_MIN_DESC_SIZE_64BIT;
  param.s_default_mount_opts = EXT2_DEFM_XATTR_USER | EXT2_DEFM_ACL;
  param.s_max_mnt_count = -1;  // enable_periodic_fsck = 0
  ext2fs_r_blocks_count_set(
      &param, static_cast<blk64_t>(options.reserved_percent * static_cast<double>(blocks) / 100));

  ImageBinding binding(image);
  FsHolder holder;
  TRY(FromErrcode(
      ext2fs_initialize(binding.name(), EXT2_FLAG_64BITS, &param, ImageIoManager(), holder.out()),
      "mkfs: initialize", &binding));
  ext2_filsys fs = holder.get();
  struct ext2_super_block* sb = fs->super;
  if (options.inodes != 0 && sb->s_inodes_count < options.inodes) {
    return Status::InvalidArgument("mkfs: the disk holds at most " +
                                   std::to_string(sb->s_inodes_count) + " inodes");
  }

  // Identity and checksums first: every checksum written later is seeded
  // from the UUID.
  std::array<uint8_t, 16> uuid = options.uuid ? *options.uuid : RandomUuid();
  std::memcpy(sb->s_uuid, uuid.data(), 16);
  ext2fs_init_csum_seed(fs);
  sb->s_checksum_type = EXT2_CRC32C_CHKSUM;
  sb->s_def_hash_version = EXT2_HASH_HALF_MD4;
  std::array<uint8_t, 16> hash_seed = RandomUuid();
  std::memcpy(sb->s_hash_seed, hash_seed.data(), 16);
  std::memset(sb->s_volume_name, 0, sizeof(sb->s_volume_name));
  std::memcpy(sb->s_volume_name, options.label.data(), options.label.size());
  sb->s_kbytes_written = 1;

  TRY(FromErrcode(ext2fs_allocate_tables(fs), "mkfs: allocate group tables", &binding));
  TRY(FromErrcode(ext2fs_convert_subcluster_bitmap(fs, &fs->block_map),
                  "mkfs: convert block bitmap", &binding));
  blk64_t overhead = 0;
  TRY(FromErrcode(ext2fs_count_used_clusters(fs, sb->s_first_data_block,
                                             ext2fs_blocks_count(sb) - 1, &overhead),
                  "mkfs: count overhead", &binding));

  // Inode tables read as zeros already (fresh image or discard_first).
  for (dgrp_t g = 0; g < fs->group_desc_count; ++g) {
    ext2fs_bg_flags_set(fs, g, EXT2_BG_INODE_ZEROED);
    ext2fs_group_desc_csum_set(fs, g);
  }
  {
    // Reserved inodes must carry valid checksums.
    std::vector<char> zero(EXT2_INODE_SIZE(sb), 0);
    for (ext2_ino_t ino = 1; ino < EXT2_FIRST_INO(sb); ++ino) {
      TRY(FromErrcode(ext2fs_write_inode_full(fs, ino, reinterpret_cast<ext2_inode*>(zero.data()),
                                              EXT2_INODE_SIZE(sb)),
                      "mkfs: write reserved inodes", &binding));
    }
  }

  TRY(FromErrcode(ext2fs_mkdir(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, nullptr),
                  "mkfs: create root directory", &binding));
  if (options.root_uid != 0 || options.root_gid != 0) {
    struct ext2_inode inode;
    TRY(FromErrcode(ext2fs_read_inode(fs, EXT2_ROOT_INO, &inode), "mkfs: read root", &binding));
    inode.i_uid = static_cast<uint16_t>(options.root_uid);
    ext2fs_set_i_uid_high(inode, options.root_uid >> 16);
    inode.i_gid = static_cast<uint16_t>(options.root_gid);
    ext2fs_set_i_gid_high(inode, options.root_gid >> 16);
    TRY(FromErrcode(ext2fs_write_inode(fs, EXT2_ROOT_INO, &inode), "mkfs: write root", &binding));
  }

  const char* kLostFound = "lost+found";
  fs->umask = 077;
  TRY(FromErrcode(ext2fs_mkdir(fs, EXT2_ROOT_INO, 0, kLostFound), "mkfs: create /lost+found",
                  &binding));
  fs->umask = 022;
  ext2_ino_t lpf = 0;
  TRY(FromErrcode(
      ext2fs_lookup(fs, EXT2_ROOT_INO, kLostFound, std::strlen(kLostFound), nullptr, &lpf),
      "mkfs: look up /lost+found", &binding));
  // At least 16K and two blocks, as mke2fs, so e2fsck has room to reconnect.
  uint32_t lpf_bytes = 0;
  for (int i = 1; i < EXT2_NDIR_BLOCKS; ++i) {
    if ((lpf_bytes += fs->blocksize) >= 16 * 1024 && lpf_bytes >= 2 * fs->blocksize) break;
    TRY(FromErrcode(ext2fs_expand_dir(fs, lpf), "mkfs: expand /lost+found", &binding));
  }

  for (ext2_ino_t ino = EXT2_ROOT_INO + 1; ino < EXT2_FIRST_INODE(sb); ++ino) {
    ext2fs_inode_alloc_stats2(fs, ino, +1, 0);
  }
  ext2fs_mark_ib_dirty(fs);
  ext2fs_mark_inode_bitmap2(fs->inode_map, EXT2_BAD_INO);
  ext2fs_inode_alloc_stats2(fs, EXT2_BAD_INO, +1, 0);
  TRY(FromErrcode(ext2fs_update_bb_inode(fs, nullptr), "mkfs: bad-block inode", &binding));
  if (ext2fs_has_feature_resize_inode(sb)) {
    TRY(FromErrcode(ext2fs_create_resize_inode(fs), "mkfs: resize inode", &binding));
  }

  MkfsResult result;
  struct ext2fs_journal_params jparams;
  if (ext2fs_get_journal_params(&jparams, fs) != 0 || jparams.num_journal_blocks == 0) {
    // Too small for a journal: mke2fs goes on without one.
    ext2fs_clear_feature_journal(sb);
  } else {
    TRY(FromErrcode(ext2fs_add_journal_inode3(fs, &jparams, ~0ULL, EXT2_MKJOURNAL_LAZYINIT),
                    "mkfs: create journal", &binding));
    overhead += EXT2FS_NUM_B2C(fs, jparams.num_journal_blocks + jparams.num_fc_blocks);
    result.journal_blocks = jparams.num_journal_blocks + jparams.num_fc_blocks;
  }
  overhead += sb->s_first_data_block;
  sb->s_overhead_clusters = static_cast<uint32_t>(overhead);

  result.uuid = uuid;
  result.block_bytes = fs->blocksize;
  result.blocks = ext2fs_blocks_count(sb);
  result.inodes = sb->s_inodes_count;
  result.reserved_blocks = ext2fs_r_blocks_count(sb);
  TRY(FromErrcode(holder.Close(), "mkfs: write metadata", &binding));
  TRY_CTX(image.Flush(), "mkfs: flush");
  return result;
}

}  // namespace ploop::fsimage
