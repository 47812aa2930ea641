// OrderedPipeline: a bounded pool of worker threads that runs a function on
// jobs submitted by one producer and hands them to one consumer in
// submission order. The sender hashes and compresses chunks with it, the
// receiver decompresses and hashes them, while reading and writing stay
// sequential on their own threads.
//
// Memory is bounded: Submit() blocks while `max_in_flight` jobs are
// submitted and not yet taken by Next(). With zero workers the work runs
// inside Submit() (deterministic, for tests and single-CPU machines).
//
// Scheduling: the workers are the process's CPU-heavy part (SHA-256, lz4,
// XXH3), while its other threads move data: disk reads and writes, the
// pipe, handing jobs on. Those need the CPU briefly but at once -- a disk
// waits while a thread that would submit its next request waits for a
// CPU. So the workers run at a lower priority (nice + kWorkerNice) and ask
// for a long time slice (kWorkerSliceNs, Linux 6.12+; ignored before),
// which lets a waking thread with the default slice preempt them. Measured
// on 2 vCPUs (tools/bench/README.md, session 8): the mean delay from
// wake-up to running of the disk writer went from 0.22-0.29 to 0.10 ms,
// and send|receive from 2.14 to 2.01 s (medians of 10 rounds).
//
// Pairs: with a PairWork, a worker takes two jobs and runs them together,
// which lets it hash two chunks at once (sha256_lanes.h). A worker that
// finds one job waits up to kPairWait for the producer to submit a second
// (other workers leave new jobs to it), unless no second can come soon:
// after Finish(), or when the pipeline is full and the consumer waits for
// this very job. On two CPUs that took the chunks hashed in pairs from
// three quarters to 99%, and the bytes hashed two at a time from 60% to
// 90% (tools/bench/README.md, session 13). Finish() and Cancel() end the
// wait.
//
// Thread-safety: Submit()/Finish() from one producer thread, Next() from
// one consumer thread, Cancel() from anywhere. Internal to snapshot/.
#pragma once

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "ploop/status.h"

namespace ploop::stream {

inline constexpr int kWorkerNice = 5;
inline constexpr uint64_t kWorkerSliceNs = 20'000'000;
inline constexpr std::chrono::milliseconds kPairWait{5};

// Makes the calling thread a background worker (see above). Advice only:
// a kernel or a limit that refuses it changes nothing else.
inline void BecomeBackgroundWorker() {
  errno = 0;
  const int nice = ::getpriority(PRIO_PROCESS, 0);  // this thread's
  if (nice == -1 && errno != 0) return;
  const int lower = std::min(nice + kWorkerNice, 19);
  if (::sched_getscheduler(0) != SCHED_OTHER) {
    // Started as batch or idle work (chrt): keep that policy, only lower
    // the priority within it.
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), lower);
    return;
  }
  // struct sched_attr of the kernel ABI, its first version (48 bytes):
  // glibc has no wrapper, and <linux/sched/types.h> clashes with <sched.h>.
  struct {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
  } attr{};
  static_assert(sizeof(attr) == 48);
  attr.size = sizeof(attr);
  attr.sched_policy = SCHED_OTHER;
  attr.sched_nice = lower;
  attr.sched_runtime = kWorkerSliceNs;  // the slice, for SCHED_OTHER
  if (::syscall(SYS_sched_setattr, 0, &attr, 0) != 0) {
    // Before 6.12 a slice may be refused: the priority alone.
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), lower);
  }
}

template <typename Job>
class OrderedPipeline {
 public:
  using Work = std::function<Status(Job&)>;
  // The work of two jobs, with the status of each.
  using PairWork = std::function<std::pair<Status, Status>(Job&, Job&)>;

