// A tree of files to put into a file system, as a stream of entries: the
// common shape of a host directory (DirSource) and a tarball (TarSource).
//
// A source yields entries parents-first with '/'-separated paths relative
// to the tree's root ("" is the root itself). Metadata comes with the
// entry; file data is read on demand for the current entry, as extents so
// holes stay holes. Sources are scanned twice (plan, then write), so they
// can Rewind().
//
// Thread-safety: a source is used by one thread. Ownership: a source owns
// what it opened.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ploop/status.h"

namespace ploop::fsimage {

enum class EntryType {
  kRegular,
  kDirectory,
  kSymlink,
  kHardLink,
  kCharDevice,
  kBlockDevice,
  kFifo,
  kSocket
};

struct Timestamp {
  int64_t seconds = 0;
  uint32_t nanoseconds = 0;
  bool operator==(const Timestamp&) const = default;
};

struct Entry {
  std::string path;  // relative, "" for the root of the tree
  EntryType type = EntryType::kRegular;
  uint32_t mode = 0;  // permission bits incl. setuid/setgid/sticky (07777)
  uint64_t uid = 0;
  uint64_t gid = 0;
  Timestamp atime, mtime, ctime;
  uint64_t size_bytes = 0;  // regular files: logical size
  // Regular files: bytes that hold data (holes excluded), for sizing.
  uint64_t data_bytes = 0;
  // Symlinks: the target. Hard links: the tree path of the first name.
  std::string link_target;
  uint32_t dev_major = 0;
  uint32_t dev_minor = 0;
  // Extended attributes, full names ("user.x", "security.capability",
  // "system.posix_acl_access" in the kernel's xattr format).
  std::vector<std::pair<std::string, std::string>> xattrs;
  // A directory the source made up because it had children but no entry
  // of its own (a tarball's missing parent, or its root): created when
  // missing, but an existing directory keeps its metadata.
  bool synthesized = false;
};

// Called for each run of file data: bytes at `offset_bytes` of the file.
using DataFn = std::function<Status(uint64_t offset_bytes, std::span<const std::byte> data)>;

class TreeSource {
 public:
  virtual ~TreeSource() = default;
  // Starts again from the first entry.
  virtual Status Rewind() = 0;
  // Fills *entry with the next entry; false at the end. Entries the source
  // cannot read are skipped with a warning (warnings()).
  virtual Result<bool> Next(Entry* entry) = 0;
  // Streams the data of the current regular-file entry, skipping holes.
  virtual Status ReadData(const DataFn& fn) = 0;
  // Things skipped or changed, one line each, for the CLI to print.
  virtual const std::vector<std::string>& warnings() const = 0;
};

// A host directory tree read with lstat/readdir (sorted by name, so both
// scans agree), regular-file data with SEEK_DATA/SEEK_HOLE, xattrs with
// llistxattr. Hard links (same inode, link count > 1) become kHardLink
// entries after the first name. Unreadable entries are skipped with a
// warning. NotFound / IOError when `root` is not a readable directory.
Result<std::unique_ptr<TreeSource>> OpenDirSource(const std::string& root);

// A tarball read with libarchive: tar, pax, GNU and ustar formats, plain
// or compressed (gzip, xz, zstd, bzip2, ...; detected from the contents).
// Entries come in archive order, each preceded by made-up (synthesized)
// entries for parent directories not seen yet, so parents come first; the
// root "" always comes first. Data of sparse members is read as extents, so
// holes stay holes. Owners are the numeric ids (names are ignored); xattrs
// (incl. security.capability) and POSIX ACLs (as system.posix_acl_* in the
// kernel's format) come with the entry. Rewind() reopens the file.
//
// Hostile members are skipped with a warning each, and never reach the
// file system: absolute paths, paths with "..", paths that go through a
// symlink or a file of the archive, hard links whose target is not an
// earlier regular file of the archive. Symlinks themselves are kept as
// they are, whatever their target: inside the file system they resolve
// against its own root, not the host's.
//
// NotFound / IOError when `path` cannot be opened; InvalidArgument when it
// is not an archive libarchive reads. A damaged archive fails the scan with
// Corruption.
Result<std::unique_ptr<TreeSource>> OpenTarSource(const std::string& path);

}  // namespace ploop::fsimage
