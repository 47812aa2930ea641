// Online snapshot, resize and merge: the layer and descriptor steps the
// mount daemon runs for its control socket (see online.h).
//
// Crash ordering of the online snapshot (the daemon holds the file system
// frozen around all of it):
//   1. the new empty top file is created, synced, folder synced -- not yet
//      named by the descriptor (a crash: an orphan file, nothing else);
//   2. quiesced (ServedDisk::ReplaceLayers: no request in flight, the top
//      flushed): the old top is closed, which marks it clean;
//   3. the descriptor is saved atomically naming the new file as the top and
//      the old top as the snapshot -- before any write can reach the new
//      top;
//   4. the old top is reopened read-only (reader lock), the new top opened
//      for writing; requests resume on the new chain.
// A crash after 3 leaves the disk with the snapshot taken and an empty top;
// before it, the disk as it was.
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
#include "snapshot/snapshot.h"

namespace ploop::cli {

namespace {

using mount::Json;

std::vector<std::string> LayerPaths(const std::vector<std::unique_ptr<Image>>& layers) {
  std::vector<std::string> out;
  for (const auto& layer : layers) out.push_back(layer->path());
  return out;
}

OpenOptions LayerOpen(const Image& like, bool writable) {
  OpenOptions o;
  o.writable = writable;
  o.raw = like.kind() == ImageKind::kRaw;
  o.lock = true;
  o.repair_dirty = false;  // the layers were just closed cleanly
  return o;
}

bool SameFile(FileSystem& fs, const std::string& a, const std::string& b) {
  auto ra = fs.RealPath(a);
  auto rb = fs.RealPath(b);
  return ra.ok() && rb.ok() ? *ra == *rb : a == b;
}

// Step 1 (before the freeze); the switch (steps 2-4) is returned.
Result<mount::PreparedSwitch> PrepareOnlineSnapshot(const std::string& dd_path,
                                                    const DescriptorLoadOptions& load,
                                                    ServedDisk& disk, const Json& request) {
  FileSystem& fs = DefaultFileSystem();
  const std::string guid = request.value("guid", "");
  ASSIGN_OR_RETURN(PreparedSnapshot prepared,
                   PrepareSnapshot(fs, dd_path, guid, disk.size_bytes(), load));
  auto shared = std::make_shared<PreparedSnapshot>(std::move(prepared));
  mount::PreparedSwitch out;
  out.abandon = [shared] { AbandonSnapshot(DefaultFileSystem(), *shared); };
  out.run = [shared, &disk]() -> Result<Json> {
    FileSystem& fs = DefaultFileSystem();
    PreparedSnapshot& prepared = *shared;
    bool committed = false;
    std::vector<std::string> images;
    Status s = disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
      if (layers.empty() || !SameFile(fs, layers.back()->path(), prepared.old_top_path)) {
        return Status::FailedPrecondition("the descriptor's top " + prepared.old_top_path +
                                          " is not the delta being served");
      }
      const OpenOptions read_only = LayerOpen(*layers.back(), false);
      const OpenOptions writable = LayerOpen(*layers.back(), true);
      TRY_CTX(layers.back()->Close(), "close the old top");
      layers.pop_back();
      Status saved = CommitSnapshot(fs, prepared);
      if (!saved.ok()) {
        // The descriptor still names the old top: serve it again as it was.
        auto again = OpenImage(fs, prepared.old_top_path, writable);
        if (!again.ok()) {
          return std::move(again).error().WithContext("after " + saved.ToString() +
                                                      ": reopen the old top");
        }
        layers.push_back(std::move(*again));
        return saved;
      }
      committed = true;
      // From here the descriptor names the new top; the old one is a
      // snapshot, served read-only. If the new top cannot be opened the
      // disk stays read-only (writes fail) until it is mounted again.
      ASSIGN_OR_RETURN_CTX(auto old_top, OpenImage(fs, prepared.old_top_path, read_only),
                           "reopen the snapshot read-only");
      layers.push_back(std::move(old_top));
      ASSIGN_OR_RETURN_CTX(auto new_top, OpenImage(fs, prepared.new_top_path, writable),
                           "open the new top");
      layers.push_back(std::move(new_top));
      images = LayerPaths(layers);
      return Status::Ok();
    });
    if (!committed) AbandonSnapshot(fs, prepared);
    TRY_CTX(s, "switch the served layers");
    return Json{{"guid", prepared.guid}, {"images", images}};
  };
  return out;
}

Result<Json> GrowOnline(const std::string& dd_path, const DescriptorLoadOptions& load,
                        ServedDisk& disk, const Json& request) {
  if (!request.contains("size_bytes") || !request["size_bytes"].is_number_unsigned()) {
    return Status::InvalidArgument("grow needs size_bytes");
  }
  const uint64_t size = request["size_bytes"].get<uint64_t>();
  if (size < disk.size_bytes()) {
    return Status::InvalidArgument("the disk is " + std::to_string(disk.size_bytes()) +
                                   " bytes; shrinking is not supported");
  }
  // Crash ordering as offline: the top grows first, then the descriptor
  // says so (a larger top than the descriptor's size is still a valid disk).
  TRY(disk.Grow(size));
  TRY_CTX(RecordDiskSize(DefaultFileSystem(), dd_path, disk.size_bytes(), load),
          "record the new size in the descriptor");
  return Json{{"size_bytes", disk.size_bytes()}};
}

// The index of the layer whose file is `path`, or -1.
int LayerIndex(FileSystem& fs, const std::vector<std::unique_ptr<Image>>& layers,
               const std::string& path) {
  for (size_t i = 0; i < layers.size(); ++i) {
    if (SameFile(fs, layers[i]->path(), path)) return static_cast<int>(i);
  }
  return -1;
}

