#include "snapshot/write_behind.h"

#include <utility>

namespace ploop::stream {

WriteBehind::WriteBehind(uint64_t max_queued_bytes)
    : max_queued_bytes_(max_queued_bytes), thread_([this] { Loop(); }) {}

WriteBehind::~WriteBehind() {
  {
    std::unique_lock lock(mu_);
    room_.wait(lock, [&] { return queue_.empty() && !busy_; });
    stop_ = true;
  }
  work_.notify_one();
  thread_.join();
}

Status WriteBehind::Write(BlockFile& file, uint64_t offset, std::span<const std::byte> data) {
  std::unique_lock lock(mu_);
  // One write larger than the bound still goes, alone.
  room_.wait(lock, [&] {
    return !failed_.ok() || queued_bytes_ == 0 || queued_bytes_ + data.size() <= max_queued_bytes_;
  });
  if (!failed_.ok()) return failed_;
  queue_.push_back(Item{&file, offset, data, {}});
  queued_bytes_ += data.size();
  work_.notify_one();
  return Status::Ok();
}

void WriteBehind::After(std::function<void()> fn) {
  std::lock_guard lock(mu_);
  queue_.push_back(Item{nullptr, 0, {}, std::move(fn)});
  work_.notify_one();
}

Status WriteBehind::Drain() {
  std::unique_lock lock(mu_);
  room_.wait(lock, [&] { return queue_.empty() && !busy_; });
  return failed_;
}

void WriteBehind::Loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_, and nothing left
    Item item = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    const bool skip = !failed_.ok();
    lock.unlock();
    Status s;
    if (item.file == nullptr) {
      item.fn();
    } else if (!skip) {
      s = item.file->WriteAt(item.offset, item.data);
    }
    lock.lock();
    busy_ = false;
    if (item.file != nullptr) queued_bytes_ -= item.data.size();
    if (!s.ok() && failed_.ok()) failed_ = std::move(s);
    room_.notify_all();
  }
}

}  // namespace ploop::stream
