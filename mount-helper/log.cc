#include "mount-helper/log.h"

#include <fcntl.h>
#include <signal.h>
#include <syslog.h>
#include <unistd.h>

#include <cstring>
#include <ctime>
#include <mutex>

namespace ploop::mount {

namespace {

std::mutex g_mu;
int g_fd = -1;  // the log file; read by the crash handler without the lock
std::string g_tag;
// A preformatted prefix for the crash handler, which may not allocate.
char g_crash_prefix[256] = "ploop: ";

void Write(int priority, std::string_view message) {
  char when[32];
  std::time_t now = std::time(nullptr);
  std::tm tm;
  gmtime_r(&now, &tm);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::lock_guard lock(g_mu);
  std::string line = std::string(when) + " ploop[" + std::to_string(::getpid()) + "] ";
  if (!g_tag.empty()) line += g_tag + ": ";
  line += message;
  line += '\n';
  if (g_fd >= 0) (void)!::write(g_fd, line.data(), line.size());
  std::string for_syslog =
      g_tag.empty() ? std::string(message) : g_tag + ": " + std::string(message);
  ::syslog(priority, "%s", for_syslog.c_str());
}

void OnFatalSignal(int sig) {
  // Async-signal-safe only: write(2) of preformatted bytes.
  const char* name = sig == SIGSEGV   ? "SIGSEGV"
                     : sig == SIGBUS  ? "SIGBUS"
                     : sig == SIGABRT ? "SIGABRT"
                     : sig == SIGFPE  ? "SIGFPE"
                                      : "SIGILL";
  const char tail[] = ": the daemon crashed; the disk was not closed cleanly\n";
  if (g_fd >= 0) {
    (void)!::write(g_fd, g_crash_prefix, std::strlen(g_crash_prefix));
    (void)!::write(g_fd, name, std::strlen(name));
    (void)!::write(g_fd, tail, sizeof tail - 1);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void UpdateCrashPrefix() {
  std::string prefix = "ploop[" + std::to_string(::getpid()) + "] ";
  if (!g_tag.empty()) prefix += g_tag + ": ";
  std::strncpy(g_crash_prefix, prefix.c_str(), sizeof g_crash_prefix - 1);
}

}  // namespace

void OpenLog(const std::string& file) {
  ::openlog("ploop", LOG_PID | LOG_NDELAY, LOG_DAEMON);
  std::lock_guard lock(g_mu);
  if (g_fd >= 0) ::close(g_fd);
  g_fd = ::open(file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  UpdateCrashPrefix();
}

void SetLogTag(const std::string& tag) {
  std::lock_guard lock(g_mu);
  g_tag = tag;
  UpdateCrashPrefix();
}

void LogInfo(std::string_view message) { Write(LOG_INFO, message); }
void LogError(std::string_view message) { Write(LOG_ERR, message); }

void InstallCrashLogger() {
  struct sigaction sa = {};
  sa.sa_handler = OnFatalSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL}) ::sigaction(sig, &sa, nullptr);
}

}  // namespace ploop::mount
