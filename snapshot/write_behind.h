// WriteBehind: writer threads that perform queued file writes, so that a
// producer (the stream receiver) goes on decoding and hashing while the
// disk writes what it already has.
//
// Why: the receiver writes each chunk's clusters into its new deltas. With
// direct I/O (no page-cache copy, which this kind of VM makes slow and
// erratic) a synchronous write stalls the receiver for the device's round
// trip; queued, the device stays busy while the next chunks are checked.
// With more than one thread, up to that many writes are in flight at once
// (the device's queue depth): with one direct write at a time, the writer
// was busy through nearly all of a transfer while the receiver waited for
// room in its queue (tools/bench/README.md, session 14). Concurrent direct
// writes only overlap where the file system lets them: ext4 serializes
// writes that extend a file or fill holes, so the caller reserves the
// space first (DeltaBuilder does).
//
// Order: items are started in the order they were queued. Writes may run
// at the same time, except that a write never starts while an earlier
// write to an overlapping range of the same file is under way (so the
// later one wins). An After() function runs once every item queued before
// it is done (so After() functions run one at a time, in order); writes
// queued after it do not wait for it. Queued bytes are bounded: Write()
// blocks while more than `max_queued_bytes` are waiting or being written.
//
// Errors: the first failed write is kept; writes not yet started are
// skipped (After() functions still run, so buffers go home), and Write()
// and Drain() return that error from then on.
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
#include <map>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop::stream {

class WriteBehind {
 public:
  // `threads` writer threads (at least one).
  explicit WriteBehind(uint64_t max_queued_bytes, unsigned threads = 1);
  // Waits for everything queued (errors are dropped: call Drain() first).
  ~WriteBehind();
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;

  // Queues file.WriteAt(offset, data). Returns the first error of an
  // earlier write, if any (then nothing is queued).
  Status Write(BlockFile& file, uint64_t offset, std::span<const std::byte> data);
  // Runs `fn` on a writer thread once every item queued before it is done
  // (or skipped after an error).
  void After(std::function<void()> fn);
  // Waits until everything queued so far is done; the first write error.
  Status Drain();

 private:
  struct Item {
    uint64_t seq = 0;
    BlockFile* file = nullptr;  // null: an After() function
    uint64_t offset = 0;
    std::span<const std::byte> data;
    std::function<void()> fn;
  };
  void Loop();
  // Whether `item` may start now: no earlier item it must follow is still
  // under way (called with mu_ held).
  bool MayStart(const Item& item) const;

  const uint64_t max_queued_bytes_;
  std::mutex mu_;
  std::condition_variable work_;  // the threads: something queued, something done, or stop
  std::condition_variable room_;  // writers and Drain(): progress made
  std::deque<Item> queue_;
  uint64_t next_seq_ = 0;
  // Items taken off the queue and not done yet, by sequence number.
  std::map<uint64_t, const Item*> running_;
  uint64_t queued_bytes_ = 0;  // waiting or being written
  bool stop_ = false;
  Status failed_;
  std::vector<std::thread> threads_;
};

}  // namespace ploop::stream
