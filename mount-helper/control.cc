#include "mount-helper/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace ploop::mount {

namespace {

constexpr size_t kMaxLineBytes = 1 << 20;

Result<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    return Status::InvalidArgument("socket path too long: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

Status SendAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "send");
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

// Reads up to a newline; `pending` keeps what came after it. Returns false
// at EOF (or error, or an over-long line).
bool ReadLine(int fd, std::string& pending, std::string* line, int timeout_ms) {
  for (;;) {
    size_t nl = pending.find('\n');
    if (nl != std::string::npos) {
      *line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      return true;
    }
    if (pending.size() > kMaxLineBytes) return false;
    if (timeout_ms >= 0) {
      pollfd p = {fd, POLLIN, 0};
      int r = ::poll(&p, 1, timeout_ms);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
    }
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    pending.append(buf, static_cast<size_t>(n));
  }
}

}  // namespace

Json ErrorReply(const Status& status) {
  return Json{{"ok", false},
              {"code", std::string(StatusCodeName(status.code()))},
              {"error", status.message()}};
}

Status ReplyStatus(const Json& reply) {
  if (reply.is_object() && reply.value("ok", false)) return Status::Ok();
  std::string code = reply.is_object() ? reply.value("code", "") : "";
  std::string message =
      reply.is_object() ? reply.value("error", "malformed reply") : "malformed reply";
  if (code == "NotFound") return Status::NotFound(message);
  if (code == "InvalidArgument") return Status::InvalidArgument(message);
  if (code == "Busy") return Status::Busy(message);
  if (code == "NotSupported") return Status::NotSupported(message);
  if (code == "FailedPrecondition") return Status::FailedPrecondition(message);
  if (code == "NoSpace") return Status::NoSpace(message);
  if (code == "Corruption") return Status::Corruption(message);
  return Status::FromErrno(EIO, message);
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& path,
                                                            Handler handler) {
  ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "create control socket");
  ::unlink(path.c_str());  // a socket file a dead daemon left behind
  // Created 0600 from the start: no window where others could connect.
  mode_t old = ::umask(0177);
  int rc = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::umask(old);
  if (rc != 0 || ::listen(fd, 16) != 0) {
    if (rc == 0) err = errno;
    ::close(fd);
    return Status::FromErrno(err, "bind control socket " + path);
  }
  std::unique_ptr<ControlServer> server(new ControlServer());
  server->path_ = path;
  server->handler_ = std::move(handler);
  server->listen_fd_ = fd;
  server->acceptor_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  return server;
}

ControlServer::~ControlServer() { Stop(); }

void ControlServer::AcceptLoop() {
  while (!stopping_.load()) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopping_.load()) return;
      continue;
    }
    std::lock_guard lock(mu_);
    if (stopping_.load()) {
      ::close(fd);
      return;
    }
    connection_fds_.push_back(fd);
    std::thread([this, fd] { Serve(fd); }).detach();
  }
}

void ControlServer::Serve(int fd) {
  ucred cred = {};
  socklen_t len = sizeof cred;
  bool allowed = ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 &&
                 (cred.uid == 0 || cred.uid == ::getuid());
  std::string pending, line;
  while (allowed && ReadLine(fd, pending, &line, -1)) {
    Json request = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    Json reply;
    if (!request.is_object() || !request.contains("cmd") || !request["cmd"].is_string()) {
      reply = ErrorReply(Status::InvalidArgument("a request is a JSON object with a \"cmd\""));
    } else {
      reply = handler_(request);
    }
    if (!SendAll(fd, reply.dump() + "\n").ok()) break;
  }
  std::lock_guard lock(mu_);
  // Stop() may already have shut it down; closing is ours.
  std::erase(connection_fds_, fd);
  ::close(fd);
  done_.notify_all();
}

void ControlServer::Stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::unique_lock lock(mu_);
    for (int fd : connection_fds_) ::shutdown(fd, SHUT_RDWR);
    done_.wait(lock, [&] { return connection_fds_.empty(); });
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  ::unlink(path_.c_str());
}

Result<Json> ControlCall(const std::string& path, const Json& request, int timeout_ms) {
  ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "create socket");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, "connect to the daemon at " + path);
  }
  TRY_CTX(SendAll(fd, request.dump() + "\n"), "talk to the daemon at " + path);
  std::string pending, line;
  if (!ReadLine(fd, pending, &line, timeout_ms)) {
    return Status::FromErrno(EIO, "no reply from the daemon at " + path);
  }
  Json reply = Json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!reply.is_object()) return Status::FromErrno(EIO, "malformed reply from " + path);
  return reply;
}

}  // namespace ploop::mount