// Online merge of a snapshot below the top into its parent (both served
// read-only), in three steps:
//   A. quiesced: the parent's served open is swapped for an unlocked
//      read-only one, and a writable open (its write lock: Busy while any
//      other program reads the parent) is kept for the copy; the parent
//      grows to the child's size here if needed (Delta::Grow may move
//      clusters, which no reader may see half-done);
//   B. not quiesced: CopyOnlineMerge (parent <Temporary/>, then the copy).
//      Requests keep running: every cluster copied is one the child holds,
//      so no request reads it from the parent;
//   C. quiesced: the parent is closed (flushed, clean), the descriptor
//      committed, the parent reopened read-only with its lock (a fresh BAT
//      that has the copied clusters) and the child's layer dropped; its
//      file is then removed. If anything failed, the chain is served as
//      before (the child still shadows the parent), and a merge marked in
//      the descriptor is finished by the next mount or offline command.
Result<Json> MergeOnline(const std::string& dd_path, const DescriptorLoadOptions& load,
                         ServedDisk& disk, const Json& request) {
  FileSystem& fs = DefaultFileSystem();
  ASSIGN_OR_RETURN(OnlineMerge merge,
                   CheckOnlineMerge(fs, dd_path, request.value("guid", ""), load));
  if (merge.child_guid == merge.dd.top_guid()) {
    return Status::FailedPrecondition(
        "merging the top of a mounted disk is not supported; unmount it first");
  }
  OpenOptions locked_ro;
  OpenOptions unlocked_ro;
  std::unique_ptr<Image> parent_rw;
  auto not_served = [&] {
    return Status::FailedPrecondition("snapshot " + merge.child_guid + " or its parent " +
                                      merge.parent_guid + " is not in the served chain");
  };
  TRY_CTX(disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    const int pi = LayerIndex(fs, layers, merge.parent_path);
    const int ci = LayerIndex(fs, layers, merge.child_path);
    if (pi < 0 || ci != pi + 1) return not_served();
    locked_ro = LayerOpen(*layers[pi], false);
    unlocked_ro = locked_ro;
    unlocked_ro.lock = false;
    const OpenOptions rw = LayerOpen(*layers[pi], true);
    TRY(layers[pi]->Close());
    auto restore = [&](Status why) -> Status {
      if (parent_rw) parent_rw->Close().IgnoreError();
      parent_rw.reset();
      auto again = OpenImage(fs, merge.parent_path, locked_ro);
      if (!again.ok()) return std::move(again).error().WithContext("after " + why.ToString());
      layers[pi] = std::move(*again);
      return why;
    };
    auto opened = OpenImage(fs, merge.parent_path, rw);
    if (!opened.ok()) return restore(std::move(opened).error());
    parent_rw = std::move(*opened);
    if (parent_rw->size_bytes() < layers[ci]->size_bytes()) {
      if (Status s = parent_rw->Grow(layers[ci]->size_bytes()); !s.ok()) return restore(s);
      if (Status s = parent_rw->Flush(); !s.ok()) return restore(s);
    }
    auto served = OpenImage(fs, merge.parent_path, unlocked_ro);
    if (!served.ok()) return restore(std::move(served).error());
    layers[pi] = std::move(*served);
    return Status::Ok();
  }), "merge " + merge.child_guid);

  Status copied = [&]() -> Status {
    ASSIGN_OR_RETURN(auto child, OpenImage(fs, merge.child_path, unlocked_ro));
    TRY(CopyOnlineMerge(fs, merge, *child, *parent_rw));
    return parent_rw->Flush();
  }();

  bool committed = false;
  std::vector<std::string> images;
  Status switched = disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    const int pi = LayerIndex(fs, layers, merge.parent_path);
    const int ci = LayerIndex(fs, layers, merge.child_path);
    if (pi < 0 || ci != pi + 1) return not_served();
    Status closed = parent_rw->Close();
    parent_rw.reset();
    Status saved = !copied.ok() ? copied : !closed.ok() ? closed : CommitOnlineMerge(fs, merge);
    auto fresh = OpenImage(fs, merge.parent_path, locked_ro);
    if (!fresh.ok()) {
      // The stale open stays, and so does the child over it (the copied
      // clusters are all the child's): the disk reads the same.
      return std::move(fresh).error().WithContext("reopen " + merge.parent_path);
    }
    layers[pi] = std::move(*fresh);
    if (saved.ok()) {
      committed = true;
      layers[ci]->Close().IgnoreError();  // read-only: nothing to write
      layers.erase(layers.begin() + ci);
    }
    images = LayerPaths(layers);
    return saved;
  });
  if (committed) fs.Remove(merge.child_path).IgnoreError();  // an orphan at worst
  TRY_CTX(switched, "merge " + merge.child_guid + " into " + merge.parent_guid);
  return Json{{"guid", merge.child_guid}, {"images", images}};
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

// The size of the ext4 at the start of the disk (nullopt: none), read
// without taking locks (a daemon may serve the disk).
Result<std::optional<uint64_t>> Ext4Size(const std::string& dd_path, bool lock) {
  OpenOptions o;
  o.lock = lock;
  ASSIGN_OR_RETURN(auto chain, OpenDisk(DefaultFileSystem(), dd_path, "", o, LoadOptions()));
  return fsimage::ProbeExt4SizeBytes(*chain);
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
                Status::FailedPrecondition("merging the top of a mounted disk (" +
                                           mounted->device +
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
    auto ext4 = Ext4Size(dd_path, /*lock=*/false);
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
  auto ext4 = Ext4Size(dd_path, /*lock=*/true);
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
