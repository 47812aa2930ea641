// Snapshot operations. The order of the steps in each operation is what
// makes it crash-safe; each function says its order, and the rule behind
// all of them is the one at the top of snapshot.h: files appear before the
// descriptor names them and disappear after it stops naming them, and a
// merge is announced in the descriptor before its parent file changes.
#include "snapshot/snapshot.h"

#include <vector>

#include "ploop/delta.h"
#include "ploop/disk.h"
#include "ploop/image.h"

namespace ploop {

namespace {

// The file name for a new delta, as OpenVZ names them:
// "<base file>.{random guid}".
Result<std::string> NewDeltaFile(const Descriptor& dd) {
  ASSIGN_OR_RETURN(std::string file_guid, NewRandomGuid());
  return BaseName(dd.Chain().front().file) + "." + file_guid;
}

// Opens one delta of `dd`. Corruption when a ploop delta's cluster size is
// not the descriptor's (as Chain::Open), so no operation builds on a
// mismatched disk (a new delta would get the descriptor's cluster size).
Result<std::unique_ptr<Image>> OpenDelta(FileSystem& fs, const Descriptor& dd,
                                         const DescriptorImage& image, bool writable) {
  OpenOptions o;
  o.writable = writable;
  o.raw = image.kind == ImageKind::kRaw;
  ASSIGN_OR_RETURN_CTX(auto opened, OpenImage(fs, image.path, o),
                       "delta " + image.guid + " (" + image.file + ")");
  if (opened->kind() != ImageKind::kRaw && opened->cluster_bytes() != dd.cluster_bytes()) {
    return Status::Corruption("delta " + image.guid + " (" + image.file + ") has cluster size " +
                              std::to_string(opened->cluster_bytes()) +
                              " but the descriptor says " + std::to_string(dd.cluster_bytes()));
  }
  return opened;
}

// Opens the chain of `dd` that ends at `guid` read-only and closes it
// again. Create, switch and resize put a new top over that chain (or grow
// it), so they first make sure it opens: no missing delta, one cluster size,
// no layer larger than the one above. Nothing for kNullGuid (no chain).
Status CheckChainOpens(FileSystem& fs, const Descriptor& dd, const std::string& guid) {
  if (guid == kNullGuid) return Status::Ok();
  OpenOptions o;
  ASSIGN_OR_RETURN(auto chain, Chain::Open(fs, dd, guid, o));
  return chain->Close();
}

// Creates an empty delta file of `size_bytes` for `dd`, closed.
Status CreateEmptyDelta(FileSystem& fs, const Descriptor& dd, const std::string& file,
                        uint64_t size_bytes) {
  CreateOptions o;
  o.size_bytes = size_bytes;
  o.cluster_bytes = dd.cluster_bytes();
  o.kind = ImageKind::kExpanded;
  ASSIGN_OR_RETURN(auto delta, Delta::Create(fs, JoinPath(dd.folder(), file), o));
  return delta->Close();
}

Status ChsFor(uint64_t size_bytes, uint64_t cluster_bytes, Header* out) {
  ASSIGN_OR_RETURN(*out, MakeHeader(size_bytes, cluster_bytes));
  return Status::Ok();
}

// Step 1 of a merge (see MergeInto) on deltas the caller opened: the
// child (any mode) and the parent: the room check, then the parent marked
// <Temporary/> (saved).
Status AnnounceMerge(FileSystem& fs, Descriptor& dd, const std::string& child_guid,
                     const std::string& parent_guid, Image& child, Image& parent) {
  auto ctx = "merge " + child_guid + " into " + parent_guid;
  auto* child_delta = dynamic_cast<Delta*>(&child);
  auto* parent_delta = dynamic_cast<Delta*>(&parent);
  if (child_delta == nullptr) return Status::NotSupported(ctx + ": a raw delta has no parent");
  const uint64_t cb = dd.cluster_bytes();
  if (child.cluster_bytes() != cb || (parent_delta && parent.cluster_bytes() != cb)) {
    return Status::Corruption(ctx + ": cluster sizes differ");
  }

  // Room check: every cluster the child holds that the parent lacks is a
  // new cluster in the parent's file.
  if (parent_delta != nullptr) {
    uint64_t new_clusters = 0;
    for (uint64_t i = 0; i < child_delta->bat_entries(); ++i) {
      if (child_delta->ClusterFileOffset(i) == 0) continue;
      if (i >= parent_delta->bat_entries() || parent_delta->ClusterFileOffset(i) == 0) {
        ++new_clusters;
      }
    }
    uint64_t needed = new_clusters * cb + FirstBlockBytes(child_delta->bat_entries(), cb);
    ASSIGN_OR_RETURN(uint64_t free_bytes, fs.FreeSpace(dd.folder().empty() ? "." : dd.folder()));
    if (free_bytes < needed) {
      return Status::NoSpace(ctx + ": needs up to " + std::to_string(needed) + " bytes, only " +
                             std::to_string(free_bytes) + " available");
    }
  }

  if (!dd.FindShot(parent_guid)->temporary) {
    TRY_CTX(dd.SetTemporary(parent_guid, true), ctx);
    TRY_CTX(dd.Save(fs), ctx);
  }
  return Status::Ok();
}

// Step 2's copy (after AnnounceMerge): grows the parent to the child's
// size if smaller, and copies every cluster the child holds into it.
Status CopyIntoParent(Descriptor& dd, const std::string& child_guid, const std::string& parent_guid,
                      Image& child, Image& parent) {
  const std::string grandparent = dd.FindShot(parent_guid)->parent_guid;
  auto ctx = "merge " + child_guid + " into " + parent_guid;
  auto* child_delta = dynamic_cast<Delta*>(&child);
  auto* parent_delta = dynamic_cast<Delta*>(&parent);
  if (child_delta == nullptr) return Status::NotSupported(ctx + ": a raw delta has no parent");
  const uint64_t cb = dd.cluster_bytes();
  if (child.size_bytes() > parent.size_bytes()) TRY_CTX(parent.Grow(child.size_bytes()), ctx);
  std::vector<std::byte> buf(cb);
  const uint64_t size = child.size_bytes();
  for (uint64_t i = 0; i < child_delta->bat_entries(); ++i) {
    if (child_delta->ClusterFileOffset(i) == 0) continue;
    const uint64_t off = i * cb;
    const uint64_t len = std::min(cb, size - off);
    std::fill(buf.begin(), buf.end(), std::byte{0});
    TRY_CTX(child.Read(off, std::span<std::byte>(buf.data(), len)), ctx);
    if (parent_delta != nullptr) {
      // A zero cluster the parent lacks can be skipped only when nothing
      // below the parent could show through it; over a grandparent it may
      // be hiding older data (a discard), so it must be copied.
      if (parent_delta->ClusterFileOffset(i) == 0 && grandparent == kNullGuid && IsZero(buf)) {
        continue;
      }
      TRY_CTX(parent_delta->WriteCluster(i, buf), ctx);
    } else {
      TRY_CTX(parent.Write(off, std::span<const std::byte>(buf.data(), len)), ctx);
    }
  }
  return Status::Ok();
}

// Step 3 of a merge: the child's GUID takes over the parent's file and
// place in the tree; saved.
Status TakeOverParent(FileSystem& fs, Descriptor& dd, const std::string& child_guid,
                      const std::string& parent_guid) {
  const DescriptorImage parent_image = *dd.FindImage(parent_guid);
  const std::string grandparent = dd.FindShot(parent_guid)->parent_guid;
  auto ctx = "merge " + child_guid + " into " + parent_guid;
  // SetFile while the parent still names the file: the name then counts as
  // one the descriptor already holds (it may lie outside the folder when
  // allow_outside_files let it in).
  TRY_CTX(dd.SetFile(child_guid, parent_image.file, parent_image.kind), ctx);
  TRY_CTX(dd.SetParent(child_guid, grandparent), ctx);
  TRY_CTX(dd.RemoveImage(parent_guid), ctx);
  TRY_CTX(dd.Save(fs), ctx);
  return Status::Ok();
}

// Merges delta `child` into its parent `parent` (which has no other
// child) and updates `dd` (saved). Steps:
//   1. mark the parent <Temporary/> and save: from here a crash is
//      finished by FinishInterruptedMerges();
//   2. copy every cluster the child holds into the parent (the child's
//      data wins; the child still shadows every cluster copied so far, so
//      its view never changes), then close the parent (flush, clean);
//   3. the child's GUID takes over the parent's file and place in the tree;
//      save;
//   4. remove the child's old file.
Status MergeInto(FileSystem& fs, Descriptor& dd, const std::string& child_guid,
                 const std::string& parent_guid) {
  const DescriptorImage child_image = *dd.FindImage(child_guid);
  const DescriptorImage parent_image = *dd.FindImage(parent_guid);
  auto ctx = "merge " + child_guid + " into " + parent_guid;

  ASSIGN_OR_RETURN_CTX(auto child, OpenDelta(fs, dd, child_image, false), ctx);
  ASSIGN_OR_RETURN_CTX(auto parent, OpenDelta(fs, dd, parent_image, true), ctx);
  TRY(AnnounceMerge(fs, dd, child_guid, parent_guid, *child, *parent));
  TRY(CopyIntoParent(dd, child_guid, parent_guid, *child, *parent));
  TRY_CTX(parent->Close(), ctx);
  child.reset();
  TRY(TakeOverParent(fs, dd, child_guid, parent_guid));
  fs.Remove(child_image.path).IgnoreError();  // an orphan at worst
  return Status::Ok();
}

}  // namespace

Result<int> FinishInterruptedMerges(FileSystem& fs, const std::string& dd_path,
                                    const DescriptorLoadOptions& load) {
  int finished = 0;
  for (;;) {
    ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
    std::string parent;
    std::string child;
    for (const auto& shot : dd.shots()) {
      auto children = dd.Children(shot.guid);
      if (shot.temporary && children.size() == 1) {
        parent = shot.guid;
        child = children[0];
        break;
      }
    }
    if (parent.empty()) return finished;
    TRY_CTX(MergeInto(fs, dd, child, parent), "finish interrupted merge");
    ++finished;
  }
}

namespace {

// Every operation starts here: whatever a crash interrupted is finished
// first, then the descriptor is read afresh.
Result<Descriptor> LoadRecovered(FileSystem& fs, const std::string& dd_path,
                                 const DescriptorLoadOptions& load) {
  TRY(FinishInterruptedMerges(fs, dd_path, load).status());
  return Descriptor::Load(fs, dd_path, load);
}

}  // namespace

namespace {

// The GUID a new snapshot of `dd` gets: `guid` checked (normalised), or a
// random one.
Result<std::string> NewSnapshotGuid(const Descriptor& dd, std::string_view guid) {
  std::string snap;
  if (guid.empty()) {
    ASSIGN_OR_RETURN(snap, NewRandomGuid());
  } else {
    ASSIGN_OR_RETURN(snap, ParseGuid(guid));
  }
  if (snap == kTopGuid || snap == kNullGuid) {
    return Status::InvalidArgument(snap + " is reserved and cannot name a snapshot");
  }
  if (dd.FindImage(snap) != nullptr) return Status::AlreadyExists("snapshot " + snap + " exists");
  return snap;
}

}  // namespace

Result<PreparedSnapshot> PrepareSnapshot(FileSystem& fs, const std::string& dd_path,
                                         std::string_view guid, uint64_t top_size_bytes,
                                         const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  ASSIGN_OR_RETURN(std::string snap, NewSnapshotGuid(dd, guid));
  const uint64_t size = std::max(top_size_bytes, dd.disk_size_bytes());
  ASSIGN_OR_RETURN(std::string file, NewDeltaFile(dd));
  TRY(CreateEmptyDelta(fs, dd, file, size));
  std::string old_top_path = dd.top().path;
  std::string new_top_path = JoinPath(dd.folder(), file);
  return PreparedSnapshot{std::move(dd), std::move(snap), std::move(old_top_path),
                          std::move(new_top_path), load};
}

Status CommitSnapshot(FileSystem& fs, PreparedSnapshot& prepared) {
  Descriptor& dd = prepared.dd;
  const std::string old_top = dd.top_guid();
  TRY(dd.RenameGuid(old_top, prepared.guid));
  TRY(dd.AddImage(kTopGuid, ImageKind::kExpanded, BaseName(prepared.new_top_path), prepared.guid));
  TRY(dd.SetTop(kTopGuid));
  return dd.Save(fs);
}

void AbandonSnapshot(FileSystem& fs, const PreparedSnapshot& prepared) {
  fs.Remove(prepared.new_top_path).IgnoreError();
}

Result<std::string> CreateSnapshot(FileSystem& fs, const std::string& dd_path,
                                   std::string_view guid, const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  ASSIGN_OR_RETURN(std::string snap, NewSnapshotGuid(dd, guid));
  TRY(CheckChainOpens(fs, dd, dd.FindShot(dd.top_guid())->parent_guid));
  // Holding the top open for writing keeps everyone else out meanwhile.
  ASSIGN_OR_RETURN(auto top, OpenDelta(fs, dd, dd.top(), true));
  ASSIGN_OR_RETURN(PreparedSnapshot prepared,
                   PrepareSnapshot(fs, dd_path, snap, top->size_bytes(), load));
  if (Status s = CommitSnapshot(fs, prepared); !s.ok()) {
    AbandonSnapshot(fs, prepared);
    return s;
  }
  return prepared.guid;
}

Status SwitchSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                      const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  ASSIGN_OR_RETURN(std::string target, ParseGuid(guid));
  const DescriptorImage* image = dd.FindImage(target);
  if (image == nullptr) return Status::NotFound("no snapshot " + target);
  if (target == dd.top_guid()) {
    return Status::InvalidArgument(target + " is the current top, not a snapshot");
  }
  if (dd.FindShot(target)->temporary) {
    return Status::FailedPrecondition("snapshot " + target + " is temporary");
  }
  TRY(CheckChainOpens(fs, dd, target));
  ASSIGN_OR_RETURN(auto top, OpenDelta(fs, dd, dd.top(), true));
  ASSIGN_OR_RETURN(auto snapshot, OpenDelta(fs, dd, *image, false));
  const uint64_t size = snapshot->size_bytes();
  snapshot.reset();
  const DescriptorImage old_top = dd.top();
  if (!dd.Children(old_top.guid).empty()) {
    return Status::FailedPrecondition("the top delta has children; the descriptor is odd");
  }
  ASSIGN_OR_RETURN(std::string file, NewDeltaFile(dd));
  TRY(CreateEmptyDelta(fs, dd, file, size));
  Status s = [&]() -> Status {
    ASSIGN_OR_RETURN(std::string parked, NewRandomGuid());
    TRY(dd.RenameGuid(old_top.guid, parked));
    TRY(dd.AddImage(kTopGuid, ImageKind::kExpanded, file, target));
    TRY(dd.SetTop(kTopGuid));
    TRY(dd.RemoveImage(parked));
    Header chs;
    TRY(ChsFor(size, dd.cluster_bytes(), &chs));
    TRY(dd.SetDiskSize(size, chs.cylinders, chs.heads));
    return dd.Save(fs);
  }();
  if (!s.ok()) {
    fs.Remove(JoinPath(dd.folder(), file)).IgnoreError();
    return s;
  }
  top.reset();
  fs.Remove(old_top.path).IgnoreError();  // an orphan at worst
  return Status::Ok();
}

