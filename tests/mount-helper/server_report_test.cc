// The plugin's reports to `ploop serve`: every Status survives the trip
// with its code (hence its exit code) and message.
#include "mount-helper/server_report.h"

#include <cerrno>

#include "test_support.h"

namespace ploop::mount {
namespace {

TEST_SUITE_BEGIN("unit");

TEST_CASE("ready - closed and stop are recognised - other lines are not reports") {
  auto ready = ParseServerReport(ReadyReport());
  REQUIRE(ready.has_value());
  CHECK(ready->kind == ServerReport::Kind::kReady);
  auto closed = ParseServerReport(ClosedReport());
  REQUIRE(closed.has_value());
  CHECK(closed->kind == ServerReport::Kind::kClosed);
  CHECK(IsStopRequest(StopRequest()));
  CHECK_FALSE(IsStopRequest("stopped\n"));
  for (const char* junk : {"", "readyx", "error", "error x y z", "error 3", "error 0 0 fine",
                           "error 99 0 unknown code", "error 3 0"}) {
    CAPTURE(junk);
    CHECK_FALSE(ParseServerReport(junk).has_value());
  }
}

TEST_CASE("error and request-failed reports carry the code and the message") {
  const Status cases[] = {
      Status::NotFound("delta {x} (root.hds): no such file"),
      Status::AlreadyExists("a"),
      Status::InvalidArgument("bad guid"),
      Status::Corruption("root.hds: BAT entry 7 points past the end"),
      Status::NotSupported("v1"),
      Status::NoSpace("disk full"),
      Status::Busy("root.hds is in use by another program"),
      Status::FailedPrecondition("snapshot is read-only"),
      Status::FromErrno(EIO, "read BAT"),
      Status::FromErrno(EBADF, ""),
      Status::FromErrno(ENOSPC, "write"),
      Status::Corruption("two\nlines"),
  };
  for (const Status& s : cases) {
    CAPTURE(s.ToString());
    auto failed = ParseServerReport(RequestFailedReport(s));
    REQUIRE(failed.has_value());
    CHECK(failed->kind == ServerReport::Kind::kRequestFailed);
    CHECK(failed->error.code() == s.code());
    std::string line = ErrorReport(s);
    CHECK(line.back() == '\n');
    CHECK(line.find('\n') == line.size() - 1);
    auto r = ParseServerReport(line);
    REQUIRE(r.has_value());
    CHECK(r->kind == ServerReport::Kind::kError);
    CHECK(r->error.code() == s.code());
    std::string want = s.message();
    for (char& c : want) {
      if (c == '\n') c = ' ';
    }
    CHECK(r->error.message() == want);
    if (s.code() == StatusCode::kIOError) CHECK(r->error.error_number() == s.error_number());
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
