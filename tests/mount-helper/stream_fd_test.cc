// FdStreamWriter (label posix): vmsplice into a tiny pipe drained by a slow
// reader (every vmsplice partial) and write() into a regular file give the
// same bytes as the plain writes; Drain() returns once the reader took
// everything; a pipe without reader is an error, not a hang; `ploop
// send`'s stream into a pipe whose reader splices the pages on (as `pv`
// does) and reads them much later is the stream written with plain
// writes (the sender never writes into a page it handed over).
#include "mount-helper/stream_fd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cstring>
#include <thread>

#include "ploop/io/posix_file_system.h"
#include "snapshot/stream.h"
#include "snapshot_support.h"
#include "test_support.h"

namespace ploop {
namespace {

using testing::TempDir;
using testing::TestRng;
using Bytes = std::vector<std::byte>;
constexpr uint64_t kMiB = 1024 * 1024;

TEST_SUITE_BEGIN("posix");

// A mapped file of random bytes, and the writes a sender would make of it:
// headers from a buffer, payload spans from the mapping.
struct Fixture {
  TempDir tmp;
  PosixFileSystem posix;
  Bytes content;
  std::unique_ptr<BlockFile> file;
  std::unique_ptr<FileMapping> mapping;

  explicit Fixture(TestRng& rng) : content(rng.Bytes(3 * kMiB + 5000)) {
    auto created = posix.Create(tmp / "data", true);
    REQUIRE_OK(created);
    file = std::move(*created);
    REQUIRE_OK(file->WriteAt(0, content));
    // Not from offset 0 and not page-aligned at the end.
    auto m = file->Map(4096, content.size() - 4096 - 777);
    REQUIRE_OK(m);
    mapping = std::move(*m);
  }
  // Plays the sequence into `w`; returns the bytes it must produce.
  Bytes Play(mount::FdStreamWriter& w) {
    Bytes expect;
    const auto data = mapping->data();
    auto header = [&](size_t n, uint8_t v) {
      Bytes h(n, std::byte{v});
      REQUIRE_OK(w.Write(h));
      expect.insert(expect.end(), h.begin(), h.end());
    };
    auto stable = [&](size_t offset, size_t n) {
      REQUIRE_OK(w.WriteStable(data.subspan(offset, n)));
      expect.insert(expect.end(), data.begin() + offset, data.begin() + offset + n);
    };
    header(100, 1);
    stable(0, 1 * kMiB);
    header(7, 2);
    stable(1 * kMiB + 123, 1 * kMiB + 4000);  // unaligned start and length
    stable(100, 10);
    header(4096 * 3, 3);
    stable(2 * kMiB + 5000, data.size() - 2 * kMiB - 5000);
    return expect;
  }
};

TEST_CASE("stream: vmsplice into a tiny pipe and write into a file give the same bytes") {
  TestRng rng;
  Fixture f(rng);
  int p[2];
  REQUIRE(::pipe(p) == 0);
  // One page: every vmsplice moves at most a page and returns partial;
  // the reader takes small bites and yields, so the writer keeps waiting.
  REQUIRE(::fcntl(p[1], F_SETPIPE_SZ, 4096) >= 0);
  Bytes got;
  std::thread reader([&] {
    std::byte buf[1000];
    for (;;) {
      ssize_t n = ::read(p[0], buf, sizeof(buf));
      if (n <= 0) break;
      got.insert(got.end(), buf, buf + n);
      std::this_thread::yield();
    }
  });
  mount::FdStreamWriter pipe_writer(p[1], "pipe");
  const Bytes expect = f.Play(pipe_writer);
  REQUIRE_OK(pipe_writer.Drain());
  const uint64_t stable = expect.size() - 100 - 7 - 4096 * 3;
  CHECK(pipe_writer.referenced_bytes() == stable);
  CHECK(pipe_writer.written_bytes() == expect.size() - stable);
  ::close(p[1]);
  reader.join();
  ::close(p[0]);
  CHECK(got.size() == expect.size());
  CHECK(got == expect);

  // A regular file: vmsplice is never tried; the same bytes.
  const std::string out_path = f.tmp / "out";
  int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  mount::FdStreamWriter file_writer(fd, "file");
  CHECK(f.Play(file_writer) == expect);
  REQUIRE_OK(file_writer.Drain());
  CHECK(file_writer.referenced_bytes() == 0);
  ::close(fd);
  auto out = f.posix.Open(out_path, OpenMode::kReadOnly);
  REQUIRE_OK(out);
  Bytes written(expect.size());
  REQUIRE_OK((*out)->ReadAt(0, written));
  CHECK(written == expect);

  // Splicing turned off: a pipe gets plain writes.
  REQUIRE(::pipe(p) == 0);
  got.clear();
  std::thread reader2([&] {
    std::byte buf[65536];
    for (ssize_t n; (n = ::read(p[0], buf, sizeof(buf))) > 0;) got.insert(got.end(), buf, buf + n);
  });
  mount::FdStreamWriter plain(p[1], "pipe", false);
  CHECK(f.Play(plain) == expect);
  CHECK(plain.referenced_bytes() == 0);
  ::close(p[1]);
  reader2.join();
  ::close(p[0]);
  CHECK(got == expect);
}

TEST_CASE("stream: a pipe whose reader went away fails WriteStable and Drain returns") {
  TestRng rng;
  Fixture f(rng);
  int p[2];
  REQUIRE(::pipe(p) == 0);
  REQUIRE(::fcntl(p[1], F_SETPIPE_SZ, 4096) >= 0);
  mount::FdStreamWriter w(p[1], "pipe");
  // Fill the pipe with spliced pages, then lose the reader.
  REQUIRE_OK(w.WriteStable(f.mapping->data().first(4096)));
  ::close(p[0]);
  std::signal(SIGPIPE, SIG_IGN);
  Status s = w.WriteStable(f.mapping->data().subspan(4096, 8192));
  CHECK(!s.ok());
  CHECK(s.message().find("receiver went away") != std::string::npos);
  CHECK(w.Drain().ok());  // unread pages, but nobody left to read them
  ::close(p[1]);
}

TEST_CASE("stream: a reader that splices the sender's pages on still gets the stream sent") {
  TestRng rng;
  TempDir tmp;
  PosixFileSystem posix;
  // 6 runs of 4 MiB of random data (chunks that go out stored) and 4 MiB
  // that lz4 shrinks (each 4 KiB a different 1 KiB, then zeros: chunks that
  // go out as frames), in 1 MiB clusters: 48 MiB read, so the read-ahead's
  // 16 MiB of blocks and the frames' buffers are used again and again.
  const std::string dir = tmp / "src";
  REQUIRE(::mkdir(dir.c_str(), 0755) == 0);
  const std::string dd = dir + "/DiskDescriptor.xml";
  snaptest::MakeDisk(posix, 64 * kMiB, kMiB, ImageKind::kExpanded, dir + "/root.hds");
  {
    auto chain = snaptest::OpenTop(posix, dd);
    for (uint64_t at = 0; at < 48 * kMiB; at += 8 * kMiB) {
      REQUIRE_OK(chain->Write(at, rng.Bytes(4 * kMiB)));
      Bytes sparse(4 * kMiB);
      for (size_t b = 0; b < sparse.size(); b += 4096) {
        Bytes head = rng.Bytes(1024);
        std::copy(head.begin(), head.end(), sparse.begin() + b);
      }
      REQUIRE_OK(chain->Write(at + 4 * kMiB, sparse));
    }
    REQUIRE_OK(chain->Close());
  }
  snaptest::MemWriter copied;
  REQUIRE_OK(SendStream(posix, dd, copied, SendOptions{}).status());

  // The sender writes into pipe `a`; a relay moves what arrives into a
  // series of 1 MiB pipes (splice: the pages change hands, nothing is
  // copied) and reads none of it until the sender is done. Every page the
  // sender lent is then still in a pipe while it goes on, as long as a
  // relay like pv could keep it: a buffer written into again in place
  // would show in the bytes read at the end.
  int a[2];
  REQUIRE(::pipe(a) == 0);
  REQUIRE(::fcntl(a[1], F_SETPIPE_SZ, 1 << 20) >= 0);
  std::vector<std::array<int, 2>> held;
  Status relayed;
  std::thread relay([&] {
    auto next_pipe = [&]() -> bool {
      std::array<int, 2> b;
      if (::pipe(b.data()) != 0 || ::fcntl(b[1], F_SETPIPE_SZ, 1 << 20) < 0) return false;
      held.push_back(b);
      return true;
    };
    if (!next_pipe()) {
      relayed = Status::FromErrno(errno, "pipe");
      return;
    }
    for (;;) {
      pollfd in{a[0], POLLIN, 0};
      if (::poll(&in, 1, -1) < 0) {
        relayed = Status::FromErrno(errno, "poll");
        return;
      }
      ssize_t n = ::splice(a[0], nullptr, held.back()[1], nullptr, 1 << 20, SPLICE_F_NONBLOCK);
      if (n == 0) return;  // the sender closed `a`
      if (n < 0 && errno == EAGAIN) {
        if (!next_pipe()) {  // the last one is full
          relayed = Status::FromErrno(errno, "pipe");
          return;
        }
      } else if (n < 0) {
        relayed = Status::FromErrno(errno, "splice");
        return;
      }
    }
  });
  mount::FdStreamWriter w(a[1], "pipe");
  Status sent = SendStream(posix, dd, w, SendOptions{}).status();
  ::close(a[1]);
  relay.join();
  ::close(a[0]);
  REQUIRE_OK(sent);
  REQUIRE_OK(relayed);
  Bytes got;
  for (const std::array<int, 2>& b : held) {
    ::close(b[1]);
    std::vector<std::byte> bite(256 << 10);
    for (ssize_t n; (n = ::read(b[0], bite.data(), bite.size())) > 0;) {
      got.insert(got.end(), bite.begin(), bite.begin() + n);
    }
    ::close(b[0]);
  }
  // The stored 24 MiB and the frames (about a quarter of the other 24).
  CHECK(w.referenced_bytes() > 28 * kMiB);
  CHECK(got.size() == copied.bytes.size());
  CHECK(got == copied.bytes);
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