namespace {

// The parent that delta `child` (named in `dd`) merges into.
// FailedPrecondition for a base, or a parent with other children.
Result<std::string> MergeTarget(const Descriptor& dd, const std::string& child) {
  std::string parent = dd.FindShot(child)->parent_guid;
  if (parent == kNullGuid) {
    return Status::FailedPrecondition(child + " is the base; there is nothing to merge it into");
  }
  if (dd.Children(parent).size() != 1) {
    return Status::FailedPrecondition("cannot merge " + child + " into " + parent +
                                      ": the parent has other children that need it");
  }
  return parent;
}

}  // namespace

Status MergeSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                     const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  std::string child = dd.top_guid();
  if (!guid.empty()) {
    ASSIGN_OR_RETURN(child, ParseGuid(guid));
  }
  if (dd.FindImage(child) == nullptr) return Status::NotFound("no snapshot " + child);
  ASSIGN_OR_RETURN(const std::string parent, MergeTarget(dd, child));
  return MergeInto(fs, dd, child, parent);
}

Result<OnlineMerge> CheckOnlineMerge(FileSystem& fs, const std::string& dd_path,
                                     std::string_view guid, const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  if (guid.empty()) return Status::InvalidArgument("an online merge needs a snapshot's GUID");
  ASSIGN_OR_RETURN(std::string child, ParseGuid(guid));
  const DescriptorImage* child_image = dd.FindImage(child);
  if (child_image == nullptr) return Status::NotFound("no snapshot " + child);
  ASSIGN_OR_RETURN(const std::string parent, MergeTarget(dd, child));
  OnlineMerge out{std::move(dd), child, parent, child_image->path, ""};
  out.parent_path = out.dd.FindImage(parent)->path;
  return out;
}

