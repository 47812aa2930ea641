// The `ploop` subcommands. Each takes its parsed arguments, prints its
// output on stdout and one-line errors on stderr, and returns the process
// exit code (see ExitCode).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::cli {

// Documented in `ploop --help` and README.md.
enum ExitCode : int {
  kExitOk = 0,
  kExitProblems = 1,  // check found problems; io read found other data
  kExitUsage = 2,     // bad command line or argument value
  kExitNotFound = 3,
  kExitExists = 4,
  kExitCorrupt = 5,  // image corrupt, or not a ploop image
  kExitUnsupported = 6,
  kExitIo = 7,
  kExitNoSpace = 8,
  kExitBusy = 9,    // image in use by another program
  kExitState = 10,  // wrong state: read-only, shrinking, ...
  // receive: the stream broke off or went bad after the receive started;
  // the partial state is kept in the folder (continue with --resume).
  kExitInterrupted = 11,
};

int ExitCodeFor(const Status& status);
// --allow-outside-files: descriptors may name files outside their folder.
void SetAllowOutsideFiles(bool allow);
const char* ExitCodeTable();

struct InitArgs {
  std::string file;
  std::string size;
  std::string format = "expanded";
  std::string cluster;
  bool no_descriptor = false;
  // File system to make: "ext4" or "none"; empty means ext4 for a disk and
  // none for a bare image (--no-descriptor).
  std::string fs_type;
  std::string label;       // -L
  uint64_t inodes = 0;     // --inodes
  std::string block_size;  // -B
  std::string from_dir;    // --from-dir: populate from a host directory
  std::string from_tar;    // --from-tar: populate from a tarball
  uint32_t uid_shift = 0;  // --uid-shift
  uint32_t gid_shift = 0;  // --gid-shift
};
int RunInit(const InitArgs& args);

struct InfoArgs {
  std::string file;
  std::string format;
  bool json = false;
};
int RunInfo(const InfoArgs& args);

struct CheckArgs {
  std::string file;
  bool repair = false;
  bool json = false;
};
int RunCheck(const CheckArgs& args);

struct ImportArgs {
  std::string src;
  std::string dst;
  std::string format = "expanded";
  std::string cluster;
};
int RunImport(const ImportArgs& args);

struct ExportArgs {
  std::string guid;
  std::string src;
  std::string dst;
  std::string format;
};
int RunExport(const ExportArgs& args);

struct IoArgs {
  std::string guid;
  std::string file;
  std::string format;
  bool read_only = false;
  std::vector<std::string> commands;
};
int RunIo(const IoArgs& args);

struct ResizeArgs {
  std::string file;
  std::string format;
  std::string size;
};
int RunResize(const ResizeArgs& args);

// --- Disks (DiskDescriptor.xml) and snapshots: disk_commands.cc ---

struct SnapshotArgs {
  std::string dd;
  std::string guid;
  bool all = false;
  bool json = false;
};
int RunSnapshot(const SnapshotArgs& args);
int RunSnapshotList(const SnapshotArgs& args);
int RunSnapshotDelete(const SnapshotArgs& args);
int RunSnapshotMerge(const SnapshotArgs& args);
int RunSnapshotSwitch(const SnapshotArgs& args);
// `compact`: uses dd and json.
int RunCompact(const SnapshotArgs& args);

struct RestoreArgs {
  std::string dir;
  std::string image;
  std::string format;
};
int RunRestoreDescriptor(const RestoreArgs& args);

// --- File systems inside disks (fsimage/): fs_commands.cc ---

// The file system `args` ask for ("ext4" or "none"), or InvalidArgument.
Result<std::string> InitFsType(const InitArgs& args);
// Makes the file system of `args` on the new, empty `image`; returns a
// summary for the "Created ..." line (e.g. "ext4, UUID ...").
Result<std::string> MakeInitFilesystem(const InitArgs& args, Image& image);

struct FsArgs {
  std::string dd;
  std::string guid;
  std::string path;      // ls/cat: path in the file system
  std::string from_dir;  // fs-add
  std::string from_tar;  // fs-add
  std::string at = "/";  // fs-add
  uint32_t uid_shift = 0;
  uint32_t gid_shift = 0;
};
int RunLs(const FsArgs& args);
int RunCat(const FsArgs& args);
int RunFsAdd(const FsArgs& args);

// info and check of a whole disk (called by RunInfo/RunCheck for a
// descriptor).
int RunDiskInfo(const std::string& dd_path, bool json);
int RunDiskCheck(const std::string& dd_path, bool repair, bool json);

}  // namespace ploop::cli
