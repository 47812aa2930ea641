// The file-system commands: making (and filling) ext4 at init time,
// fs-add, ls and cat, all through fsimage/ without root. Only this layer
// parses and prints.

#include <ctime>
#include <iomanip>
#include <iostream>

#include "cli_common.h"
#include "commands.h"
#include "fsimage/mkfs.h"
#include "fsimage/populate.h"
#include "fsimage/reader.h"
#include "ploop/disk.h"
#include "progress.h"
#include "units.h"

namespace ploop::cli {
namespace {

void PrintWarnings(std::string_view command, const std::vector<std::string>& warnings) {
  for (const auto& w : warnings) std::cerr << "ploop " << command << ": warning: " << w << "\n";
}

// Copies --from-dir or --from-tar (exactly one must be given) into `image`.
Result<fsimage::PopulateReport> PopulateFrom(Image& image, const std::string& dir,
                                             const std::string& tar,
                                             fsimage::PopulateOptions options) {
  if (dir.empty() == tar.empty()) {
    return Status::InvalidArgument("give one of --from-dir and --from-tar");
  }
  std::unique_ptr<fsimage::TreeSource> source;
  if (!dir.empty()) {
    ASSIGN_OR_RETURN_CTX(source, fsimage::OpenDirSource(dir), "--from-dir");
  } else {
    ASSIGN_OR_RETURN_CTX(source, fsimage::OpenTarSource(tar), "--from-tar");
  }
  // "files 120/4000, 310 MiB/1.2 GiB, 95.2 MiB/s, ETA 0:12" on a terminal.
  ProgressBar bar;
  std::string prefix;
  options.progress = [&](const fsimage::PopulateProgress& p) {
    prefix = "files " + std::to_string(p.files_done) + "/" + std::to_string(p.files_total) + ", ";
    bar.Update(ProgressSample{"populate", p.bytes_done, p.bytes_total, prefix, std::nullopt});
  };
  auto report = fsimage::Populate(image, *source, options);
  bar.Finish();
  return report;
}

Result<std::unique_ptr<Chain>> OpenDiskArg(const std::string& dd, const std::string& guid,
                                           bool writable) {
  std::string dd_path;
  if (!IsDescriptorPath(DefaultFileSystem(), dd, &dd_path)) {
    return Status::InvalidArgument(dd + " is not a DiskDescriptor.xml (nor a folder with one)");
  }
  OpenOptions options;
  options.writable = writable;
  return OpenDisk(DefaultFileSystem(), dd_path, guid, options, LoadOptions());
}

char TypeChar(fsimage::EntryType type) {
  switch (type) {
    case fsimage::EntryType::kDirectory:
      return 'd';
    case fsimage::EntryType::kSymlink:
      return 'l';
    case fsimage::EntryType::kCharDevice:
      return 'c';
    case fsimage::EntryType::kBlockDevice:
      return 'b';
    case fsimage::EntryType::kFifo:
      return 'p';
    case fsimage::EntryType::kSocket:
      return 's';
    default:
      return '-';
  }
}

std::string ModeString(const fsimage::Entry& e) {
  std::string s(10, '-');
  s[0] = TypeChar(e.type);
  const char* rwx = "rwxrwxrwx";
  for (int i = 0; i < 9; ++i) {
    if (e.mode & (0400u >> i)) s[1 + i] = rwx[i];
  }
  if (e.mode & 04000) s[3] = (e.mode & 0100) ? 's' : 'S';
  if (e.mode & 02000) s[6] = (e.mode & 0010) ? 's' : 'S';
  if (e.mode & 01000) s[9] = (e.mode & 0001) ? 't' : 'T';
  return s;
}

// "ls -ln" style: mode links uid gid size-or-dev mtime(ns, UTC) name.
void PrintLine(const fsimage::FileInfo& f) {
  const fsimage::Entry& e = f.entry;
  std::time_t t = static_cast<std::time_t>(e.mtime.seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::cout << ModeString(e) << " " << f.links << " " << e.uid << " " << e.gid << " ";
  if (e.type == fsimage::EntryType::kCharDevice || e.type == fsimage::EntryType::kBlockDevice) {
    std::cout << e.dev_major << "," << e.dev_minor;
  } else {
    std::cout << e.size_bytes;
  }
  std::cout << " " << std::put_time(&tm, "%Y-%m-%d %H:%M:%S") << "." << std::setw(9)
            << std::setfill('0') << e.mtime.nanoseconds << std::setfill(' ') << " " << e.path;
  if (e.type == fsimage::EntryType::kSymlink) std::cout << " -> " << e.link_target;
  std::cout << "\n";
}

}  // namespace

Result<std::string> InitFsType(const InitArgs& args) {
  std::string type = args.fs_type;
  if (type.empty()) type = args.no_descriptor ? "none" : "ext4";
  if (type != "ext4" && type != "none") {
    return Status::InvalidArgument("unknown file system type '" + type + "' (use ext4 or none)");
  }
  if (type == "none" &&
      (!args.label.empty() || args.inodes != 0 || !args.block_size.empty() ||
       !args.from_dir.empty() || !args.from_tar.empty() || args.uid_shift || args.gid_shift)) {
    return Status::InvalidArgument(
        "-L, --inodes, -B, --from-dir, --from-tar and --uid/gid-shift need a file system (-t "
        "ext4)");
  }
  if (!args.from_dir.empty() && !args.from_tar.empty()) {
    return Status::InvalidArgument("give one of --from-dir and --from-tar");
  }
  return type;
}

Result<std::string> MakeInitFilesystem(const InitArgs& args, Image& image) {
  fsimage::MkfsOptions options;
  options.label = args.label;
  options.inodes = args.inodes;
  if (!args.block_size.empty()) {
    auto bs = ParseSize(args.block_size);
    if (!bs || (*bs != 1024 && *bs != 2048 && *bs != 4096)) {
      return Status::InvalidArgument("invalid block size '" + args.block_size +
                                     "' (use 1K, 2K or 4K)");
    }
    options.block_bytes = static_cast<uint32_t>(*bs);
  }
  ASSIGN_OR_RETURN(fsimage::MkfsResult made, fsimage::MakeExt4(image, options));
  std::string summary = "ext4 (UUID " + fsimage::FormatUuid(made.uuid);
  if (!args.label.empty()) summary += ", label " + args.label;
  summary += ", " + std::to_string(made.inodes) + " inodes, " +
             std::to_string(made.block_bytes / 1024) + "K blocks)";
  if (!args.from_dir.empty() || !args.from_tar.empty()) {
    fsimage::PopulateOptions po;
    po.uid_shift = args.uid_shift;
    po.gid_shift = args.gid_shift;
    ASSIGN_OR_RETURN(auto report, PopulateFrom(image, args.from_dir, args.from_tar, po));
    PrintWarnings("init", report.warnings);
    summary += ", " + std::to_string(report.files) + " files copied from " +
               (args.from_dir.empty() ? args.from_tar : args.from_dir);
  }
  return summary;
}

int RunFsAdd(const FsArgs& args) {
  if (args.from_dir.empty() == args.from_tar.empty()) {
    return Fail("fs-add", Status::InvalidArgument("give one of --from-dir and --from-tar"));
  }
  auto chain = OpenDiskArg(args.dd, "", /*writable=*/true);
  if (!chain.ok()) return Fail("fs-add", chain.error());
  fsimage::PopulateOptions po;
  po.at = args.at;
  po.uid_shift = args.uid_shift;
  po.gid_shift = args.gid_shift;
  auto report = PopulateFrom(**chain, args.from_dir, args.from_tar, po);
  Status closed = (*chain)->Close();
  if (!report.ok()) return Fail("fs-add", report.error());
  if (!closed.ok()) return Fail("fs-add", closed);
  PrintWarnings("fs-add", report->warnings);
  std::cout << "Added " << report->files << " files (" << report->hard_links << " hard links, "
            << HumanSize(report->data_bytes) << " of data) at " << args.at << "\n";
  return kExitOk;
}

int RunLs(const FsArgs& args) {
  auto chain = OpenDiskArg(args.dd, args.guid, /*writable=*/false);
  if (!chain.ok()) return Fail("ls", chain.error());
  auto reader = fsimage::Ext4Reader::Open(**chain);
  if (!reader.ok()) return Fail("ls", reader.error());
  std::string path = args.path.empty() ? "/" : args.path;
  auto info = (*reader)->Stat(path);
  if (!info.ok()) return Fail("ls", info.error());
  if (info->entry.type != fsimage::EntryType::kDirectory) {
    PrintLine(*info);
    return kExitOk;
  }
  auto list = (*reader)->List(path);
  if (!list.ok()) return Fail("ls", list.error());
  for (const auto& f : *list) PrintLine(f);
  return kExitOk;
}

int RunCat(const FsArgs& args) {
  auto chain = OpenDiskArg(args.dd, args.guid, /*writable=*/false);
  if (!chain.ok()) return Fail("cat", chain.error());
  auto reader = fsimage::Ext4Reader::Open(**chain);
  if (!reader.ok()) return Fail("cat", reader.error());
  Status s = (*reader)->Read(args.path, [](uint64_t, std::span<const std::byte> data) {
    std::cout.write(reinterpret_cast<const char*>(data.data()),
                    static_cast<std::streamsize>(data.size()));
    return std::cout ? Status::Ok() : Status::FromErrno(EPIPE, "write to stdout");
  });
  std::cout.flush();
  if (!s.ok()) return Fail("cat", s);
  return kExitOk;
}

}  // namespace ploop::cli