Status AnnounceOnlineMerge(FileSystem& fs, OnlineMerge& merge, Image& child, Image& parent) {
  return AnnounceMerge(fs, merge.dd, merge.child_guid, merge.parent_guid, child, parent);
}

Status CopyOnlineMerge(OnlineMerge& merge, Image& child, Image& parent) {
  return CopyIntoParent(merge.dd, merge.child_guid, merge.parent_guid, child, parent);
}

Status CommitOnlineMerge(FileSystem& fs, OnlineMerge& merge) {
  return TakeOverParent(fs, merge.dd, merge.child_guid, merge.parent_guid);
}

Status MergeAll(FileSystem& fs, const std::string& dd_path, const DescriptorLoadOptions& load) {
  TRY(FinishInterruptedMerges(fs, dd_path, load).status());
  {
    // Refuse before the first merge, not halfway through: every delta below
    // the top needs exactly one child, and the whole chain must open.
    ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
    auto chain = dd.Chain();
    if (chain.size() == 1) return Status::Ok();
    for (size_t i = 0; i + 1 < chain.size(); ++i) {
      if (dd.Children(chain[i].guid).size() != 1) {
        return Status::FailedPrecondition("cannot merge into " + chain[i].guid +
                                          ": it has other children that need it");
      }
    }
    TRY(CheckChainOpens(fs, dd, dd.top_guid()));
  }
  for (;;) {
    ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
    auto chain = dd.Chain();
    if (chain.size() == 1) return Status::Ok();
    // Bottom up: each delta's data is copied once, into the base's file.
    if (dd.Children(chain[0].guid).size() != 1) {
      return Status::FailedPrecondition("cannot merge into " + chain[0].guid +
                                        ": it has other children that need it");
    }
    TRY(MergeInto(fs, dd, chain[1].guid, chain[0].guid));
  }
}

