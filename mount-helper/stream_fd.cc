// See stream_fd.h. Ordering: the writer is used by one thread, and write()
// and vmsplice() append to the same pipe in call order, so headers written
// with write() and payloads spliced with vmsplice() arrive interleaved
// exactly as the sender produced them. vmsplice() moves at most what fits
// in the pipe and returns how much that was (a 4 MiB payload into a 1 MiB
// pipe takes at least four calls); it blocks only while the pipe is full.
// The pages are referenced, not copied: the caller's mapping may go once
// vmsplice() returned, but the file's content must not change until the
// reader took them (Drain()).
#include "mount-helper/stream_fd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace ploop::mount {

FdStreamWriter::FdStreamWriter(int fd, std::string what, bool splice)
    : fd_(fd), what_(std::move(what)), splice_(splice) {
  struct stat st;
  if (::fstat(fd_, &st) != 0 || !S_ISFIFO(st.st_mode)) splice_ = false;
}

Status FdStreamWriter::Write(std::span<const std::byte> data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, errno == EPIPE
                                          ? "write to " + what_ + " (the receiver went away)"
                                          : "write to " + what_);
    }
    data = data.subspan(static_cast<size_t>(n));
    written_bytes_ += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status FdStreamWriter::WriteStable(std::span<const std::byte> data) {
  while (splice_ && !data.empty()) {
    iovec iov{const_cast<std::byte*>(data.data()), data.size()};
    ssize_t n = ::vmsplice(fd_, &iov, 1, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE) {
        return Status::FromErrno(errno, "write to " + what_ + " (the receiver went away)");
      }
      // The memory itself is gone (a mapped file cut short under us):
      // write() would fail the same way.
      if (errno == EFAULT) return Status::FromErrno(errno, "send mapped data to " + what_);
      // Refused (EINVAL, EBADF for a descriptor that is no pipe after all,
      // ENOSYS or EPERM under a sandbox): nothing was moved, write() does
      // the rest.
      splice_ = false;
      break;
    }
    data = data.subspan(static_cast<size_t>(n));
    spliced_bytes_ += static_cast<uint64_t>(n);
  }
  return Write(data);
}

Status FdStreamWriter::Drain() {
  if (spliced_bytes_ == 0) return Status::Ok();
  // A pipe has no "emptied" event: look, then sleep a little longer each
  // time (1 ms up to 50 ms). The poll asks for no event, so it sleeps its
  // full timeout unless the reader went away (POLLERR: nobody will look at
  // the pages any more).
  for (int wait_ms = 1;; wait_ms = std::min(wait_ms * 2, 50)) {
    int unread = 0;
    if (::ioctl(fd_, FIONREAD, &unread) != 0) {
      return Status::FromErrno(errno, "ask how much of " + what_ + " is unread");
    }
    if (unread == 0) return Status::Ok();
    pollfd p{fd_, 0, 0};
    int ready = ::poll(&p, 1, wait_ms);
    if (ready < 0 && errno != EINTR) return Status::FromErrno(errno, "wait for " + what_);
    if (ready > 0 && (p.revents & (POLLERR | POLLNVAL)) != 0) return Status::Ok();
  }
}

}  // namespace ploop::mount
