// Checking and repairing one ploop image file.
//
// CheckImage() performs every check of OpenVZ `ploop check` and
// `qemu-img check`: signature, type, cluster size, BAT size vs. disk size,
// first-block offset, file length, BAT entries past the virtual size, past
// EOF or inside the BAT area, clusters referenced twice, leaked space at
// the end of the file, and the dirty flag. With repair it fixes what is safe,
// in an order that is itself crash-safe (see check.cc).
//
// Thread-safety: not thread-safe; the caller holds the image lock.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ploop/format.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop {

struct CheckProblem {
  enum class Severity {
    kFatal,  // the image cannot be used or repaired (bad signature, ...)
    kError,  // inconsistent metadata; repairable
    kLeak,   // wasted space only; repairable
  };
  Severity severity;
  std::string message;
  bool repaired = false;
};

struct CheckReport {
  bool header_valid = false;
  Header header;
  uint64_t file_bytes = 0;
  uint64_t allocated_clusters = 0;
  uint64_t leaked_clusters = 0;  // unreferenced clusters at the end of the file
  uint64_t free_clusters = 0;    // unreferenced clusters inside the data area (reused)
  bool was_dirty = false;
  // Every problem found, at most kMaxListed of a kind listed one by one.
  std::vector<CheckProblem> problems;
  uint64_t unlisted_problems = 0;
  bool unlisted_repaired = false;

  static constexpr size_t kMaxListed = 50;

  // No problem left unrepaired.
  bool clean() const;
  // The first unrepaired problem, for one-line errors.
  std::string FirstProblem() const;
};

// Checks the ploop image open in `file`; with `repair` (file opened
// read-write) repairs what can be repaired. Returns the report; an error
// only when the check itself could not run (I/O error).
Result<CheckReport> CheckImage(BlockFile& file, bool repair);

}  // namespace ploop