Status DeleteSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                      const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  ASSIGN_OR_RETURN(std::string target, ParseGuid(guid));
  const DescriptorImage* image = dd.FindImage(target);
  if (image == nullptr) return Status::NotFound("no snapshot " + target);
  if (target == dd.top_guid()) {
    return Status::FailedPrecondition(
        "cannot delete the top delta; use snapshot-switch to roll back or snapshot-merge to "
        "fold it into its parent");
  }
  auto children = dd.Children(target);
  if (children.size() > 1) {
    return Status::FailedPrecondition("snapshot " + target + " has " +
                                      std::to_string(children.size()) +
                                      " children; delete or merge them first");
  }
  if (children.size() == 1) return MergeInto(fs, dd, children[0], target);
  // A leaf off the active chain: nobody reads it. Taking its write lock
  // proves nobody has it open (a read-only snapshot mount, say).
  const DescriptorImage victim = *image;
  { ASSIGN_OR_RETURN(auto locked, OpenDelta(fs, dd, victim, true)); }
  TRY(dd.RemoveImage(target));
  TRY(dd.Save(fs));
  fs.Remove(victim.path).IgnoreError();  // an orphan at worst
  return Status::Ok();
}

Status ResizeDisk(FileSystem& fs, const std::string& dd_path, uint64_t new_size_bytes,
                  const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  TRY(CheckChainOpens(fs, dd, dd.FindShot(dd.top_guid())->parent_guid));
  ASSIGN_OR_RETURN(auto top, OpenDelta(fs, dd, dd.top(), true));
  TRY(top->Grow(new_size_bytes));
  const uint64_t size = top->size_bytes();
  TRY(top->Close());
  return RecordDiskSize(fs, dd_path, size, load);
}

