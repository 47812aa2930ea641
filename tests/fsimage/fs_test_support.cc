#include "fs_test_support.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "ploop/convert.h"
#include "ploop/io/file_system.h"
#include "test_support.h"

namespace ploop::fsimage::testing {

std::string FindE2fsck() {
  std::string dirs = std::getenv("PATH") ? std::getenv("PATH") : "";
  dirs += ":/sbin:/usr/sbin";
  std::stringstream ss(dirs);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string candidate = dir + "/e2fsck";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

FsckResult RunE2fsck(const std::string& raw_path) {
  FsckResult result;
  std::string cmd = FindE2fsck() + " -fn '" + raw_path + "' 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) result.output.append(buf.data(), n);
  int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

void RequireFsckClean(Image& image, const std::string& raw_path) {
  if (FindE2fsck().empty()) ::ploop::testing::Skip("e2fsck not found (install e2fsprogs)");
  REQUIRE_OK(ExportRaw(image, DefaultFileSystem(), raw_path));
  FsckResult fsck = RunE2fsck(raw_path);
  INFO("e2fsck -fn output:\n" << fsck.output);
  CHECK(fsck.exit_code == 0);
  std::remove(raw_path.c_str());
}

}  // namespace ploop::fsimage::testing
