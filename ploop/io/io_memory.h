// IoMemory: buffers for data that moves to or from files with direct I/O.
//
// Why: a direct transfer hands the device one scatter-gather element per
// physically contiguous piece of the buffer. Ordinary anonymous memory is
// made of scattered 4 KiB pages, so a 1 MiB read is 256 elements, and on a
// virtio disk that is what the host processes. Measured here (8 threads of
// 1 MiB O_DIRECT preads of one file, tools/bench/README.md, "Buffers for
// direct I/O in huge pages"): 0.9-1.1 GB/s from 4 KiB pages, 2.4 GB/s
// from transparent huge pages; writes 2.7 against 4.0 GB/s.
//
// AllocateIoMemory() maps anonymous memory and asks for transparent huge
// pages (MADV_HUGEPAGE: the default "madvise" mode gives them only to who
// asks). A huge page only backs an aligned 2 MiB range inside the mapping,
// so a buffer of 2 MiB or more starts on a 2 MiB boundary; a smaller one is
// better carved out of one larger IoMemory by its user (several buffers
// sharing huge pages) than given 2 MiB of its own. Where the kernel has no
// huge page to give, the memory is ordinary pages and works the same.
//
// Thread-safety: an IoMemory is a plain owning pointer.
#pragma once

#include <cstddef>
#include <memory>

namespace ploop {

// The huge page size IoMemory is aligned to (x86-64, arm64 with 4 KiB pages).
inline constexpr size_t kIoMemoryHugePageBytes = size_t{2} << 20;

struct IoMemoryRelease {
  size_t mapped_bytes = 0;  // the length of the mapping, from the pointer
  void operator()(std::byte* p) const;
};
using IoMemory = std::unique_ptr<std::byte[], IoMemoryRelease>;

// `bytes` of zeroed memory, page-aligned (2 MiB-aligned from 2 MiB up),
// backed by huge pages where the kernel has them. Null when the memory
// cannot be mapped.
IoMemory AllocateIoMemory(size_t bytes);

// Gives up the pages under the first `bytes` of `memory` (whole pages,
// from its start): the memory reads as zeros again, on fresh pages, while
// whoever still refers to the old ones (a pipe they were spliced into, a
// socket) keeps them unchanged. For memory handed to a writer by
// reference (StreamWriter::WriteStable) before it is written into again.
// Costs the zeroing of the fresh pages when they are next touched. False
// when the kernel refused (locked memory): the old pages are still there,
// so the memory must not be written again, only unmapped.
[[nodiscard]] bool DropIoMemoryPages(std::byte* memory, size_t bytes);

}  // namespace ploop
