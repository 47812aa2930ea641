// ploop mount / umount / list.
#include "mount_commands.h"

#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_common.h"
#include "commands.h"
#include "mount-helper/mounts.h"
#include "online.h"
#include "ploop/disk.h"
#include "snapshot/snapshot.h"
#include "units.h"

namespace ploop::cli {

namespace {

using nlohmann::json;

struct MountArgs {
  std::string dd;
  std::string guid;
  bool read_only = false;
  std::string mountpoint;
  std::string options;
  std::string fs_type = "ext4";
  unsigned threads = 32;
  bool fuse_uring = true;
};

struct UmountArgs {
  std::string target;
  std::string mountpoint;
};

struct ListArgs {
  bool json = false;
};

Status NeedRoot() {
  if (::geteuid() != 0) {
    return Status::FailedPrecondition("needs root (loop devices, FUSE and mount)");
  }
  return Status::Ok();
}

int RunMount(const MountArgs& args) {
  if (Status s = NeedRoot(); !s.ok()) return Fail("mount", s);
  FileSystem& fs = DefaultFileSystem();
  std::string dd_path;
  if (!IsDescriptorPath(fs, args.dd, &dd_path)) {
    return Usage("mount", args.dd + " is not a DiskDescriptor.xml (nor a folder holding one)");
  }
  auto real = fs.RealPath(dd_path);
  if (!real.ok()) return Fail("mount", real.error());
  dd_path = *real;
  if (!args.mountpoint.empty()) {
    auto dir = fs.RealPath(args.mountpoint);
    if (!dir.ok()) return Fail("mount", dir.error());
  }
  auto dd = Descriptor::Load(fs, dd_path, LoadOptions());
  if (!dd.ok()) return Fail("mount", dd.error());
  std::string guid;
  if (!args.guid.empty()) {
    auto parsed = ParseGuid(args.guid);
    if (!parsed.ok()) return Fail("mount", parsed.error());
    if (dd->FindImage(*parsed) == nullptr) {
      return Fail("mount", Status::NotFound("no snapshot " + *parsed + " in " + dd_path));
    }
    if (*parsed != dd->top_guid()) guid = *parsed;
  }
  // A snapshot is read-only: it is mounted beside the running top, for a
  // consistent read (backup), with read locks on its layers only.
  const bool read_only = args.read_only || !guid.empty();

  // What a killed daemon of this disk left behind goes first.
  mount::CleanUpDeadMounts(dd_path);
  if (!read_only) {
    auto finished = FinishInterruptedMerges(fs, dd_path, LoadOptions());
    if (!finished.ok()) return Fail("mount", finished.error());
  }
  OpenOptions open;
  open.writable = !read_only;
  open.lock = true;
  open.repair_dirty = true;  // a daemon killed with SIGKILL left the image dirty
  auto chain = OpenDisk(fs, dd_path, guid, open, LoadOptions());
  if (!chain.ok()) return Fail("mount", chain.error());

  mount::MountRequest request;
  request.descriptor = dd_path;
  request.guid = guid;
  request.read_only = read_only;
  if (!args.mountpoint.empty()) request.mountpoint = *fs.RealPath(args.mountpoint);
  request.fs_type = args.fs_type;
  request.fs_options = args.options;
  request.threads = args.threads;
  request.fuse_uring = args.fuse_uring;
  if (!read_only) request.online = OnlineOperationsFor(dd_path, LoadOptions());
  auto mounted = mount::MountChain(std::move(chain).value(), request);
  if (!mounted.ok()) return Fail("mount", mounted.error());
  std::cout << mounted->device << "\n";
  return kExitOk;
}

// Whether `umount`'s target is a device: a block device, or a /dev/ path
// that no longer exists (a record may outlive its device). A disk folder
// or descriptor under /dev (on /dev/shm, say) is a descriptor.
bool NamesDevice(const std::string& target) {
  struct stat st;
  if (::stat(target.c_str(), &st) == 0) return S_ISBLK(st.st_mode);
  return target.rfind("/dev/", 0) == 0;
}

int RunUmount(const UmountArgs& args) {
  if (Status s = NeedRoot(); !s.ok()) return Fail("umount", s);
  if (args.target.empty() == args.mountpoint.empty()) {
    return Usage("umount", "give one of -m DIR, a DiskDescriptor.xml or a /dev/loopN");
  }
  Result<std::vector<mount::MountRecord>> found = Status::NotFound("");
  if (!args.mountpoint.empty()) {
    found = mount::FindByMountpoint(args.mountpoint);
  } else if (NamesDevice(args.target)) {
    found = mount::FindByDevice(args.target);
  } else {
    std::string dd_path;
    if (!IsDescriptorPath(DefaultFileSystem(), args.target, &dd_path)) {
      return Usage("umount", args.target +
                                 " is neither a /dev/loopN nor a DiskDescriptor.xml (for a "
                                 "mountpoint use -m DIR)");
    }
    found = mount::FindByDescriptor(dd_path);
  }
  if (!found.ok()) return Fail("umount", found.error());
  for (const auto& record : *found) {
    if (Status s = mount::Unmount(record); !s.ok()) return Fail("umount", s);
  }
  return kExitOk;
}

int RunList(const ListArgs& args) {
  auto mounts = mount::ListMounts();
  if (args.json) {
    json out = json::array();
    for (const auto& m : mounts) {
      const auto& r = m.record;
      out.push_back({{"device", r.device},
                     {"state", mount::HealthName(m.health)},
                     {"descriptor", r.descriptor},
                     {"guid", r.guid},
                     {"top", r.top()},
                     {"images", r.images},
                     {"read_only", r.read_only},
                     {"kind", r.kind},
                     {"pid", r.pid},
                     {"socket", r.socket},
                     {"mountpoints", m.mountpoints},
                     {"direct_io", m.direct_io},
                     {"rss_bytes", m.rss_bytes},
                     {"cpu_seconds", m.cpu_seconds}});
    }
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  if (mounts.empty()) return kExitOk;
  // Columns as wide as their longest value, two spaces apart.
  std::vector<std::array<std::string, 6>> rows;
  rows.push_back({"DEVICE", "STATE", "PID", "RW", "MOUNTPOINT", "TOP"});
  for (const auto& m : mounts) {
    const auto& r = m.record;
    rows.push_back({r.device, mount::HealthName(m.health),
                    r.kind == "fuse" ? std::to_string(r.pid) : "-", r.read_only ? "ro" : "rw",
                    m.mountpoints.empty() ? "-" : m.mountpoints.front(),
                    r.top() + (r.guid.empty() ? "" : " (snapshot " + r.guid + ")")});
  }
  std::array<size_t, 6> width{};
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  for (const auto& row : rows) {
    for (size_t c = 0; c + 1 < row.size(); ++c) {
      std::cout << std::left << std::setw(static_cast<int>(width[c] + 2)) << row[c];
    }
    std::cout << row.back() << "\n";
  }
  return kExitOk;
}

}  // namespace

void RegisterMountCommands(CLI::App& app, int& rc) {
  // "in use by another program" becomes "in use by /dev/loop3 (mounted at
  // ...)" when one of our mounts holds the image.
  SetBusyExplainer([](const std::string& message) { return mount::DescribeUser(message); });

  static MountArgs mount_args;
  auto* c_mount = app.add_subcommand(
      "mount",
      "show the disk as a block device (prints /dev/loopN); with -m mount its file system");
  c_mount->add_flag("-r,--read-only", mount_args.read_only, "read-only");
  c_mount->add_option("-u,--uuid", mount_args.guid,
                      "mount this snapshot (read-only, beside the running top)");
  c_mount->add_option("-m,--mountpoint", mount_args.mountpoint, "mount the file system here");
  c_mount->add_option("-o,--options", mount_args.options, "file system mount options (with -m)");
  c_mount->add_option("-t,--type", mount_args.fs_type, "file system type (default ext4)");
  c_mount->add_option("--threads", mount_args.threads, "daemon worker threads (default 32)")
      ->check(CLI::Range(1, 256));
  c_mount->add_flag("--fuse-uring,!--no-fuse-uring", mount_args.fuse_uring,
                    "serve through FUSE over io_uring where the kernel has it (the default; "
                    "enables it in the fuse module), else the classic /dev/fuse workers; "
                    "--no-fuse-uring: always /dev/fuse");
  c_mount->add_option("DD", mount_args.dd, "DiskDescriptor.xml (or its folder)")->required();
  c_mount->callback([&rc] { rc = RunMount(mount_args); });

  static UmountArgs umount_args;
  auto* c_umount = app.add_subcommand(
      "umount", "unmount, detach the device and stop its daemon (-m DIR, DD.xml or /dev/loopN)");
  c_umount->add_option("-m,--mountpoint", umount_args.mountpoint, "the file system's mountpoint");
  c_umount->add_option("TARGET", umount_args.target, "DiskDescriptor.xml or /dev/loopN");
  c_umount->callback([&rc] { rc = RunUmount(umount_args); });

  static ListArgs list_args;
  auto* c_list = app.add_subcommand("list", "show mounted disks");
  c_list->add_flag("--json", list_args.json, "print JSON");
  c_list->callback([&rc] { rc = RunList(list_args); });
}

}  // namespace ploop::cli
