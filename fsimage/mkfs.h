// Making an ext4 file system inside an image, without root: the layout
// `mke2fs -t ext4` produces, written through libext2fs and the image
// io_manager (io_manager.h).
//
// Features: the ext4 defaults of mke2fs 1.47 (has_journal, extent, 64bit,
// flex_bg (16 groups), dir_index, huge_file, dir_nlink, extra_isize,
// metadata_csum) plus the base set (sparse_super, large_file, filetype,
// resize_inode, ext_attr); 256-byte inodes; default mount options acl and
// user_xattr. The image must read as zeros where the file system has not
// written (a freshly created image does); with `discard_first` the whole
// disk is discarded first, so any image works.
//
// Thread-safety: functions; the Image is used by one caller at a time.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::fsimage {

struct MkfsOptions {
  // 1024, 2048, 4096 (default) or 65536's powers of two in between.
  uint32_t block_bytes = 4096;
  // Number of inodes; 0: one per `inode_ratio` bytes of disk.
  uint64_t inodes = 0;
  // Bytes of disk per inode; 0 picks mke2fs' ratio for the size (8K up to
  // 3M, 4K up to 512M, 16K, 32K from 4T, 64K from 16T).
  uint64_t inode_ratio = 0;
  // Percent of blocks reserved for root, 0..50.
  double reserved_percent = 5.0;
  // Volume label, at most 16 bytes.
  std::string label;
  // File system UUID; random when empty.
  std::optional<std::array<uint8_t, 16>> uuid;
  // Owner of the root directory.
  uint32_t root_uid = 0;
  uint32_t root_gid = 0;
  // Discard the whole disk first (for an image that may hold old data).
  bool discard_first = false;
};

// What was made, for the CLI to print.
struct MkfsResult {
  std::array<uint8_t, 16> uuid{};
  uint32_t block_bytes = 0;
  uint64_t blocks = 0;
  uint64_t inodes = 0;
  uint64_t reserved_blocks = 0;
  uint32_t journal_blocks = 0;  // 0: the disk was too small for a journal
};

// Formats UUID bytes as "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".
std::string FormatUuid(const std::array<uint8_t, 16>& uuid);
// Parses that form; nullopt when malformed.
std::optional<std::array<uint8_t, 16>> ParseUuid(std::string_view text);

// Writes a new ext4 file system over the whole of `image` (which must be
// writable) and flushes it. InvalidArgument for a bad block size, a label
// over 16 bytes, an inode count the disk cannot hold, or a disk too small
// for a file system (under 64 blocks); FailedPrecondition for a read-only
// image; the image's I/O errors (with context) when writing fails.
Result<MkfsResult> MakeExt4(Image& image, const MkfsOptions& options);

}  // namespace ploop::fsimage
