// Online snapshot, resize and merge: the daemon's callbacks (the layer and
// descriptor steps, snapshot/online.h) and the CLI's side (see online.h).
#include "online.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <iostream>

#include "cli_common.h"
#include "commands.h"
#include "fsimage/reader.h"
#include "mount-helper/filesystem_ops.h"
#include "mount-helper/mounts.h"
#include "ploop/disk.h"
#include "ploop/image.h"
#include "ploop/served_disk.h"
#include "snapshot/online.h"
#include "snapshot/snapshot.h"

namespace ploop::cli {

namespace {

using mount::Json;

// Step 1 (before the freeze); the switch (steps 2-4) is returned.
Result<mount::PreparedSwitch> PrepareOnlineSnapshot(const std::string& dd_path,
                                                    const DescriptorLoadOptions& load,
                                                    ServedDisk& disk, const Json& request) {
  FileSystem& fs = DefaultFileSystem();
  ASSIGN_OR_RETURN(
      PreparedSnapshot prepared,
      PrepareSnapshot(fs, dd_path, request.value("guid", ""), disk.size_bytes(), load));
  auto shared = std::make_shared<PreparedSnapshot>(std::move(prepared));
  mount::PreparedSwitch out;
  out.abandon = [shared] { AbandonSnapshot(DefaultFileSystem(), *shared); };
  out.run = [shared, &disk]() -> Result<Json> {
    ASSIGN_OR_RETURN(auto images, SwitchToSnapshot(DefaultFileSystem(), disk, *shared));
    return Json{{"guid", shared->guid}, {"images", images}};
  };
  return out;
}

Result<Json> GrowOnline(const std::string& dd_path, const DescriptorLoadOptions& load,
                        ServedDisk& disk, const Json& request) {
  if (!request.contains("size_bytes") || !request["size_bytes"].is_number_unsigned()) {
    return Status::InvalidArgument("grow needs size_bytes");
  }
  TRY(GrowServedDisk(DefaultFileSystem(), dd_path, disk, request["size_bytes"].get<uint64_t>(),
                     load));
  return Json{{"size_bytes", disk.size_bytes()}};
}

Result<Json> MergeOnline(const std::string& dd_path, const DescriptorLoadOptions& load,
                         ServedDisk& disk, const Json& request) {
  const std::string guid = request.value("guid", "");
  ASSIGN_OR_RETURN(auto images,
                   MergeServedSnapshot(DefaultFileSystem(), dd_path, disk, guid, load));
  return Json{{"guid", guid}, {"images", images}};
}

}  // namespace

mount::OnlineOperations OnlineOperationsFor(const std::string& dd_path,
                                            const DescriptorLoadOptions& load) {
  mount::OnlineOperations ops;
  ops.snapshot = [dd_path, load](ServedDisk& disk, const Json& request) {
    return PrepareOnlineSnapshot(dd_path, load, disk, request);
  };
  ops.grow = [dd_path, load](ServedDisk& disk, const Json& request) {
    return GrowOnline(dd_path, load, disk, request);
  };
  ops.merge = [dd_path, load](ServedDisk& disk, const Json& request) {
    return MergeOnline(dd_path, load, disk, request);
  };
  return ops;
}

std::optional<mount::MountRecord> ActiveMount(const std::string& dd_path) {
  auto found = mount::FindByDescriptor(dd_path);
  if (!found.ok()) return std::nullopt;
  for (const mount::MountRecord& r : *found) {
    if (r.read_only || !r.guid.empty()) continue;
    if (mount::Health(r) != mount::MountHealth::kActive) continue;
    return r;
  }
  return std::nullopt;
}

Result<Json> OnlineCall(const mount::MountRecord& record, const Json& request, int timeout_ms) {
  if (record.kind != "fuse" || record.socket.empty()) {
    return Status::NotSupported(record.device +
                                " is a raw image attached straight to the loop device; "
                                "unmount it for this operation");
  }
  ASSIGN_OR_RETURN_CTX(Json reply, mount::ControlCall(record.socket, request, timeout_ms),
                       "the daemon of " + record.device);
  TRY(mount::ReplyStatus(reply));
  return reply;
}

namespace {

// The size of the ext4 at the start of the (unmounted) disk, nullopt when
// it holds none.
Result<std::optional<uint64_t>> Ext4Size(const std::string& dd_path) {
  OpenOptions o;
  o.lock = true;
  ASSIGN_OR_RETURN(auto chain, OpenDisk(DefaultFileSystem(), dd_path, "", o, LoadOptions()));
  return fsimage::ProbeExt4SizeBytes(*chain);
}

// The same for a disk a daemon serves on `device`: read through the device,
// which shows what its users wrote (the image files may not have it yet,
// and a read of them beside the daemon's writes could see them half done;
// their reader lock is refused while the daemon holds the writer lock).
Result<std::optional<uint64_t>> Ext4SizeOnDevice(const std::string& device) {
  ASSIGN_OR_RETURN(auto disk, mount::OpenDeviceForReading(device));
  return fsimage::ProbeExt4SizeBytes(*disk);
}

// Serves the (unmounted) disk on a device and grows its ext4 there.
Status GrowExt4Offline(const std::string& dd_path) {
  OpenOptions o;
  o.writable = true;
  o.lock = true;
  o.repair_dirty = true;
  ASSIGN_OR_RETURN(auto chain, OpenDisk(DefaultFileSystem(), dd_path, "", o, LoadOptions()));
  mount::MountRequest request;
  ASSIGN_OR_RETURN(request.descriptor, DefaultFileSystem().RealPath(dd_path));
  ASSIGN_OR_RETURN(mount::Mounted mounted, mount::MountChain(std::move(chain), request));
  Status grown = mount::GrowExt4OnDevice(mounted.device);
  Status released = Status::Ok();
  if (auto records = mount::FindByDevice(mounted.device); records.ok()) {
    released = mount::Unmount(records->front());
  }
  TRY(grown);
  return released;
}

std::string Mib(uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

}  // namespace

std::optional<int> MergeIfMounted(const std::string& dd_path, const std::string& guid, bool all) {
  auto mounted = ActiveMount(dd_path);
  if (!mounted) return std::nullopt;
  auto dd = ploop::Descriptor::Load(DefaultFileSystem(), dd_path, LoadOptions());
  if (!dd.ok()) return Fail("snapshot-merge", dd.error());
  std::string child = dd->top_guid();
  if (!guid.empty()) {
    auto parsed = ParseGuid(guid);
    if (!parsed.ok()) return Fail("snapshot-merge", parsed.error());
    child = *parsed;
  }
  if (all || child == dd->top_guid()) {
    return Fail("snapshot-merge",
                Status::FailedPrecondition("merging the top of a mounted disk (" + mounted->device +
                                           ") is not supported; unmount it first, or merge a "
                                           "snapshot below the top with -u GUID"));
  }
  const auto chain = dd->Chain();
  const bool served = std::any_of(chain.begin(), chain.end(),
                                  [&](const DescriptorImage& i) { return i.guid == child; });
  if (!served) return std::nullopt;  // off the running chain: the offline merge
  auto reply = OnlineCall(*mounted, {{"cmd", "merge"}, {"guid", child}});
  if (!reply.ok()) return Fail("snapshot-merge", reply.error());
  return kExitOk;
}

int ResizeDescriptorDisk(const std::string& dd_path, uint64_t size_bytes) {
  FileSystem& fs = DefaultFileSystem();
  if (auto mounted = ActiveMount(dd_path)) {
    auto reply = OnlineCall(*mounted, {{"cmd", "grow"}, {"size_bytes", size_bytes}});
    if (!reply.ok()) return Fail("resize", reply.error());
    const uint64_t disk_bytes = reply->value("size_bytes", uint64_t{0});
    const auto dirs = reply->value("mountpoints", std::vector<std::string>{});
    const std::string grew = "the disk grew to " + Mib(disk_bytes) + " but its file system did not";
    if (!dirs.empty()) {
      // Mounted: the kernel grows ext4 in place (what resize2fs does for a
      // mounted ext4, without needing e2fsprogs here).
      auto fs_bytes = mount::GrowExt4Online(dirs.front(), disk_bytes);
      if (!fs_bytes.ok() && fs_bytes.error().error_number() == EPERM) {
        return Fail("resize", Status::FailedPrecondition(
                                  grew + ": growing a mounted ext4 needs CAP_SYS_RESOURCE, which "
                                         "this process lacks; after `ploop umount`, run this "
                                         "command again to grow it offline"));
      }
      if (!fs_bytes.ok() && fs_bytes.error().code() != StatusCode::kNotSupported) {
        return Fail("resize", fs_bytes.error().WithContext(grew));
      }
      return kExitOk;  // not ext4: growing it is the user's business
    }
    // Only the device: an ext4 on it is not mounted and grows with resize2fs.
    auto ext4 = Ext4SizeOnDevice(mounted->device);
    if (ext4.ok() && ext4->has_value() && **ext4 < disk_bytes) {
      if (Status s = mount::GrowExt4OnDevice(mounted->device); !s.ok()) {
        return Fail("resize", s.WithContext(grew));
      }
    }
    return kExitOk;
  }

  if (Status s = ResizeDisk(fs, dd_path, size_bytes, LoadOptions()); !s.ok()) {
    return Fail("resize", s);
  }
  auto ext4 = Ext4Size(dd_path);
  if (!ext4.ok()) return Fail("resize", ext4.error().WithContext("look for a file system"));
  auto dd = ploop::Descriptor::Load(fs, dd_path, LoadOptions());
  if (!dd.ok()) return Fail("resize", dd.error());
  const uint64_t disk_bytes = dd->disk_size_bytes();
  if (!ext4->has_value() || **ext4 >= disk_bytes) return kExitOk;
  if (::geteuid() != 0) {
    std::cerr << "ploop resize: note: the disk grew to " << Mib(disk_bytes)
              << "; its ext4 file system stays " << Mib(**ext4)
              << " (growing it needs root: run this command again as root)\n";
    return kExitOk;
  }
  if (Status s = GrowExt4Offline(dd_path); !s.ok()) {
    return Fail("resize", s.WithContext("the disk grew to " + Mib(disk_bytes) +
                                        " but its file system did not"));
  }
  return kExitOk;
}

}  // namespace ploop::cli
