// The mount daemon's control socket: how `ploop` talks to a running daemon.
//
// Transport: a unix stream socket, <run dir>/daemons/PID/control, mode
// 0600 in a 0700 root-owned folder; the server also checks the peer's
// credentials (SO_PEERCRED) and answers only uid 0 (or its own uid).
//
// Protocol (version 1): request/response, one JSON object per line (UTF-8,
// '\n'-terminated, at most 1 MiB). A connection may carry several requests;
// each gets exactly one response, in order.
//
//   request   {"cmd": "NAME", ...arguments}
//   success   {"ok": true, ...results}
//   failure   {"ok": false, "code": "Busy", "error": "one line"}
//             (code: a StatusCode name: NotFound, InvalidArgument, Busy, ...)
//
// Commands of the daemon (daemon.cc):
//   status   -> {"ok":true, "protocol":1, "pid", "device", "descriptor",
//               "guid", "read_only", "images":[...], "size_bytes",
//               "cluster_bytes", "direct_io", "rss_bytes", "peak_rss_bytes",
//               "cpu_seconds", "threads", "uptime_seconds",
//               "counters":{reads, writes, discards, flushes, bytes_read,
//               bytes_written, allocations, errors, in_flight}}
//   stop     -> {"ok":true}: detaches the loop device (at once, or when its
//               last user closes it); the daemon then flushes, marks the
//               image clean and exits.
//   snapshot {"guid"?} -> {"ok":true, "guid", "images", "pause_ms",
//               "freeze_ms", "switch_ms", "frozen":[mountpoints]}: the
//               device's file system frozen around the switch to a new top
//   grow     {"size_bytes"} -> {"ok":true, "size_bytes", "mountpoints"}:
//               the disk, the FUSE file and the loop device grown (the
//               caller then grows the file system)
//   merge    {"guid"} -> {"ok":true, "guid", "images"}: a snapshot below
//               the top merged into its parent
// (The layer and descriptor steps of the last three are the daemon's
// OnlineOperations, daemon.h; they run one at a time.) An unknown command
// gets {"ok":false,"code":"NotSupported",...}.
//
// Thread-safety: ControlServer runs its own threads (one per connection);
// the handler must be thread-safe. ControlCall is a plain function.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "ploop/status.h"

namespace ploop::mount {

using Json = nlohmann::json;

// {"ok": false, "code": ..., "error": ...} for a failed Status.
Json ErrorReply(const Status& status);
// The Status a reply stands for (OK for {"ok": true}).
Status ReplyStatus(const Json& reply);

class ControlServer {
 public:
  using Handler = std::function<Json(const Json& request)>;

  // Binds `path` (replacing a stale socket file), 0600, and serves requests
  // with `handler` until Stop().
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& path, Handler handler);
  ~ControlServer();
  // Stops accepting, closes open connections, joins the threads, removes
  // the socket file.
  void Stop();

 private:
  ControlServer() = default;
  void AcceptLoop();
  void Serve(int fd);

  std::string path_;
  Handler handler_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  // Connections run on detached threads; Stop() shuts their sockets down
  // and waits until none is left.
  std::mutex mu_;
  std::condition_variable done_;
  std::vector<int> connection_fds_;
};

// Sends one request to the socket at `path` and returns the reply (which
// may itself say ok:false). IOError/NotFound when the daemon cannot be
// reached; the wait for the reply is bounded by `timeout_ms`.
Result<Json> ControlCall(const std::string& path, const Json& request, int timeout_ms = 30000);

}  // namespace ploop::mount
