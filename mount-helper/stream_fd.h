// FdStreamWriter: the StreamWriter of `ploop send` over a file descriptor
// (stdout). Everything goes out with write(2), except WriteStable() data
// when the descriptor is a pipe: that is handed to the pipe with
// vmsplice(2) (without SPLICE_F_GIFT), so the pipe refers to the sender's
// pages (its read-ahead buffers, or mapped page-cache pages) instead of a
// copy of them, and the receiver's read() copies them out once. When
// vmsplice is refused (not a pipe, a kernel or sandbox without it) the
// writer falls back to write() for good.
//
// Whoever reads the pipe may splice the pages on instead of reading them
// (`pv` does, into its own output pipe), and they then live on in that
// pipe or socket after ours is empty: the caller must not write into a
// page it handed over, ever (see StreamWriter::WriteStable).
//
// In mount-helper/ with the other code that talks to the kernel beyond
// plain file I/O (Drain() asks the pipe how much is unread, an ioctl).
//
// Thread-safety: one thread at a time. The descriptor stays the caller's.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "snapshot/stream.h"

namespace ploop::mount {

class FdStreamWriter final : public StreamWriter {
 public:
  // `what` names the descriptor in errors ("stdout"). With `splice` false
  // WriteStable() is a plain Write().
  FdStreamWriter(int fd, std::string what, bool splice = true);

  // Writes all of `data`; a partial write is continued. IOError on failure
  // (EPIPE: the reader went away).
  Status Write(std::span<const std::byte> data) override;
  // Writes all of `data` (which must stay unchanged until Drain()) with
  // vmsplice into a pipe, continuing after partial transfers, or with
  // write() when that is refused.
  Status WriteStable(std::span<const std::byte> data) override;
  // After WriteStable() spliced anything: waits until the pipe is empty
  // (its reader took every page) or its reader went away, looking again
  // after 1 ms, then longer up to 50 ms. IOError when the pipe cannot be
  // asked.
  Status Drain() override;

  uint64_t referenced_bytes() const override { return spliced_bytes_; }
  uint64_t written_bytes() const { return written_bytes_; }

 private:
  int fd_;
  std::string what_;
  bool splice_;
  uint64_t spliced_bytes_ = 0;
  uint64_t written_bytes_ = 0;
};

}  // namespace ploop::mount
