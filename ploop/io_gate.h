// IoGate: counts the requests in flight on a served disk, so that the disk
// can wait for "everything that started before now" without a lock around
// the requests themselves.
//
// A request holds a Pass from Enter() until it is done. Synchronize() waits
// until every request that entered before the call has left (a grace period,
// as in RCU): clusters a discard freed may be reused after that, because no
// request that looked them up earlier can still be reading or writing them.
// Close() makes new requests wait and returns once none is in flight (the
// disk is quiesced, e.g. to switch its layers); Open() lets them in again.
//
// Design: two counters and a phase bit. Enter() increments the counter of
// the current phase and re-checks the phase (and the closed flag); if either
// changed meanwhile it backs out and retries, so a request that proceeds is
// always counted in a phase that a later Synchronize() waits for.
// Synchronize() flips the phase and waits for the old phase's counter to
// drain (futex wait via std::atomic::wait). Enter and Leave are two atomic
// operations on the fast path, no lock and no system call.
//
// Thread-safety: thread-safe. Synchronize() and Close() may be called from
// any thread except one that holds a Pass (it would wait for itself).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>

namespace ploop {

class IoGate {
 public:
  // Proof of entry; leaving happens when it is destroyed.
  class Pass {
   public:
    Pass(Pass&& other) noexcept : gate_(other.gate_), phase_(other.phase_) {
      other.gate_ = nullptr;
    }
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    Pass& operator=(Pass&&) = delete;
    ~Pass() {
      if (gate_ != nullptr) gate_->Leave(phase_);
    }

   private:
    friend class IoGate;
    Pass(IoGate* gate, uint32_t phase) : gate_(gate), phase_(phase) {}
    IoGate* gate_;
    uint32_t phase_;
  };

  IoGate() = default;
  IoGate(const IoGate&) = delete;
  IoGate& operator=(const IoGate&) = delete;

  // Enters; waits while the gate is closed.
  Pass Enter();
  // Enters unless the gate is closed (nullopt then), never waiting: for a
  // thread that must not block while requests it holds passes for are in
  // flight (an event loop).
  std::optional<Pass> TryEnter();
  // Returns once every request that entered before this call has left.
  void Synchronize();
  // New Enter()s wait until Open(); returns when no request is in flight.
  void Close();
  void Open();

  // Requests in flight now (for status reports; racy by nature).
  uint32_t in_flight() const;

 private:
  void Leave(uint32_t phase);
  void WaitDrained(uint32_t phase);

  std::atomic<uint32_t> phase_{0};
  std::atomic<uint32_t> count_[2] = {0, 0};
  std::atomic<uint32_t> closed_{0};
  // Serialises Synchronize() and Close(): a phase is flipped by one at a time.
  std::mutex sync_mu_;
};

}  // namespace ploop
