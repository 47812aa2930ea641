// Shared helpers for the doctest suites: temporary directories, seeded
// random data (the seed is printed when a test fails), REQUIRE_OK that
// prints the error chain, and the skip protocol (exit 77, or a failure
// under CI=true).
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ploop/status.h"

namespace ploop::testing {

inline std::string StatusText(const Status& s) { return s.ToString(); }
template <typename T>
std::string StatusText(const Result<T>& r) {
  return r.error().ToString();
}

// A fresh directory under $TMPDIR (or /tmp), removed with its contents.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Seeded RNG: PLOOP_TEST_SEED fixes the seed; otherwise a random one. The
// seed is printed on stderr, which ctest shows for a failing test.
class TestRng {
 public:
  TestRng();
  uint64_t seed() const { return seed_; }
  uint64_t Uniform(uint64_t lo, uint64_t hi);  // inclusive
  std::vector<std::byte> Bytes(size_t n);
  std::mt19937_64& engine() { return rng_; }

 private:
  uint64_t seed_;
  std::mt19937_64 rng_;
};

std::vector<std::byte> Pattern(size_t n, uint8_t value);

// Ends the test process with exit code 77 (ctest: skipped) explaining why,
// unless CI=true, where a missing prerequisite is a failure.
[[noreturn]] void Skip(const std::string& why);
bool InCi();

}  // namespace ploop::testing

#define REQUIRE_OK(expr)                                                         \
  do {                                                                           \
    auto&& ploop_req_ = (expr);                                                  \
    if (!ploop_req_.ok())                                                        \
      FAIL_CHECK(#expr " failed: " << ::ploop::testing::StatusText(ploop_req_)); \
    REQUIRE(ploop_req_.ok());                                                    \
  } while (0)

#define CHECK_OK(expr)                                                           \
  do {                                                                           \
    auto&& ploop_chk_ = (expr);                                                  \
    if (!ploop_chk_.ok())                                                        \
      FAIL_CHECK(#expr " failed: " << ::ploop::testing::StatusText(ploop_chk_)); \
  } while (0)

// Binds the value of a Result or fails the test with its error.
#define REQUIRE_ASSIGN(lhs, expr)                   \
  auto PLOOP_CONCAT_(ploop_ra_, __LINE__) = (expr); \
  REQUIRE_OK(PLOOP_CONCAT_(ploop_ra_, __LINE__));   \
  lhs = std::move(PLOOP_CONCAT_(ploop_ra_, __LINE__)).value()
