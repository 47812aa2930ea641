// Helpers for the fsimage tests: running e2fsck -fn on an image (exported
// to a raw file first), with the skip protocol when e2fsck is missing.
#pragma once

#include <string>

#include "ploop/image.h"

namespace ploop::fsimage::testing {

// The e2fsck binary (PATH, /sbin, /usr/sbin), or "" when there is none.
std::string FindE2fsck();

struct FsckResult {
  int exit_code = -1;
  std::string output;
};

// Runs `e2fsck -fn` on the raw file `raw_path`.
FsckResult RunE2fsck(const std::string& raw_path);

// Exports `image` to `raw_path` (a real file) and runs e2fsck -fn on it;
// fails the test with e2fsck's output unless it exits 0. Skips the test
// (exit 77) when e2fsck is missing.
void RequireFsckClean(Image& image, const std::string& raw_path);

}  // namespace ploop::fsimage::testing
