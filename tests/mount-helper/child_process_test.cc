// ChildProcess: output collected line by line, exit status, a missing
// program, cancellation, and the two-way report channel.
#include "mount-helper/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <mutex>

#include "test_support.h"

namespace ploop::mount {
namespace {

struct Collected {
  std::mutex mu;
  std::vector<std::string> out, err, report;

  ChildProcess::LineFn Fn() {
    return [this](ChildStream s, std::string_view line) {
      std::lock_guard lock(mu);
      (s == ChildStream::kStdout   ? out
       : s == ChildStream::kStderr ? err
                                   : report)
          .emplace_back(line);
    };
  }
};

TEST_SUITE_BEGIN("posix");

TEST_CASE("stdout and stderr arrive as lines and the exit status is reported") {
  Collected c;
  SpawnOptions o;
  o.argv = {"sh", "-c", "echo one; echo two >&2; printf 'no newline'; exit 3"};
  o.capture_stdout = true;
  REQUIRE_ASSIGN(auto child, ChildProcess::Spawn(o, c.Fn()));
  ChildExit exit = child->Wait();
  child.reset();
  CHECK_FALSE(exit.ok());
  CHECK_FALSE(exit.signaled);
  CHECK(exit.code == 3);
  CHECK(c.out == std::vector<std::string>{"one", "no newline"});
  CHECK(c.err == std::vector<std::string>{"two"});
}

TEST_CASE("a program that does not exist is NotFound") {
  SpawnOptions o;
  o.argv = {"/nonexistent/ploop-no-such-program"};
  auto child = ChildProcess::Spawn(o, {});
  CHECK(child.error().code() == StatusCode::kNotFound);
  CHECK(FindProgram("ploop-no-such-program-anywhere").empty());
  CHECK_FALSE(FindProgram("sh").empty());
}

TEST_CASE("a readable cancel descriptor stops the child with SIGTERM") {
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  SpawnOptions o;
  o.argv = {"sleep", "600"};
  REQUIRE_ASSIGN(auto child, ChildProcess::Spawn(o, {}));
  REQUIRE(::write(p[1], "x", 1) == 1);
  ChildExit exit = child->Wait(p[0]);
  CHECK(exit.cancelled);
  CHECK(exit.signaled);
  CHECK(exit.code == SIGTERM);
  CHECK(child->exited());
  ::close(p[0]);
  ::close(p[1]);
}

TEST_CASE("the report channel carries lines both ways") {
  Collected c;
  SpawnOptions o;
  o.argv = {"sh", "-c", "echo hello >&3; read x <&3; echo \"got $x\" >&3"};
  o.report_fd = 3;
  REQUIRE_ASSIGN(auto child, ChildProcess::Spawn(o, c.Fn()));
  REQUIRE_OK(child->SendToChild("ping\n"));
  ChildExit exit = child->Wait();
  child.reset();
  CHECK(exit.ok());
  CHECK(c.report == std::vector<std::string>{"hello", "got ping"});
}

TEST_CASE("environment variables can be removed for the child") {
  Collected c;
  ::setenv("PLOOP_TEST_DROPPED", "1", 1);
  ::setenv("PLOOP_TEST_KEPT", "2", 1);
  SpawnOptions o;
  o.argv = {"sh", "-c", "echo \"${PLOOP_TEST_DROPPED:-unset} ${PLOOP_TEST_KEPT:-unset}\""};
  o.capture_stdout = true;
  o.unset_env = {"PLOOP_TEST_DROPPED"};
  REQUIRE_ASSIGN(auto child, ChildProcess::Spawn(o, c.Fn()));
  CHECK(child->Wait().ok());
  child.reset();
  CHECK(c.out == std::vector<std::string>{"unset 2"});
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::mount
