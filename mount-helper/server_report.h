// The reports our nbdkit plugin sends to `ploop serve` (NbdServer), one
// line each, on a socket the server inherits:
//
//   ready                        the socket listens; clients may connect
//   error CODE ERRNO MESSAGE     opening or closing the disk failed
//   failed CODE ERRNO MESSAGE    a client's request failed (the server
//                                goes on; a supervisor running a client,
//                                like convert, can tell why it failed)
//   closed                       the disk was flushed and closed cleanly
//
// and the one request going the other way:
//
//   stop                         close the disk now (clients still
//                                connected get ESHUTDOWN from then on)
//
// The plugin treats the end of the channel (the supervisor died) as
// "stop" too.
//
// CODE is the StatusCode number and ERRNO the Status's errno (0 if none),
// so the error reaches the CLI as the same Status -- and the same exit code
// -- it would have had in-process. nbdkit's own messages on stderr are for
// people; these are for the supervisor.
//
// Thread-safety: functions; no shared state.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "ploop/status.h"

namespace ploop::mount {

struct ServerReport {
  enum class Kind { kReady, kError, kRequestFailed, kClosed };
  Kind kind = Kind::kReady;
  Status error;  // for kError and kRequestFailed
};

// Each returns one line, newline included.
std::string ReadyReport();
std::string ErrorReport(const Status& status);
std::string RequestFailedReport(const Status& status);
std::string ClosedReport();

// The supervisor's request to stop, newline included.
std::string StopRequest();
bool IsStopRequest(std::string_view line);

// nullopt for a line that is not a report.
std::optional<ServerReport> ParseServerReport(std::string_view line);

}  // namespace ploop::mount