Status RecordDiskSize(FileSystem& fs, const std::string& dd_path, uint64_t size_bytes,
                      const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  Header chs;
  TRY(ChsFor(size_bytes, dd.cluster_bytes(), &chs));
  TRY(dd.SetDiskSize(size_bytes, chs.cylinders, chs.heads));
  return dd.Save(fs);
}

Result<CompactResult> CompactDisk(FileSystem& fs, const std::string& dd_path,
                                  const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, LoadRecovered(fs, dd_path, load));
  CompactResult result;
  // Every delta of the descriptor, snapshots included: moving clusters
  // inside a file does not change what it holds, so a snapshot stays the
  // same disk. Each is opened writable, which takes its write lock: a delta
  // in use (mounted, served, read by a snapshot mount) is Busy.
  for (const DescriptorImage& image : dd.images()) {
    if (image.kind == ImageKind::kRaw) continue;
    ASSIGN_OR_RETURN(auto opened, OpenDelta(fs, dd, image, /*writable=*/true));
    auto* delta = dynamic_cast<Delta*>(opened.get());
    if (delta == nullptr || delta->kind() != ImageKind::kExpanded) {
      TRY(opened->Close());
      continue;
    }
    const DescriptorShot* shot = dd.FindShot(image.guid);
    const bool is_base = shot == nullptr || shot->parent_guid == kNullGuid;
    const std::string ctx = "delta " + image.guid + " (" + image.file + ")";
    ASSIGN_OR_RETURN_CTX(Delta::CompactReport r, delta->Compact(is_base), ctx);
    TRY_CTX(delta->Close(), ctx);
    result.deltas.push_back({image.guid, image.file, r.moved_clusters, r.dropped_zero_clusters,
                             r.file_bytes_before, r.file_bytes_after});
  }
  return result;
}

}  // namespace ploop
