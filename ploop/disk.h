// Disk: a ploop disk as OpenVZ lays it out — a folder with
// DiskDescriptor.xml and the delta files it names. This module creates such
// disks, opens a chain of them as one Image, rebuilds a lost descriptor and
// checks a whole disk (every delta plus the chain rules). The snapshot
// operations that change the chain live in snapshot/.
//
// Thread-safety: functions; no shared state. Concurrent users of one disk
// are kept apart by the image locks (lock.h).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ploop/chain.h"
#include "ploop/check.h"
#include "ploop/descriptor.h"
#include "ploop/image.h"
#include "ploop/path.h"

namespace ploop {

// True when `path` names a descriptor: it ends in ".xml", or it is a
// folder holding DiskDescriptor.xml (then *descriptor_path is set to it).
bool IsDescriptorPath(FileSystem& fs, const std::string& path, std::string* descriptor_path);

// Creates image `image_path` (as CreateImage()) and DiskDescriptor.xml in
// the same folder, naming the image as the writable top. AlreadyExists when
// either file exists (nothing is created then). On failure nothing is left.
Status CreateDisk(FileSystem& fs, const std::string& image_path, const CreateOptions& options);

// Opens the disk of descriptor `dd_path` as a Chain: the active chain, or
// the one ending at snapshot `guid`. Only the top can be opened writable.
// Descriptor errors (Load()), then OpenImage() errors with the delta's GUID
// as context.
Result<std::unique_ptr<Chain>> OpenDisk(FileSystem& fs, const std::string& dd_path,
                                        std::string_view guid, const OpenOptions& options,
                                        const DescriptorLoadOptions& load = {});

// Writes `dir`/DiskDescriptor.xml for the single image `image_path`, which
// must be in `dir`: from its header for a ploop image, or (raw) with the
// largest cluster size from 1M down to 32K that divides its size.
// AlreadyExists when a descriptor is there; InvalidArgument when the image
// is elsewhere; Corruption for an image that does not open.
Status RestoreDescriptor(FileSystem& fs, const std::string& dir, const std::string& image_path,
                         bool raw);

// The state of one delta for `info`.
struct DeltaInfo {
  DescriptorImage image;
  std::string parent_guid;
  bool in_active_chain = false;
  uint64_t size_bytes = 0;
  uint64_t file_bytes = 0;
  uint64_t allocated_clusters = 0;
  bool dirty = false;
};
// Every delta of the descriptor, in descriptor order. Opens each read-only
// without locks (info must work on a disk in use).
Result<std::vector<DeltaInfo>> DescribeDisk(FileSystem& fs, const Descriptor& dd);

struct DiskCheckReport {
  // Per delta, in descriptor order; deltas whose file is missing have none.
  struct Delta {
    std::string guid;
    std::string file;
    bool missing = false;
    CheckReport report;
  };
  std::vector<Delta> deltas;
  // Problems of the disk as a whole: cluster sizes, sizes along the chain,
  // missing files, orphan delta files in the folder, an interrupted merge.
  std::vector<CheckProblem> problems;

  bool clean() const;
  std::string FirstProblem() const;
};

// Checks every delta (CheckImage) and the chain rules. With `repair`,
// repairs each delta; an interrupted merge is reported but finishing it is
// the snapshot layer's job (snapshot/). Errors only when the check cannot
// run (descriptor unreadable, I/O error).
Result<DiskCheckReport> CheckDisk(FileSystem& fs, const std::string& dd_path, bool repair,
                                  const DescriptorLoadOptions& load = {});

}  // namespace ploop
