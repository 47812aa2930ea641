#include "test_support.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>

namespace ploop::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/ploop-test-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    std::cerr << "mkdtemp failed\n";
    std::abort();
  }
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

TestRng::TestRng() {
  const char* fixed = std::getenv("PLOOP_TEST_SEED");
  seed_ = fixed ? std::strtoull(fixed, nullptr, 0) : std::random_device{}();
  rng_.seed(seed_);
  // ctest shows a test's output when it fails, so the seed is always there
  // to reproduce the run.
  std::cerr << "random seed: PLOOP_TEST_SEED=" << seed_ << "\n";
}

uint64_t TestRng::Uniform(uint64_t lo, uint64_t hi) {
  return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
}

std::vector<std::byte> TestRng::Bytes(size_t n) {
  std::vector<std::byte> out(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = rng_();
    std::memcpy(out.data() + i, &v, 8);
  }
  for (; i < n; ++i) out[i] = std::byte(rng_());
  return out;
}

std::vector<std::byte> Pattern(size_t n, uint8_t value) {
  return std::vector<std::byte>(n, std::byte{value});
}

bool InCi() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

void Skip(const std::string& why) {
  if (InCi()) {
    std::cerr << "FAIL: prerequisite missing under CI=true: " << why << "\n";
    std::exit(1);
  }
  std::cerr << "SKIP: " << why << "\n";
  std::exit(77);
}

}  // namespace ploop::testing