  OrderedPipeline(unsigned workers, size_t max_in_flight, Work work, PairWork pair = nullptr)
      : max_in_flight_(std::max<size_t>(max_in_flight, 1)),
        work_(std::move(work)),
        pair_(std::move(pair)) {
    for (unsigned i = 0; i < workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
  }

  ~OrderedPipeline() {
    Cancel();
    for (auto& t : threads_) t.join();
  }

  OrderedPipeline(const OrderedPipeline&) = delete;
  OrderedPipeline& operator=(const OrderedPipeline&) = delete;

  // Queues `job`; blocks while the pipeline is full. FailedPrecondition
  // once Cancel() was called.
  Status Submit(std::unique_ptr<Job> job) {
    auto slot = std::make_unique<Slot>();
    slot->job = std::move(job);
    if (threads_.empty()) {
      slot->status = work_(*slot->job);
      slot->done = true;
    }
    std::unique_lock lock(mu_);
    space_.wait(lock, [&] { return cancelled_ || order_.size() < max_in_flight_; });
    if (cancelled_) return Status::FailedPrecondition("pipeline cancelled");
    Slot* raw = slot.get();
    order_.push_back(std::move(slot));
    if (!raw->done) {
      pending_.push_back(raw);
      // A worker holding one job waiting for a partner takes it first.
      if (holders_ > 0) {
        partner_.notify_one();
      } else {
        work_ready_.notify_one();
      }
    } else {
      done_.notify_all();
    }
    return Status::Ok();
  }

  // No more jobs will be submitted.
  void Finish() {
    std::lock_guard lock(mu_);
    finished_ = true;
    done_.notify_all();
    partner_.notify_all();
  }

  // The next job in submission order, with the status its work returned,
  // once that work is done. nullopt after Finish() when every job was
  // taken, or after Cancel().
  std::optional<std::pair<std::unique_ptr<Job>, Status>> Next() {
    std::unique_lock lock(mu_);
    done_.wait(lock, [&] {
      return cancelled_ || (!order_.empty() && order_.front()->done) ||
             (finished_ && order_.empty());
    });
    if (cancelled_ || order_.empty()) return std::nullopt;
    std::unique_ptr<Slot> slot = std::move(order_.front());
    order_.pop_front();
    space_.notify_one();
    return std::make_pair(std::move(slot->job), std::move(slot->status));
  }

  // Stops everything: Submit() fails, Next() returns nullopt, workers stop
  // after their current job.
  void Cancel() {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    space_.notify_all();
    done_.notify_all();
    work_ready_.notify_all();
    partner_.notify_all();
  }

 private:
  struct Slot {
    std::unique_ptr<Job> job;
    Status status;
    bool done = false;
  };

  void WorkerLoop() {
    BecomeBackgroundWorker();
    for (;;) {
      Slot* slot;
      Slot* second = nullptr;
      {
        std::unique_lock lock(mu_);
        // Jobs up to the number of holders are theirs.
        work_ready_.wait(lock, [&] { return cancelled_ || pending_.size() > holders_; });
        if (cancelled_) return;
        slot = pending_.front();
        pending_.pop_front();
        if (pair_ && pending_.empty() && !finished_ &&
            (order_.front().get() != slot || order_.size() < max_in_flight_)) {
          // Alone: wait a little for a partner, which the producer can
          // still submit (there is room, or the consumer takes the head
          // first, which is not this job).
          ++holders_;
          partner_.wait_for(lock, kPairWait,
                            [&] { return cancelled_ || finished_ || !pending_.empty(); });
          --holders_;
          if (cancelled_) return;
        }
        if (pair_ && !pending_.empty()) {
          second = pending_.front();
          pending_.pop_front();
        }
        if (!pending_.empty()) work_ready_.notify_one();
      }
      Status s;
      Status s2;
      if (second == nullptr) {
        s = work_(*slot->job);
      } else {
        std::tie(s, s2) = pair_(*slot->job, *second->job);
      }
      std::lock_guard lock(mu_);
      slot->status = std::move(s);
      slot->done = true;
      if (second != nullptr) {
        second->status = std::move(s2);
        second->done = true;
      }
      done_.notify_all();
    }
  }

  const size_t max_in_flight_;
  Work work_;
  PairWork pair_;
  std::mutex mu_;
  std::condition_variable space_;
  std::condition_variable done_;
  std::condition_variable work_ready_;
  std::condition_variable partner_;          // a holder: a job to pair with
  std::deque<std::unique_ptr<Slot>> order_;  // submitted, not yet taken
  std::deque<Slot*> pending_;                // submitted, not yet started
  size_t holders_ = 0;                       // workers holding one job, waiting for a partner
  bool finished_ = false;
  bool cancelled_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace ploop::stream
