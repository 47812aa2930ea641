// Reading an ext4 file system inside an image without root or a mount:
// stat, directory listing and file contents through libext2fs, for
// `ploop ls` / `ploop cat` and for tests that compare a tree read back
// with its source.
//
// Thread-safety: one thread at a time. Ownership: a reader borrows the
// Image, which must outlive it.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fsimage/tree.h"
#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::fsimage {

class Ext4;

// The size in bytes of the ext2/3/4 file system at the start of `image`
// (its superblock's block count times its block size), or nullopt when
// the image holds none there. Errors of reading the image.
Result<std::optional<uint64_t>> ProbeExt4SizeBytes(Image& image);

struct FileInfo {
  // path is the name inside its directory for List(), the path given to
  // Stat(). Hard links read back as kRegular with links > 1.
  Entry entry;
  uint32_t inode = 0;
  uint32_t links = 0;
  // Bytes of disk blocks the inode holds (data and extent tree).
  uint64_t allocated_bytes = 0;
};

class Ext4Reader {
 public:
  // Opens the file system read-only. Corruption when the disk holds none.
  static Result<std::unique_ptr<Ext4Reader>> Open(Image& image);
  ~Ext4Reader();

  // The file at absolute `path` ("/" is the root; symlinks in the middle
  // are followed, a final one is not). NotFound when missing.
  Result<FileInfo> Stat(const std::string& path);
  // The entries of directory `path` sorted by name, without "." and "..".
  // InvalidArgument when `path` is not a directory.
  Result<std::vector<FileInfo>> List(const std::string& path);
  // Streams the contents of regular file `path` in order; holes come as
  // zeros. InvalidArgument when it is not a regular file.
  Status Read(const std::string& path, const DataFn& fn);

 private:
  explicit Ext4Reader(std::unique_ptr<Ext4> ext4);
  Result<uint32_t> Resolve(const std::string& path);
  Result<FileInfo> StatInode(uint32_t ino, std::string name);
  Status Read(uint32_t ino, uint64_t size_bytes, const DataFn& fn);

  std::unique_ptr<Ext4> ext4_;
};

}  // namespace ploop::fsimage
