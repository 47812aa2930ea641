// IoGate: see io_gate.h. Every access is sequentially consistent: the
// argument that a proceeding request is seen by a later Synchronize() needs
// one total order over "increment count, re-read phase" (Enter) and "flip
// phase, read count" (Synchronize): if Enter re-read the old phase, its
// increment precedes the flip, so Synchronize's read of the counter after
// the flip sees it.
#include "ploop/io_gate.h"

namespace ploop {

IoGate::Pass IoGate::Enter() {
  for (;;) {
    if (std::optional<Pass> pass = TryEnter()) return std::move(*pass);
    closed_.wait(1);  // returns at once if the gate opened meanwhile
  }
}

std::optional<IoGate::Pass> IoGate::TryEnter() {
  for (;;) {
    if (closed_.load() != 0) return std::nullopt;
    uint32_t phase = phase_.load();
    count_[phase].fetch_add(1);
    if (phase_.load() == phase && closed_.load() == 0) return Pass(this, phase);
    Leave(phase);  // the phase flipped (retry) or the gate closed (checked above)
  }
}

void IoGate::Leave(uint32_t phase) {
  if (count_[phase].fetch_sub(1) == 1) count_[phase].notify_all();
}

void IoGate::WaitDrained(uint32_t phase) {
  for (uint32_t c = count_[phase].load(); c != 0; c = count_[phase].load()) {
    count_[phase].wait(c);
  }
}

void IoGate::Synchronize() {
  std::lock_guard lock(sync_mu_);
  uint32_t old = phase_.load();
  phase_.store(old ^ 1);
  WaitDrained(old);
}

void IoGate::Close() {
  std::lock_guard lock(sync_mu_);
  closed_.store(1);
  // Requests that proceeded are counted in the current phase; the other
  // phase holds at most requests backing out. Wait for both.
  WaitDrained(phase_.load());
  WaitDrained(phase_.load() ^ 1);
}

void IoGate::Open() {
  closed_.store(0);
  closed_.notify_all();
}

uint32_t IoGate::in_flight() const { return count_[0].load() + count_[1].load(); }

}  // namespace ploop
