// Snapshot operations on a ploop disk (a DiskDescriptor.xml and its
// deltas), offline, with OpenVZ ploop's semantics:
//
//   create  the old top becomes the snapshot (renamed to its GUID) and a
//           new empty top {5fbaabe3-...} is added over it: O(1);
//   switch  rollback: the current top is dropped and a new empty top is
//           created over the chosen snapshot;
//   merge   a delta is merged down into its parent: the child's clusters
//           are copied into the parent's file, the child's GUID then names
//           that file and the parent's GUID is gone;
//   delete  a snapshot without children is removed; one with a single
//           child is merged with it (the child's data wins); the top and a
//           snapshot with several children are refused.
//
// Crash safety: every step that changes the chain ends with an atomic
// descriptor save; delta files are created before the descriptor names
// them and removed after it stops naming them, so a crash leaves at worst
// an orphan file (reported and removed by `check --repair`). A merge first
// marks the parent <Temporary/> in the descriptor; copying is idempotent,
// so an interrupted merge is finished by FinishInterruptedMerges(), which
// every operation here runs first.
//
// Exclusion: each operation holds the write lock of the delta files it
// changes (lock.h), so a disk in use elsewhere gets Busy.
//
// Thread-safety: functions; no shared state.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "ploop/descriptor.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop {

// Takes a snapshot; `guid` names it (empty: a random GUID). Returns the
// snapshot's GUID. AlreadyExists when `guid` is taken; Busy when the disk is
// in use.
Result<std::string> CreateSnapshot(FileSystem& fs, const std::string& dd_path,
                                   std::string_view guid, const DescriptorLoadOptions& load = {});

// The online form of CreateSnapshot, in two steps, for a disk whose top a
// running process (the mount daemon) holds open for writing -- the caller
// then holds the locks, and switches its open layers between the steps:
//   PrepareSnapshot  checks the request and creates the new empty top file
//                    (`top_size_bytes`, synced, folder synced); the
//                    descriptor does not name it yet, so a crash leaves an
//                    orphan file at worst. Nothing is opened or locked.
//   CommitSnapshot   the atomic descriptor save of CreateSnapshot: the old
//                    top renamed to the snapshot's GUID, the new file the
//                    top. Call it with the old top flushed and no write in
//                    flight, and let no write reach the new top before it
//                    returns OK.
//   AbandonSnapshot  removes the new file after a failed or skipped commit.
struct PreparedSnapshot {
  Descriptor dd;               // as loaded by PrepareSnapshot
  std::string guid;            // the snapshot's GUID (the old top's new name)
  std::string old_top_path;    // the old top's file (it keeps its name)
  std::string new_top_path;    // the new empty top's file
  DescriptorLoadOptions load;  // as given to PrepareSnapshot
};
Result<PreparedSnapshot> PrepareSnapshot(FileSystem& fs, const std::string& dd_path,
                                         std::string_view guid, uint64_t top_size_bytes,
                                         const DescriptorLoadOptions& load = {});
Status CommitSnapshot(FileSystem& fs, PreparedSnapshot& prepared);
void AbandonSnapshot(FileSystem& fs, const PreparedSnapshot& prepared);

// Rolls back to snapshot `guid`: the current top's data is dropped.
// InvalidArgument for the top itself; NotFound for an unknown GUID.
Status SwitchSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                      const DescriptorLoadOptions& load = {});

// Merges delta `guid` (empty: the top) into its parent. FailedPrecondition
// for a root (nothing below) or a parent with other children; NoSpace when
// the host file system lacks the room the merge may need.
Status MergeSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                     const DescriptorLoadOptions& load = {});

// The online form of MergeSnapshot, for a disk whose deltas a running
// process (the mount daemon) holds open and serves: the same steps and
// crash protocol, but the caller opens the two deltas its own way (it
// holds their locks) and swaps its open layers between the steps:
//   CheckOnlineMerge   loads the descriptor and checks the request (the
//                      errors of MergeSnapshot); changes nothing;
//   AnnounceOnlineMerge  checks the host has room (NoSpace) and marks the
//                      parent <Temporary/> (saved: a crash from here is
//                      finished by FinishInterruptedMerges); the deltas
//                      open in any mode;
//   CopyOnlineMerge    grows the parent to the child's size if smaller
//                      (Delta::Grow may move clusters: nobody else may read
//                      the parent meanwhile), and copies the child's
//                      clusters into it; `parent` writable. The child keeps
//                      shadowing every cluster copied, so the disk reads the
//                      same throughout;
//   CommitOnlineMerge  after the parent is closed: the child's GUID takes
//                      over the parent's file (saved). The caller then
//                      stops using the child's file and removes it.
struct OnlineMerge {
  Descriptor dd;
  std::string child_guid;
  std::string parent_guid;
  std::string child_path;
  std::string parent_path;
};
Result<OnlineMerge> CheckOnlineMerge(FileSystem& fs, const std::string& dd_path,
                                     std::string_view guid, const DescriptorLoadOptions& load = {});
Status AnnounceOnlineMerge(FileSystem& fs, OnlineMerge& merge, Image& child, Image& parent);
Status CopyOnlineMerge(OnlineMerge& merge, Image& child, Image& parent);
Status CommitOnlineMerge(FileSystem& fs, OnlineMerge& merge);

// Merges the whole active chain into its base, so the disk is one delta.
Status MergeAll(FileSystem& fs, const std::string& dd_path, const DescriptorLoadOptions& load = {});

// Deletes snapshot `guid` (see the top of this file).
Status DeleteSnapshot(FileSystem& fs, const std::string& dd_path, std::string_view guid,
                      const DescriptorLoadOptions& load = {});

// Finishes merges a crash interrupted (a <Temporary/> shot with exactly one
// child). Returns how many it finished.
Result<int> FinishInterruptedMerges(FileSystem& fs, const std::string& dd_path,
                                    const DescriptorLoadOptions& load = {});

// Grows the disk offline: the top delta and the descriptor's size.
Status ResizeDisk(FileSystem& fs, const std::string& dd_path, uint64_t new_size_bytes,
                  const DescriptorLoadOptions& load = {});

// The descriptor step of a resize: records `size_bytes` (the top delta's
// new size, grown already -- online by the mount daemon) as the disk's
// size, saved atomically.
Status RecordDiskSize(FileSystem& fs, const std::string& dd_path, uint64_t size_bytes,
                      const DescriptorLoadOptions& load = {});

// What CompactDisk() did, per delta file and in all.
struct CompactResult {
  struct PerDelta {
    std::string guid;
    std::string file;
    uint64_t moved_clusters = 0;
    uint64_t dropped_zero_clusters = 0;
    uint64_t bytes_before = 0;
    uint64_t bytes_after = 0;
  };
  std::vector<PerDelta> deltas;
};

// Compacts every expanded delta of the disk offline (Delta::Compact): the
// space a fragmented image keeps in holes and at its end goes back to the
// host. Zero clusters are dropped only from deltas with no parent, where
// nothing shows through. Raw and preallocated deltas are left alone. Busy
// when the disk is in use.
Result<CompactResult> CompactDisk(FileSystem& fs, const std::string& dd_path,
                                  const DescriptorLoadOptions& load = {});

}  // namespace ploop
