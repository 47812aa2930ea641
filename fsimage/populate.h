// Populating an ext4 file system inside an image from a TreeSource (a host
// directory or a tarball): regular files (sparse: holes stay
// holes), directories, symlinks, hard links, devices, fifos, sockets,
// owner, group, mode incl. setuid/setgid/sticky, a/m/ctime with
// nanoseconds and xattrs (security.capability, POSIX ACLs).
//
// Two scans: the plan scan validates every entry and sizes the tree; only
// when everything fits does the write scan touch the disk. So a tree that
// is too large, or an id that would overflow with the shift, fails before
// anything is written. Existing names are handled as `fs-add` needs:
// directories are merged (their metadata updated), other files replaced;
// a directory is never replaced by a file (skipped with a warning).
// A directory that grows past one block becomes a hashed index (htree),
// so lookups in large directories stay fast.
//
// Thread-safety: functions. The Image is used by one caller at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fsimage/tree.h"
#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::fsimage {

// How far the write scan is, for a progress display. Totals come from the
// plan scan.
struct PopulateProgress {
  uint64_t files_done = 0;  // entries written (not hard links)
  uint64_t files_total = 0;
  uint64_t bytes_done = 0;  // file data written
  uint64_t bytes_total = 0;
};

struct PopulateOptions {
  // Directory of the file system the tree's root maps onto; created (with
  // parents, mode 0755) when missing.
  std::string at = "/";
  // Added to every uid / gid on the way in.
  uint32_t uid_shift = 0;
  uint32_t gid_shift = 0;
  // Called during the write scan after each entry and each run of file
  // data (often: the callee throttles). May be empty.
  std::function<void(const PopulateProgress&)> progress;
};

struct PopulateReport {
  uint64_t files = 0;  // inodes created or updated (not hard links)
  uint64_t hard_links = 0;
  uint64_t data_bytes = 0;  // file data written
  // Entries skipped or changed (from the source and from here).
  std::vector<std::string> warnings;
};

// Adds the tree of `source` to the ext4 file system on `image` (writable).
// Errors, all before anything is written: InvalidArgument when an owner id
// plus its shift passes 2^32-1 (naming the file and the id); NoSpace
// ("needs N more bytes") when the tree does not fit in the free blocks or
// inodes; Corruption when the disk holds no ext4 file system. Later errors
// are the image's I/O errors with context. Names over 255 bytes, hard links
// to skipped files and symlink targets too long for a block are skipped
// with a warning.
Result<PopulateReport> Populate(Image& image, TreeSource& source, const PopulateOptions& options);

}  // namespace ploop::fsimage
