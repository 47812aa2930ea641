// WriteBehind: one thread that performs queued file writes in order, so
// that a producer (the stream receiver) goes on decoding and hashing while
// the disk writes what it already has.
//
// Why: the receiver writes each chunk's clusters into its new deltas. With
// direct I/O (no page-cache copy, which this kind of VM makes slow and
// erratic) a synchronous write stalls the receiver for the device's round
// trip; queued, the device stays busy while the next chunks are checked.
//
// Order: writes and After() functions run one at a time in the order they
// were queued. Queued bytes are bounded: Write() blocks while more than
// `max_queued_bytes` are waiting.
//
// Errors: the first failed write is kept; later writes are skipped (After()
// functions still run, so buffers go home), and Write() and Drain() return
// that error from then on.
//
// Thread-safety: Write(), After() and Drain() may be called from any
// thread; the caller keeps every queued span valid until an After()
// function queued behind it has run (or Drain() returned). Ownership: the
// files must outlive the writes queued on them.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>
#include <thread>

#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop::stream {

class WriteBehind {
 public:
  explicit WriteBehind(uint64_t max_queued_bytes);
  // Waits for everything queued (errors are dropped: call Drain() first).
  ~WriteBehind();
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;

  // Queues file.WriteAt(offset, data). Returns the first error of an
  // earlier write, if any (then nothing is queued).
  Status Write(BlockFile& file, uint64_t offset, std::span<const std::byte> data);
  // Runs `fn` on the writer thread once every write queued before it is
  // done (or skipped after an error).
  void After(std::function<void()> fn);
  // Waits until everything queued so far is done; the first write error.
  Status Drain();

 private:
  struct Item {
    BlockFile* file = nullptr;  // null: an After() function
    uint64_t offset = 0;
    std::span<const std::byte> data;
    std::function<void()> fn;
  };
  void Loop();

  const uint64_t max_queued_bytes_;
  std::mutex mu_;
  std::condition_variable work_;  // the thread: something queued, or stop
  std::condition_variable room_;  // writers and Drain(): progress made
  std::deque<Item> queue_;
  uint64_t queued_bytes_ = 0;
  bool busy_ = false;  // the thread holds an item outside the lock
  bool stop_ = false;
  Status failed_;
  std::thread thread_;
};

}  // namespace ploop::stream
