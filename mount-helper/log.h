// Log: where the mount daemon's messages go once it has no terminal --
// syslog (facility daemon, ident "ploop") and a log file, one line per
// message, written with one write(2) each (O_APPEND), so lines of several
// daemons sharing the file never interleave.
//
// A line: "2024-06-12T10:11:12Z ploop[1234] /dev/loop3: message".
//
// Fatal signals (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL) are logged by
// InstallCrashLogger() before the process dies, so a daemon never vanishes
// without a trace (SIGKILL aside, which `ploop list` shows as a dead daemon).
//
// Thread-safety: all functions are thread-safe.
#pragma once

#include <string>
#include <string_view>

namespace ploop::mount {

// Opens syslog and `file` (created 0600, appended to). `tag` goes in front
// of every message (the device, once known). Never fails: a log file that
// cannot be opened leaves syslog alone.
void OpenLog(const std::string& file);
void SetLogTag(const std::string& tag);
void LogInfo(std::string_view message);
void LogError(std::string_view message);

// Logs fatal signals (async-signal-safe) and lets them kill the process.
void InstallCrashLogger();

}  // namespace ploop::mount
