// NbdServer: the NBD export of a ploop disk (`ploop serve`, and the bridge
// `ploop convert` hands to qemu-img).
//
// The protocol is nbdkit's: we run the nbdkit server with our plugin
// (mount-helper/nbdkit/, nbdkit-ploop-plugin.so), which opens the disk and
// serves it through a BlockExport. nbdkit does the fixed newstyle
// handshake, NBD_OPT_GO/INFO, structured replies, block status, FLUSH,
// TRIM, WRITE_ZEROES (with FAST_ZERO), FUA and many clients at once; the
// plugin answers with the disk's contents and allocation. NbdServer is the
// supervisor: it starts nbdkit as a child (foreground, exiting with us),
// waits until it listens, relays its messages, and stops it: the plugin
// flushes and closes the disk (clean flag set) and reports back, then
// nbdkit is ended (see nbd_server.cc for why this order). Errors of opening or closing the disk
// come back as the same Status they would have been in-process (server_report.h).
//
// Finding the pieces: nbdkit is $PLOOP_NBDKIT or `nbdkit` in PATH; the
// plugin is $PLOOP_NBDKIT_PLUGIN, or beside the running executable (the
// build tree), or in the install tree relative to it, or in the configured
// install location.
//
// Thread-safety: an NbdServer is used by one thread; the log callback runs
// on a helper thread.
// Ownership: the destructor stops a server still running.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mount-helper/child_process.h"
#include "ploop/status.h"

namespace ploop::mount {

struct NbdServeOptions {
  // A DiskDescriptor.xml, the folder holding one, or a single ploop image.
  std::string disk_path;
  // Serve the chain ending at this snapshot (read-only); empty: the top.
  std::string snapshot_guid;
  bool writable = false;
  // Exactly one of: a Unix socket to create (it must not exist), or a TCP
  // port on `bind_address`.
  std::string socket_path;
  uint16_t port = 0;
  std::string bind_address = "127.0.0.1";
  // Descriptors may name files outside their folder (--allow-outside-files).
  bool allow_outside_files = false;
};

class NbdServer {
 public:
  // Messages nbdkit prints while serving (errors of client requests), one
  // line each, already stripped of nbdkit's prefix.
  using LogFn = std::function<void(std::string_view line)>;

  // Starts serving and returns once clients can connect. Errors:
  //   InvalidArgument  neither or both of socket and port, a socket path
  //                    longer than a socket address holds, a bad address;
  //   AlreadyExists    the socket path exists;
  //   Busy             the port is taken, or the disk is in use;
  //   NotSupported     nbdkit or the plugin is not installed;
  //   the disk's own open errors (NotFound, Corruption, ...).
  static Result<std::unique_ptr<NbdServer>> Start(const NbdServeOptions& options, LogFn on_log);

  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Where clients connect: "nbd+unix:///?socket=PATH" or
  // "nbd://ADDR:PORT/" (an IPv6 address in brackets).
  const std::string& uri() const { return uri_; }
  // nbdkit's pid (for tests and diagnostics).
  int pid() const;
  // The first client request that failed (the disk's error, e.g. NoSpace
  // for a full host file system), if any: why a client gave up.
  std::optional<Status> first_request_error() const;

  // Serves until `stop_fd` becomes readable (then stops the server) or the
  // server ends by itself. Returns the status of closing the disk: OK when
  // it was flushed and closed cleanly; the close's error; or IOError when
  // nbdkit died without closing it (the disk is then left marked in use,
  // and the next writable open repairs it).
  Status Wait(int stop_fd);
  // Stops the server now; as Wait().
  Status Stop();

 private:
  NbdServer() = default;
  // Asks the plugin to close the disk; once it has, nbdkit is killed.
  void RequestStop();
  Status Finish(const ChildExit& exit);

  struct Shared;
  std::shared_ptr<Shared> shared_;
  std::unique_ptr<ChildProcess> child_;
  std::string uri_;
  std::string socket_path_;  // removed when the server ends
  bool finished_ = false;
  Status final_;
};

// The plugin NbdServer runs: $PLOOP_NBDKIT_PLUGIN, or the first that exists
// of the candidates listed at the top of this file. NotSupported (naming
// where it looked) when there is none.
Result<std::string> FindNbdkitPlugin();

// "nbd+unix:///?socket=PATH" / "nbd://ADDR:PORT/".
std::string NbdUnixUri(const std::string& socket_path);
std::string NbdTcpUri(const std::string& address, uint16_t port);

}  // namespace ploop::mount
