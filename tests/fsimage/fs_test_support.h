// Helpers for the fsimage tests: running e2fsck -fn on an image (exported
// to a raw file first), with the skip protocol when e2fsck is missing; a
// host tree with every file type, and comparing a file system with it.
#pragma once

#include <string>

#include "fsimage/reader.h"
#include "ploop/image.h"
#include "test_support.h"

namespace ploop::fsimage::testing {

// The e2fsck binary (PATH, /sbin, /usr/sbin), or "" when there is none.
std::string FindE2fsck();

struct FsckResult {
  int exit_code = -1;
  std::string output;
};

// Runs `e2fsck -fn` on the raw file `raw_path`.
FsckResult RunE2fsck(const std::string& raw_path);

// Exports `image` to `raw_path` (a real file) and runs e2fsck -fn on it;
// fails the test with e2fsck's output unless it exits 0. Skips the test
// (exit 77) when e2fsck is missing.
void RequireFsckClean(Image& image, const std::string& raw_path);

// The whole contents of file `path` of the file system (holes as zeros).
std::string ReadAll(Ext4Reader& reader, const std::string& path);
// The whole contents of host file `path`.
std::string HostRead(const std::string& path);

// What MakeHostTree could make besides plain files (some need root or
// file-system support).
struct HostTree {
  bool devices = false;
  bool user_xattrs = false;
  bool acls = false;
  bool caps = false;
};

// Builds, under existing directory `root`, a tree with every file type
// (a socket only with `with_socket`: tar cannot hold one) and metadata
// kind the host allows: setuid/setgid/sticky, sparse and random data,
// short and long symlinks, hard links, devices, xattrs incl. a big one,
// security.capability, a POSIX ACL, owners (as root) and ns timestamps.
HostTree MakeHostTree(const std::string& root, ::ploop::testing::TestRng& rng,
                      bool with_socket = true);

// Checks every entry of host tree `host_root` (as DirSource reads it)
// against the file system: type, mode, owner plus the shifts, mtime, size,
// bytes, holes, symlink target, device numbers, xattrs, hard-link groups.
void CompareTree(const std::string& host_root, Ext4Reader& reader, uint32_t uid_shift,
                 uint32_t gid_shift);

}  // namespace ploop::fsimage::testing
