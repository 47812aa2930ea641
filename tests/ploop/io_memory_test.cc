// AllocateIoMemory: the alignment its users carve buffers by, zeroed and
// writable memory over the whole length, and the huge-page advice that
// makes a direct transfer a few pieces of contiguous memory (io_memory.h);
// DropIoMemoryPages: fresh zeroed pages, and a refusal for locked ones.
#include "ploop/io/io_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "test_support.h"

namespace ploop {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

// The VmFlags line of the mapping of /proc/self/smaps that holds `p`.
std::string VmFlagsOf(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream range(line);
    if (range >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= addr && addr < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("io memory: 2 MiB-aligned from 2 MiB up, page-aligned below, zeroed and writable") {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  for (size_t bytes : {size_t{1}, size_t{4096}, kMiB + 8192, 2 * kMiB, 4 * kMiB + 4096}) {
    CAPTURE(bytes);
    IoMemory m = AllocateIoMemory(bytes);
    REQUIRE(m != nullptr);
    const auto addr = reinterpret_cast<uintptr_t>(m.get());
    CHECK(addr % (bytes >= 2 * kMiB ? 2 * kMiB : page) == 0);
    for (size_t i = 0; i < bytes; i += 512) REQUIRE(m[i] == std::byte{0});
    CHECK(m[bytes - 1] == std::byte{0});
    m[0] = std::byte{1};
    m[bytes - 1] = std::byte{2};
    CHECK(m[bytes - 1] == std::byte{2});
  }
}

TEST_CASE("io memory: the mapping asks for transparent huge pages") {
  if (::access("/sys/kernel/mm/transparent_hugepage", F_OK) != 0) {
    MESSAGE("this kernel has no transparent huge pages: nothing to ask for");
    return;
  }
  IoMemory m = AllocateIoMemory(3 * kMiB);
  REQUIRE(m != nullptr);
  const std::string flags = VmFlagsOf(m.get());
  REQUIRE_MESSAGE(!flags.empty(), "no mapping in /proc/self/smaps holds the memory");
  // "hg": MADV_HUGEPAGE was applied (whether the kernel had huge pages to
  // give is up to it).
  CHECK_MESSAGE(flags.find(" hg") != std::string::npos, flags);
}

TEST_CASE("io memory: released memory is unmapped") {
  IoMemory m = AllocateIoMemory(2 * kMiB + 4096);
  REQUIRE(m != nullptr);
  std::byte* p = m.get();
  CHECK(!VmFlagsOf(p).empty());
  m.reset();
  CHECK(VmFlagsOf(p).empty());
}

TEST_CASE("io memory: dropped pages read as zeros, locked ones are refused and kept") {
  IoMemory m = AllocateIoMemory(2 * kMiB);
  REQUIRE(m != nullptr);
  std::memset(m.get(), 0x5a, 2 * kMiB);
  // Part of a page counts as the whole page.
  CHECK(DropIoMemoryPages(m.get(), kMiB + 1));
  CHECK(std::all_of(m.get(), m.get() + kMiB + 4096, [](std::byte b) { return b == std::byte{0}; }));
  CHECK(m[kMiB + 4096] == std::byte{0x5a});
  // Locked memory keeps its pages: the caller must not reuse it.
  std::byte* page = m.get() + kMiB + 4096;
  REQUIRE(::mlock(page, 4096) == 0);
  CHECK(!DropIoMemoryPages(page, 4096));
  CHECK(page[0] == std::byte{0x5a});
  ::munlock(page, 4096);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
