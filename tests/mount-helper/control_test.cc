// The daemon's control socket (request/response JSON lines) and the mount
// records, without root: a socket in a temporary folder, records under a
// temporary run dir.
#include "mount-helper/control.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <thread>

#include "mount-helper/records.h"
#include "test_support.h"

namespace ploop::mount {
namespace {

using testing::TempDir;

Json Echo(const Json& request) {
  if (request["cmd"] == "status") return Json{{"ok", true}, {"pid", 42}};
  if (request["cmd"] == "fail") return ErrorReply(Status::Busy("in use"));
  return ErrorReply(Status::NotSupported("unknown command"));
}

TEST_SUITE_BEGIN("posix");

TEST_CASE("control socket: requests get one reply each - errors carry their code") {
  TempDir dir;
  const std::string path = dir / "control";
  REQUIRE_ASSIGN(auto server, ControlServer::Start(path, Echo));
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  REQUIRE_ASSIGN(Json reply, ControlCall(path, Json{{"cmd", "status"}}));
  CHECK(reply["ok"] == true);
  CHECK(reply["pid"] == 42);
  REQUIRE_ASSIGN(reply, ControlCall(path, Json{{"cmd", "fail"}}));
  CHECK(reply["ok"] == false);
  CHECK(reply["code"] == "Busy");
  Status s = ReplyStatus(reply);
  CHECK(s.code() == StatusCode::kBusy);
  CHECK(s.message() == "in use");
  REQUIRE_ASSIGN(reply, ControlCall(path, Json{{"cmd", "frobnicate"}}));
  CHECK(ReplyStatus(reply).code() == StatusCode::kNotSupported);
  // Not an object with "cmd": InvalidArgument, and the connection goes on.
  REQUIRE_ASSIGN(reply, ControlCall(path, Json::array({1, 2})));
  CHECK(ReplyStatus(reply).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("control socket: several requests on one connection - concurrent clients - stop") {
  TempDir dir;
  const std::string path = dir / "control";
  std::atomic<int> calls{0};
  REQUIRE_ASSIGN(auto server, ControlServer::Start(path, [&](const Json& r) {
                   calls.fetch_add(1);
                   return Echo(r);
                 }));
  // One connection, three requests in one write, replies in order.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  std::string requests = "{\"cmd\":\"status\"}\n{\"cmd\":\"fail\"}\nnot json\n";
  REQUIRE(::write(fd, requests.data(), requests.size()) == static_cast<ssize_t>(requests.size()));
  std::string got;
  char buf[512];
  while (std::count(got.begin(), got.end(), '\n') < 3) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    REQUIRE(n > 0);
    got.append(buf, n);
  }
  ::close(fd);
  size_t a = got.find('\n'), b = got.find('\n', a + 1);
  CHECK(Json::parse(got.substr(0, a))["ok"] == true);
  CHECK(Json::parse(got.substr(a + 1, b - a - 1))["code"] == "Busy");
  CHECK(Json::parse(got.substr(b + 1))["code"] == "InvalidArgument");

  std::vector<std::thread> clients;
  std::atomic<int> good{0};
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&] {
      for (int k = 0; k < 20; ++k) {
        auto r = ControlCall(path, Json{{"cmd", "status"}});
        if (r.ok() && (*r)["ok"] == true) good.fetch_add(1);
      }
    });
  }
  for (auto& t : clients) t.join();
  CHECK(good.load() == 160);
  CHECK(calls.load() == 162);

  server->Stop();
  CHECK(::access(path.c_str(), F_OK) != 0);  // the socket file is gone
  auto after = ControlCall(path, Json{{"cmd", "status"}});
  CHECK_FALSE(after.ok());
}

TEST_CASE("mount records: JSON round trip - bad records refused - written and removed") {
  TempDir dir;
  ::setenv("PLOOP_RUN_DIR", dir.path().c_str(), 1);
  MountRecord r;
  r.device = "/dev/loop7";
  r.descriptor = "/srv/ct/DiskDescriptor.xml";
  r.guid = "{11111111-2222-3333-4444-555555555555}";
  r.images = {"/srv/ct/root.hds", "/srv/ct/root.hds.{5fbaabe3-6958-40ff-92a7-860e329aab41}"};
  r.read_only = true;
  r.kind = "fuse";
  r.pid = 1234;
  r.pid_start = 98765;
  r.socket = "/run/ploop/daemons/1234/control";
  r.fuse_file = "/run/ploop/daemons/1234/disk";
  r.work_dir = "/run/ploop/daemons/1234";
  r.created = 1700000000;
  REQUIRE_ASSIGN(MountRecord back, RecordFromJson(RecordToJson(r)));
  CHECK(back == r);
  CHECK(back.top() == r.images.back());

  CHECK_FALSE(RecordFromJson("[]").ok());
  CHECK_FALSE(
      RecordFromJson("{\"device\": \"/dev/sda\", \"images\": [\"x\"], \"kind\": \"fuse\"}").ok());
  CHECK_FALSE(
      RecordFromJson("{\"device\": \"/dev/loop1\", \"images\": [], \"kind\": \"fuse\"}").ok());
  CHECK_FALSE(
      RecordFromJson("{\"device\": \"/dev/loop1\", \"images\": [\"x\"], \"kind\": \"nbd\"}").ok());
  CHECK_FALSE(RecordFromJson("not json at all").ok());

  REQUIRE_OK(WriteRecord(r));
  auto records = ReadRecords();
  REQUIRE(records.size() == 1);
  CHECK(records[0] == r);
  // Nothing is attached to loop7 here: the record is stale.
  CHECK(Health(records[0]) == MountHealth::kStale);
  // The device was reused: the record now describes another mount, which
  // the old one's removal must not touch.
  MountRecord next = r;
  next.pid = 5678;
  REQUIRE_OK(WriteRecord(next));
  CHECK(RemoveRecord(r).code() == StatusCode::kNotFound);
  REQUIRE(ReadRecords().size() == 1);
  REQUIRE_OK(RemoveRecord(next));
  CHECK(ReadRecords().empty());
  CHECK(RemoveRecord(next).code() == StatusCode::kNotFound);
  ::unsetenv("PLOOP_RUN_DIR");
}

TEST_CASE("process liveness: this process is alive - a pid with another start time is not") {
  const int pid = static_cast<int>(::getpid());
  uint64_t start = ProcessStartTime(pid);
  REQUIRE(start != 0);
  CHECK(ProcessAlive(pid, start));
  CHECK_FALSE(ProcessAlive(pid, start + 1));
  CHECK_FALSE(ProcessAlive(0, 0));
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
