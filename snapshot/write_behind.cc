#include "snapshot/write_behind.h"

#include <algorithm>
#include <utility>

namespace ploop::stream {

WriteBehind::WriteBehind(uint64_t max_queued_bytes, unsigned threads)
    : max_queued_bytes_(max_queued_bytes) {
  for (unsigned i = 0; i < std::max(threads, 1u); ++i) threads_.emplace_back([this] { Loop(); });
}

WriteBehind::~WriteBehind() {
  {
    std::unique_lock lock(mu_);
    room_.wait(lock, [&] { return queue_.empty() && running_.empty(); });
    stop_ = true;
  }
  work_.notify_all();
  for (auto& t : threads_) t.join();
}

Status WriteBehind::Write(BlockFile& file, uint64_t offset, std::span<const std::byte> data) {
  std::unique_lock lock(mu_);
  // One write larger than the bound still goes, alone.
  room_.wait(lock, [&] {
    return !failed_.ok() || queued_bytes_ == 0 || queued_bytes_ + data.size() <= max_queued_bytes_;
  });
  if (!failed_.ok()) return failed_;
  queue_.push_back(Item{next_seq_++, &file, offset, data, {}});
  queued_bytes_ += data.size();
  work_.notify_all();
  return Status::Ok();
}

void WriteBehind::After(std::function<void()> fn) {
  std::lock_guard lock(mu_);
  queue_.push_back(Item{next_seq_++, nullptr, 0, {}, std::move(fn)});
  work_.notify_all();
}

Status WriteBehind::Drain() {
  std::unique_lock lock(mu_);
  room_.wait(lock, [&] { return queue_.empty() && running_.empty(); });
  return failed_;
}

bool WriteBehind::MayStart(const Item& item) const {
  for (const auto& [seq, other] : running_) {
    if (seq >= item.seq) break;
    // An After() function follows everything before it; a write follows
    // only the earlier writes it overlaps.
    if (item.file == nullptr) return false;
    if (other->file == item.file && other->offset < item.offset + item.data.size() &&
        item.offset < other->offset + other->data.size()) {
      return false;
    }
  }
  return true;
}

void WriteBehind::Loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_, and nothing left
    Item item = std::move(queue_.front());
    queue_.pop_front();
    running_.emplace(item.seq, &item);
    // Taken in order, so whatever this item must wait for was taken by
    // another thread, which does not wait for this one.
    work_.wait(lock, [&] { return MayStart(item); });
    const bool skip = !failed_.ok();
    lock.unlock();
    Status s;
    if (item.file == nullptr) {
      item.fn();
    } else if (!skip) {
      s = item.file->WriteAt(item.offset, item.data);
    }
    lock.lock();
    running_.erase(item.seq);
    if (item.file != nullptr) queued_bytes_ -= item.data.size();
    if (!s.ok() && failed_.ok()) failed_ = std::move(s);
    work_.notify_all();
    room_.notify_all();
  }
}

}  // namespace ploop::stream
