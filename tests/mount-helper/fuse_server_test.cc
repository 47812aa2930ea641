// The ring entry count of FUSE over io_uring: every per-CPU queue gets
// one, and the total stays within the threads asked for wherever the ring
// allows (a 1 MiB buffer each).
#include "mount-helper/fuse_server.h"

#include "test_support.h"

namespace ploop::mount {
namespace {

TEST_SUITE_BEGIN("unit");

TEST_CASE(
    "fuse ring entries: threads spread over the queues, never more than asked where the ring "
    "allows") {
  CHECK(RingEntriesPerQueue(32, 2) == 16);
  CHECK(RingEntriesPerQueue(32, 16) == 2);
  CHECK(RingEntriesPerQueue(32, 3) == 11);  // rounded up: every queue the same
  CHECK(RingEntriesPerQueue(4, 2) == 2);
  // More CPUs than threads / 2: one each, the fewest the ring allows.
  CHECK(RingEntriesPerQueue(32, 17) == 1);
  CHECK(RingEntriesPerQueue(32, 64) == 1);
  CHECK(RingEntriesPerQueue(1, 1) == 1);
  CHECK(RingEntriesPerQueue(0, 0) == 1);
  for (unsigned threads = 1; threads <= 64; ++threads) {
    for (unsigned queues = 1; queues <= 128; ++queues) {
      CAPTURE(threads);
      CAPTURE(queues);
      const unsigned per = RingEntriesPerQueue(threads, queues);
      REQUIRE(per >= 1);
      if (2 * queues <= threads) {
        CHECK(per >= 2);
        CHECK(per * queues < threads + queues);  // within threads, but for rounding
      } else {
        CHECK(per == 1);
      }
    }
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
