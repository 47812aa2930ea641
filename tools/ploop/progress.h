// Progress display for long-running commands, on stderr only:
//   - on a terminal (the default): one line, redrawn at most ten times a
//     second and erased when done: "<prefix>310 MiB/1.2 GiB, 95.2 MiB/s,
//     ETA 0:12";
//   - --progress=json: one JSON object per line for tools, about twice a
//     second and once at the end:
//       {"phase":"transfer","done_bytes":N,"total_bytes":N,
//        "bytes_per_second":N,"eta_seconds":N[,"stream_bytes":N]}
//   - otherwise (stderr not a terminal, or --progress=none): nothing.
//
// Thread-safety: not thread-safe; call from one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ploop::cli {

enum class ProgressMode { kAuto, kNone, kJson };

// "auto", "none" or "json"; nullopt otherwise.
std::optional<ProgressMode> ParseProgressMode(std::string_view text);

struct ProgressSample {
  std::string_view phase = "transfer";  // json "phase"
  uint64_t done_bytes = 0;
  uint64_t total_bytes = 0;
  std::string_view prefix;  // terminal line: text before the byte counts
  std::optional<uint64_t> stream_bytes;
};

class ProgressBar {
 public:
  explicit ProgressBar(ProgressMode mode = ProgressMode::kAuto);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Shows `sample` unless the last update was too recent (a new phase is
  // always shown).
  void Update(const ProgressSample& sample);
  // Erases the terminal line; in json mode prints the last sample once more
  // (so tools see the final state).
  void Finish();
  // Whether anything is shown at all.
  bool enabled() const { return mode_ != ProgressMode::kNone; }

 private:
  using Clock = std::chrono::steady_clock;
  // Draws or prints one sample.
  void Show(uint64_t done, uint64_t total, std::string_view prefix,
            std::optional<uint64_t> stream_bytes);
  void Erase();

  ProgressMode mode_;
  Clock::time_point last_;
  bool shown_ = false;
  std::string phase_;
  // Rates are over the current phase: done_bytes when it started, and when.
  uint64_t first_done_ = 0;
  Clock::time_point phase_start_;
  // The last sample, for Finish().
  bool have_last_ = false;
  uint64_t last_done_ = 0;
  uint64_t last_total_ = 0;
  std::optional<uint64_t> last_stream_;
};

}  // namespace ploop::cli
