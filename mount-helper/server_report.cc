#include "mount-helper/server_report.h"

#include <cerrno>
#include <charconv>
#include <cstring>

namespace ploop::mount {

namespace {

// A Status with `code` and `message` (and, for an I/O error, `err`).
Status MakeStatus(StatusCode code, int err, std::string message) {
  switch (code) {
    case StatusCode::kOk:
      break;
    case StatusCode::kNotFound:
      return Status::NotFound(std::move(message));
    case StatusCode::kAlreadyExists:
      return Status::AlreadyExists(std::move(message));
    case StatusCode::kInvalidArgument:
      return Status::InvalidArgument(std::move(message));
    case StatusCode::kCorruption:
      return Status::Corruption(std::move(message));
    case StatusCode::kNotSupported:
      return Status::NotSupported(std::move(message));
    case StatusCode::kNoSpace:
      return Status::NoSpace(std::move(message));
    case StatusCode::kBusy:
      return Status::Busy(std::move(message));
    case StatusCode::kFailedPrecondition:
      return Status::FailedPrecondition(std::move(message));
    case StatusCode::kIOError: {
      // FromErrno() appends strerror(err); the sender cut it off.
      Status s = Status::FromErrno(err != 0 ? err : EIO, message);
      if (s.code() == StatusCode::kIOError) return s;
      break;
    }
  }
  return Status::FromErrno(EIO, message);
}

bool ParseInt(std::string_view& text, int* out) {
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, *out);
  if (ec != std::errc() || p == end || *p != ' ') return false;
  text.remove_prefix(p - text.data() + 1);
  return true;
}

}  // namespace

std::string ReadyReport() { return "ready\n"; }

std::string ClosedReport() { return "closed\n"; }

std::string StopRequest() { return "stop\n"; }

bool IsStopRequest(std::string_view line) {
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  return line == "stop";
}

namespace {

std::string StatusReport(std::string_view word, const Status& status) {
  std::string message = status.message();
  const int err = status.error_number();
  if (status.code() == StatusCode::kIOError && err != 0) {
    const std::string suffix = std::strerror(err);
    if (message == suffix) {
      message.clear();
    } else if (message.size() > suffix.size() + 2 &&
               message.compare(message.size() - suffix.size() - 2, std::string::npos,
                               ": " + suffix) == 0) {
      message.resize(message.size() - suffix.size() - 2);
    }
  }
  for (char& c : message) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return std::string(word) + " " + std::to_string(static_cast<int>(status.code())) + " " +
         std::to_string(err) + " " + message + "\n";
}

}  // namespace

std::string ErrorReport(const Status& status) { return StatusReport("error", status); }

std::string RequestFailedReport(const Status& status) { return StatusReport("failed", status); }

std::optional<ServerReport> ParseServerReport(std::string_view line) {
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  if (line == "ready") return ServerReport{ServerReport::Kind::kReady, {}};
  if (line == "closed") return ServerReport{ServerReport::Kind::kClosed, {}};
  ServerReport::Kind kind;
  constexpr std::string_view kError = "error ";
  constexpr std::string_view kFailed = "failed ";
  if (line.substr(0, kError.size()) == kError) {
    kind = ServerReport::Kind::kError;
    line.remove_prefix(kError.size());
  } else if (line.substr(0, kFailed.size()) == kFailed) {
    kind = ServerReport::Kind::kRequestFailed;
    line.remove_prefix(kFailed.size());
  } else {
    return std::nullopt;
  }
  int code = 0;
  int err = 0;
  if (!ParseInt(line, &code) || !ParseInt(line, &err)) return std::nullopt;
  if (code <= static_cast<int>(StatusCode::kOk) ||
      code > static_cast<int>(StatusCode::kFailedPrecondition)) {
    return std::nullopt;
  }
  return ServerReport{kind, MakeStatus(static_cast<StatusCode>(code), err, std::string(line))};
}

}  // namespace ploop::mount
