// Online operations on a disk a ServedDisk (ploop/served_disk.h) is
// serving -- the layer and descriptor steps of the mount daemon's online
// snapshot, resize and merge, through ServedDisk::ReplaceLayers()/Grow().
// The kernel's part (freezing the file system, the FUSE file's and the loop
// device's size) is the daemon's (mount-helper/), which gets these as
// callbacks from tools/.
//
// Each keeps the offline operation's crash protocol (snapshot.h): a crash
// at any point leaves the disk as before or as after, never a mix.
//
// Thread-safety: one operation at a time per disk (the caller serialises);
// requests on the disk keep running meanwhile, pausing only while
// ReplaceLayers() holds them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "ploop/served_disk.h"
#include "snapshot/snapshot.h"

namespace ploop {

// Takes the snapshot PrepareSnapshot() prepared (its new top file exists):
// quiesced, the old top is closed, the descriptor committed, the old top
// reopened read-only and the new top served for writing. Returns the layer
// files, base first. When the commit fails, the old top is served again
// for writing and the new file removed. FailedPrecondition when the
// descriptor's top is not the top being served.
Result<std::vector<std::string>> SwitchToSnapshot(FileSystem& fs, ServedDisk& disk,
                                                  PreparedSnapshot& prepared);

// Grows the served disk to `size` (ServedDisk::Grow) and records it in the
// descriptor. InvalidArgument when smaller than now.
Status GrowServedDisk(FileSystem& fs, const std::string& dd_path, ServedDisk& disk, uint64_t size,
                      const DescriptorLoadOptions& load = {});

// Merges snapshot `guid` -- below the top; both it and its parent served
// into its parent while the disk stays in use (see online.cc). Returns the
// layer files, base first. FailedPrecondition for the top, a base, a
// parent with other children, or a snapshot not in the served chain; Busy
// when another program reads the parent; NoSpace as MergeSnapshot.
Result<std::vector<std::string>> MergeServedSnapshot(FileSystem& fs, const std::string& dd_path,
                                                     ServedDisk& disk, std::string_view guid,
                                                     const DescriptorLoadOptions& load = {});

}  // namespace ploop
