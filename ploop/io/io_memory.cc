// IoMemory: see io_memory.h.
//
// The mapping is made 2 MiB longer than asked and trimmed at both ends, so
// that it starts on a 2 MiB boundary without mapping more than it keeps.
#include "ploop/io/io_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace ploop {

namespace {

size_t PageBytes() {
  static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

void IoMemoryRelease::operator()(std::byte* p) const {
  if (p != nullptr) ::munmap(p, mapped_bytes);
}

IoMemory AllocateIoMemory(size_t bytes) {
  const size_t page = PageBytes();
  const size_t length = (std::max<size_t>(bytes, 1) + page - 1) / page * page;
  const size_t align = length >= kIoMemoryHugePageBytes ? kIoMemoryHugePageBytes : page;
  const size_t reserve = length + align - page;
  void* raw = ::mmap(nullptr, reserve, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return IoMemory(nullptr, IoMemoryRelease{});
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + align - 1) / align * align;
  if (aligned > start) ::munmap(raw, aligned - start);
  const uintptr_t end = aligned + length;
  if (start + reserve > end) ::munmap(reinterpret_cast<void*>(end), start + reserve - end);
  auto* p = reinterpret_cast<std::byte*>(aligned);
  // Advice only: without transparent huge pages the memory is ordinary.
  ::madvise(p, length, MADV_HUGEPAGE);
  return IoMemory(p, IoMemoryRelease{length});
}

bool DropIoMemoryPages(std::byte* memory, size_t bytes) {
  const size_t page = PageBytes();
  const size_t length = (bytes + page - 1) / page * page;
  // MADV_DONTNEED on private anonymous memory: the next touch maps a new
  // zeroed page. It refuses locked pages (mlock, mlockall).
  return length == 0 || ::madvise(memory, length, MADV_DONTNEED) == 0;
}

}  // namespace ploop
