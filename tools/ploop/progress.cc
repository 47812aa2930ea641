#include "progress.h"

#include <unistd.h>

#include <cstdio>

#include "units.h"

namespace ploop::cli {

std::optional<ProgressMode> ParseProgressMode(std::string_view text) {
  if (text == "auto") return ProgressMode::kAuto;
  if (text == "none") return ProgressMode::kNone;
  if (text == "json") return ProgressMode::kJson;
  return std::nullopt;
}

ProgressBar::ProgressBar(ProgressMode mode) : mode_(mode), phase_start_(Clock::now()) {
  if (mode_ == ProgressMode::kAuto && ::isatty(STDERR_FILENO) != 1) mode_ = ProgressMode::kNone;
}

ProgressBar::~ProgressBar() { Erase(); }

void ProgressBar::Update(const ProgressSample& s) {
  if (mode_ == ProgressMode::kNone) return;
  const auto now = Clock::now();
  const bool new_phase = !have_last_ || s.phase != phase_;
  if (new_phase) {
    phase_ = std::string(s.phase);
    first_done_ = s.done_bytes;
    phase_start_ = now;
  }
  have_last_ = true;
  last_done_ = s.done_bytes;
  last_total_ = s.total_bytes;
  last_stream_ = s.stream_bytes;
  const auto min_gap = mode_ == ProgressMode::kJson ? std::chrono::milliseconds(500)
                                                    : std::chrono::milliseconds(100);
  if (shown_ && !new_phase && now - last_ < min_gap) return;
  last_ = now;
  Show(s.done_bytes, s.total_bytes, s.prefix, s.stream_bytes);
}

void ProgressBar::Show(uint64_t done, uint64_t total, std::string_view prefix,
                       std::optional<uint64_t> stream_bytes) {
  shown_ = true;
  const double seconds = std::chrono::duration<double>(Clock::now() - phase_start_).count();
  const uint64_t moved = done >= first_done_ ? done - first_done_ : 0;
  const double rate = seconds > 0.05 ? static_cast<double>(moved) / seconds : 0;
  const uint64_t left = total > done ? total - done : 0;
  const long eta = rate > 0 ? static_cast<long>(static_cast<double>(left) / rate + 0.5) : -1;
  if (mode_ == ProgressMode::kJson) {
    std::fprintf(stderr,
                 "{\"phase\":\"%s\",\"done_bytes\":%llu,\"total_bytes\":%llu,"
                 "\"bytes_per_second\":%llu,\"eta_seconds\":%ld",
                 phase_.c_str(), static_cast<unsigned long long>(done),
                 static_cast<unsigned long long>(total), static_cast<unsigned long long>(rate),
                 eta);
    if (stream_bytes) {
      std::fprintf(stderr, ",\"stream_bytes\":%llu",
                   static_cast<unsigned long long>(*stream_bytes));
    }
    std::fprintf(stderr, "}\n");
    std::fflush(stderr);
    return;
  }
  std::string line(prefix);
  line += HumanSize(done) + "/" + HumanSize(total) + ", " + HumanSize(static_cast<uint64_t>(rate)) +
          "/s";
  if (eta >= 0 && left > 0) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), ", ETA %ld:%02ld", eta / 60, eta % 60);
    line += buf;
  }
  std::fprintf(stderr, "\r%s\033[K", line.c_str());
  std::fflush(stderr);
}

void ProgressBar::Finish() {
  if (mode_ == ProgressMode::kJson && have_last_) Show(last_done_, last_total_, {}, last_stream_);
  Erase();
}

void ProgressBar::Erase() {
  if (mode_ != ProgressMode::kAuto || !shown_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  shown_ = false;
}

}  // namespace ploop::cli
