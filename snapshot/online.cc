// Online snapshot, resize and merge of a served disk (see online.h).
//
// Crash ordering of the online snapshot (the mount daemon holds the file
// system frozen around steps 2-4):
//   1. the new empty top file is created, synced, folder synced -- not yet
//      named by the descriptor (a crash: an orphan file, nothing else);
//   2. quiesced (ServedDisk::ReplaceLayers: no request in flight, the top
//      flushed): the old top is closed, which marks it clean (a second
//      open holds a reader's lock bytes on it from before the close until
//      step 4, so no other program can open it for writing in between);
//   3. the descriptor is saved atomically naming the new file as the top and
//      the old top as the snapshot -- before any write can reach the new
//      top;
//   4. the old top is reopened read-only (reader lock), the new top opened
//      for writing; requests resume on the new chain.
// A crash after 3 leaves the disk with the snapshot taken and an empty top;
// before it, the disk as it was.
#include "snapshot/online.h"

#include "ploop/image.h"
#include "ploop/lock.h"

namespace ploop {

namespace {

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

// A second open of `path` holding a reader's lock bytes, taken without
// probing: taken while this process still holds the file's writer lock
// (which a probe would find), it keeps other programs from opening the file
// for writing -- a writer probes the bytes a reader holds -- once that lock
// is gone with the writable open, until this open is closed. Readers may
// still open it. So a layer that turns from written to read-only is never
// unlocked in between.
Result<std::unique_ptr<BlockFile>> HoldAgainstWriters(FileSystem& fs, const std::string& path) {
  ASSIGN_OR_RETURN(auto file, fs.Open(path, OpenMode::kReadOnly));
  LockRequest hold = ReaderLockRequest();
  hold.probe_bytes.clear();
  TRY_CTX(file->Lock(hold), "lock " + path);
  return file;
}

// The index of the layer whose file is `path`, or -1.
int LayerIndex(FileSystem& fs, const std::vector<std::unique_ptr<Image>>& layers,
               const std::string& path) {
  for (size_t i = 0; i < layers.size(); ++i) {
    if (SameFile(fs, layers[i]->path(), path)) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace

Result<std::vector<std::string>> SwitchToSnapshot(FileSystem& fs, ServedDisk& disk,
                                                  PreparedSnapshot& prepared) {
  bool committed = false;
  std::vector<std::string> images;
  Status s = disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    if (layers.empty() || !SameFile(fs, layers.back()->path(), prepared.old_top_path)) {
      return Status::FailedPrecondition("the descriptor's top " + prepared.old_top_path +
                                        " is not the delta being served");
    }
    const OpenOptions read_only = LayerOpen(*layers.back(), false);
    const OpenOptions writable = LayerOpen(*layers.back(), true);
    // From the close of the writable open until the read-only one, nobody
    // else may write to the old top (it becomes a snapshot under us).
    ASSIGN_OR_RETURN(auto keeper, HoldAgainstWriters(fs, prepared.old_top_path));
    // A layer that cannot be served again leaves no layers at all: the
    // disk is then closed (ReplaceLayers), never served as a shorter chain
    // that would show older data.
    Status closed = layers.back()->Close();
    layers.pop_back();
    if (!closed.ok()) {
      keeper.reset();  // the writable reopen probes what it holds
      OpenOptions repair = writable;
      repair.repair_dirty = true;
      auto again = OpenImage(fs, prepared.old_top_path, repair);
      if (!again.ok()) {
        layers.clear();
        return closed.WithContext("close the old top");
      }
      layers.push_back(std::move(*again));
      return closed.WithContext("close the old top");
    }
    Status saved = CommitSnapshot(fs, prepared);
    if (!saved.ok()) {
      // A save whose rename landed but whose folder sync failed may have
      // committed after all: what the descriptor now says decides.
      auto now = Descriptor::Load(fs, prepared.dd.path(), prepared.load);
      if (now.ok() && SameFile(fs, now->top().path, prepared.new_top_path)) saved = Status::Ok();
    }
    if (!saved.ok()) {
      // The descriptor still names the old top: serve it again as it was.
      keeper.reset();
      auto again = OpenImage(fs, prepared.old_top_path, writable);
      if (!again.ok()) {
        layers.clear();
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
    auto old_top = OpenImage(fs, prepared.old_top_path, read_only);
    keeper.reset();
    if (!old_top.ok()) {
      layers.clear();
      return std::move(old_top).error().WithContext("reopen the snapshot read-only");
    }
    layers.push_back(std::move(*old_top));
    ASSIGN_OR_RETURN_CTX(auto new_top, OpenImage(fs, prepared.new_top_path, writable),
                         "open the new top");
    layers.push_back(std::move(new_top));
    images = LayerPaths(layers);
    return Status::Ok();
  });
  if (!committed) AbandonSnapshot(fs, prepared);
  TRY_CTX(s, "switch the served layers");
  return images;
}

Status GrowServedDisk(FileSystem& fs, const std::string& dd_path, ServedDisk& disk, uint64_t size,
                      const DescriptorLoadOptions& load) {
  if (size < disk.size_bytes()) {
    return Status::InvalidArgument("the disk is " + std::to_string(disk.size_bytes()) +
                                   " bytes; shrinking is not supported");
  }
  // Crash ordering as offline: the top grows first, then the descriptor
  // says so (a larger top than the descriptor's size is still a valid disk).
  TRY(disk.Grow(size));
  TRY_CTX(RecordDiskSize(fs, dd_path, disk.size_bytes(), load),
          "record the new size in the descriptor");
  return Status::Ok();
}

// Online merge of a snapshot below the top into its parent (both served
// read-only), in steps:
//   A. quiesced: the parent's served open is swapped for an unlocked
//      read-only one, and a writable open (its write lock: Busy while any
//      other program reads the parent) is kept for the copy. Nothing is
//      changed yet, so a refusal here leaves no trace;
//   B. AnnounceOnlineMerge: the room check, the parent marked <Temporary/>;
//   C. only when the parent is smaller than the child, quiesced: the parent
//      grows (Delta::Grow may move clusters, which no reader may see
//      half-done) and its served open is reopened;
//   D. not quiesced: CopyOnlineMerge. Requests keep running: every cluster
//      copied is one the child holds, so no request reads it from the
//      parent;
//   E. quiesced: the parent is closed (flushed, clean; held against other
//      writers as in the snapshot's step 2), the descriptor
//      committed, the parent reopened read-only with its lock (a fresh BAT
//      that has the copied clusters) and the child's layer dropped; its
//      file is then removed. If anything failed, the chain is served as
//      before (the child still shadows the parent), and a merge marked in
//      the descriptor is finished by the next mount or offline command.
Result<std::vector<std::string>> MergeServedSnapshot(FileSystem& fs, const std::string& dd_path,
                                                     ServedDisk& disk, std::string_view guid,
                                                     const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(OnlineMerge merge, CheckOnlineMerge(fs, dd_path, guid, load));
  if (merge.child_guid == merge.dd.top_guid()) {
    return Status::FailedPrecondition(
        "merging the top of a mounted disk is not supported; unmount it first");
  }
  const std::string ctx = "merge " + merge.child_guid + " into " + merge.parent_guid;
  OpenOptions locked_ro;
  OpenOptions unlocked_ro;
  std::unique_ptr<Image> parent_rw;
  uint64_t child_bytes = 0;
  auto find = [&](const std::vector<std::unique_ptr<Image>>& layers, int* pi, int* ci) {
    *pi = LayerIndex(fs, layers, merge.parent_path);
    *ci = LayerIndex(fs, layers, merge.child_path);
    if (*pi < 0 || *ci != *pi + 1) {
      return Status::FailedPrecondition("snapshot " + merge.child_guid + " or its parent " +
                                        merge.parent_guid + " is not in the served chain");
    }
    return Status::Ok();
  };

  // A.
  TRY_CTX(disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    int pi = 0, ci = 0;
    TRY(find(layers, &pi, &ci));
    locked_ro = LayerOpen(*layers[pi], false);
    unlocked_ro = locked_ro;
    unlocked_ro.lock = false;
    const OpenOptions rw = LayerOpen(*layers[pi], true);
    child_bytes = layers[ci]->size_bytes();
    auto restore = [&](Status why) -> Status {
      if (parent_rw) parent_rw->Close().IgnoreError();
      parent_rw.reset();
      auto again = OpenImage(fs, merge.parent_path, locked_ro);
      if (!again.ok()) {
        layers.clear();  // the disk is closed rather than served without its parent
        return std::move(again).error().WithContext("after " + why.ToString());
      }
      layers[pi] = std::move(*again);
      return why;
    };
    if (Status s = layers[pi]->Close(); !s.ok()) return restore(s);
    auto opened = OpenImage(fs, merge.parent_path, rw);
    if (!opened.ok()) return restore(std::move(opened).error());
    parent_rw = std::move(*opened);
    auto served = OpenImage(fs, merge.parent_path, unlocked_ro);
    if (!served.ok()) return restore(std::move(served).error());
    layers[pi] = std::move(*served);
    return Status::Ok();
  }),
          ctx);

  // B, C, D.
  Status copied = [&]() -> Status {
    ASSIGN_OR_RETURN(auto child, OpenImage(fs, merge.child_path, unlocked_ro));
    TRY(AnnounceOnlineMerge(fs, merge, *child, *parent_rw));
    if (parent_rw->size_bytes() < child_bytes) {
      TRY(disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
        int pi = 0, ci = 0;
        TRY(find(layers, &pi, &ci));
        TRY(parent_rw->Grow(child_bytes));
        TRY(parent_rw->Flush());
        auto served = OpenImage(fs, merge.parent_path, unlocked_ro);
        if (!served.ok()) {
          layers.clear();  // the old open's BAT may point at moved clusters
          return std::move(served).error();
        }
        layers[pi] = std::move(*served);
        return Status::Ok();
      }));
    }
    TRY(CopyOnlineMerge(merge, *child, *parent_rw));
    return parent_rw->Flush();
  }();

  // E.
  bool committed = false;
  std::vector<std::string> images;
  Status switched = disk.ReplaceLayers([&](std::vector<std::unique_ptr<Image>>& layers) -> Status {
    int pi = 0, ci = 0;
    TRY(find(layers, &pi, &ci));
    // Nobody else may write to the parent between the close of the
    // writable open and the locked read-only one. (Without the extra open
    // the merge still ends as before: the parent_rw must be closed here.)
    std::unique_ptr<BlockFile> keeper;
    if (auto held = HoldAgainstWriters(fs, merge.parent_path); held.ok()) keeper = std::move(*held);
    Status closed = parent_rw->Close();
    parent_rw.reset();
    Status saved = !copied.ok() ? copied : !closed.ok() ? closed : CommitOnlineMerge(fs, merge);
    auto fresh = OpenImage(fs, merge.parent_path, locked_ro);
    keeper.reset();
    if (!fresh.ok()) {
      // The unlocked open stays, and so does the child over it (the copied
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
  TRY_CTX(switched, ctx);
  return images;
}

}  // namespace ploop
