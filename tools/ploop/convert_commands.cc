// `ploop convert --to raw|qcow2|vmdk [-u GUID] DD OUT` and
// `ploop convert --from raw|qcow2|vmdk [-f KIND] [-b CLUSTER] IN DIR/FILE`.
// Only this layer parses and prints; the work is mount-helper's
// foreign_image.
#include "convert_commands.h"

#include <iostream>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "mount-helper/foreign_image.h"
#include "ploop/descriptor.h"
#include "ploop/disk.h"
#include "ploop/format.h"
#include "stop_signals.h"
#include "units.h"

namespace ploop::cli {

namespace {

struct ConvertArgs {
  std::string to;
  std::string from;
  std::string guid;
  std::string kind;
  std::string cluster;
  std::string src;
  std::string dst;
};

int RunConvert(const ConvertArgs& args) {
  constexpr std::string_view kCmd = "convert";
  if (args.to.empty() == args.from.empty()) return Usage(kCmd, "give one of --to and --from");
  const bool to = !args.to.empty();
  auto format = mount::ParseForeignFormat(to ? args.to : args.from);
  if (!format) {
    return Usage(kCmd,
                 "unknown format '" + (to ? args.to : args.from) + "' (use raw, qcow2 or vmdk)");
  }
  const int cancel_fd = mount::UsesHelpers(*format) ? InstallStopSignals() : -1;
  FileSystem& fs = DefaultFileSystem();
  if (to) {
    if (!args.kind.empty() || !args.cluster.empty()) {
      return Usage(kCmd, "-f and -b describe a new ploop disk: they go with --from");
    }
    mount::ConvertToOptions options;
    std::string dd_path;
    options.disk_path = IsDescriptorPath(fs, args.src, &dd_path) ? dd_path : args.src;
    if (!args.guid.empty()) {
      auto guid = ParseGuid(args.guid);
      if (!guid.ok()) return Fail(kCmd, guid.error());
      options.snapshot_guid = *guid;
    }
    options.load = LoadOptions();
    options.format = *format;
    options.out_path = args.dst;
    options.cancel_fd = cancel_fd;
    if (Status s = mount::ConvertToForeign(fs, options); !s.ok()) return Fail(kCmd, s);
    std::cout << "Created " << args.dst << " (" << mount::ForeignFormatName(*format) << ") from "
              << args.src
              << (options.snapshot_guid.empty() ? "" : " snapshot " + options.snapshot_guid)
              << "\n";
    return kExitOk;
  }
  if (!args.guid.empty()) return Usage(kCmd, "-u selects a snapshot to convert: it goes with --to");
  mount::ConvertFromOptions options;
  options.in_path = args.src;
  options.format = *format;
  options.image_path = args.dst;
  options.cancel_fd = cancel_fd;
  if (!args.kind.empty()) {
    auto kind = ParseImageKind(args.kind);
    if (!kind || *kind == ImageKind::kRaw) {
      return Usage(kCmd, "unknown image kind '" + args.kind + "' (use expanded or preallocated)");
    }
    options.create.kind = *kind;
  }
  if (!args.cluster.empty()) {
    int rc = kExitOk;
    auto cb = SizeArg(args.cluster, "cluster size", kCmd, &rc);
    if (!cb) return rc;
    if (!IsValidClusterBytes(*cb)) {
      return Usage(kCmd, "cluster size " + args.cluster + " is not a power of two from 32K to 64M");
    }
    options.create.cluster_bytes = *cb;
  }
  if (Status s = mount::ConvertFromForeign(fs, options); !s.ok()) {
    if (s.code() == StatusCode::kCorruption) {
      // A broken foreign image: Fail() would point at `ploop check`.
      std::cerr << "ploop convert: " << s.message() << "\n";
      return ExitCodeFor(s);
    }
    return Fail(kCmd, s);
  }
  std::cout << "Created " << args.dst << " and "
            << JoinPath(DirName(args.dst), std::string(kDescriptorFileName)) << " from " << args.src
            << " (" << mount::ForeignFormatName(*format) << ")\n";
  return kExitOk;
}

}  // namespace

void RegisterConvertCommands(CLI::App& app, int& rc) {
  auto args = std::make_shared<ConvertArgs>();
  auto* c = app.add_subcommand(
      "convert",
      "convert a disk to raw, qcow2 or vmdk (--to), or make a new disk from one (--from)");
  c->add_option("--to", args->to, "write SRC (a disk) to the new file DST in this format");
  c->add_option("--from", args->from,
                "make the new disk DST (DIR/root.hds) from SRC in this format");
  c->add_option("-u,--uuid", args->guid, "with --to: convert this snapshot");
  c->add_option("-f,--format", args->kind, "with --from: expanded (default) or preallocated");
  c->add_option("-b,--cluster", args->cluster, "with --from: cluster size, 32K..64M (default 1M)");
  c->add_option("SRC", args->src, "--to: DiskDescriptor.xml or image; --from: the foreign image")
      ->required();
  c->add_option("DST", args->dst, "--to: the file to create; --from: DIR/root.hds to create")
      ->required();
  c->callback([args, &rc] { rc = RunConvert(*args); });
}

}  // namespace ploop::cli
