// Helpers shared by the snapshot tests (snapshot_test.cc,
// snapshot_model_test.cc, snapshot_crash_test.cc, the stream tests): a
// disk in the folder "disk" of a file system, whole-snapshot reads,
// byte-for-byte pictures of the folder for "nothing changed" assertions,
// and a stream writer into memory.
#pragma once

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ploop/chain.h"
#include "ploop/descriptor.h"
#include "ploop/disk.h"
#include "ploop/io/memory_file_system.h"
#include "snapshot/snapshot.h"
#include "snapshot/stream.h"
#include "test_support.h"

namespace ploop::snaptest {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr char kDir[] = "disk";
inline constexpr char kImage[] = "disk/root.hds";
inline constexpr char kDd[] = "disk/DiskDescriptor.xml";
inline const std::string kTop(kTopGuid);
inline const std::string kNull(kNullGuid);

using Bytes = std::vector<std::byte>;

// Creates the disk: kImage and kDd.
inline void MakeDisk(FileSystem& fs, uint64_t size_bytes, uint64_t cluster_bytes = 32 * kKiB,
                     ImageKind kind = ImageKind::kExpanded, const std::string& image = kImage) {
  CreateOptions o;
  o.size_bytes = size_bytes;
  o.cluster_bytes = cluster_bytes;
  o.kind = kind;
  REQUIRE_OK(CreateDisk(fs, image, o));
}

// A stream kept in memory (every byte copied).
class MemWriter final : public StreamWriter {
 public:
  Status Write(std::span<const std::byte> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return Status::Ok();
  }
  Bytes bytes;
};

inline std::unique_ptr<Chain> OpenTop(FileSystem& fs, const std::string& dd = kDd) {
  OpenOptions o;
  o.writable = true;
  REQUIRE_ASSIGN(auto chain, OpenDisk(fs, dd, "", o));
  return chain;
}

// Every byte of snapshot `guid` (empty: the current top), opened read-only.
inline Bytes ReadSnapshot(FileSystem& fs, std::string_view guid, const std::string& dd = kDd) {
  OpenOptions o;
  REQUIRE_ASSIGN(auto chain, OpenDisk(fs, dd, guid, o));
  Bytes out(chain->size_bytes());
  REQUIRE_OK(chain->Read(0, out));
  REQUIRE_OK(chain->Close());
  return out;
}

inline Bytes ReadAll(Image& image) {
  Bytes out(image.size_bytes());
  REQUIRE_OK(image.Read(0, out));
  return out;
}

// Writes `data` at `offset` through the top and closes the disk.
inline void WriteTop(FileSystem& fs, uint64_t offset, std::span<const std::byte> data) {
  auto chain = OpenTop(fs);
  REQUIRE_OK(chain->Write(offset, data));
  REQUIRE_OK(chain->Close());
}

inline Descriptor LoadDd(FileSystem& fs, const std::string& dd = kDd) {
  REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, dd));
  return d;
}

// Every file of folder `dir`, name -> bytes.
inline std::map<std::string, Bytes> Files(MemoryFileSystem& fs, const std::string& dir = kDir) {
  REQUIRE_ASSIGN(auto names, fs.ListDir(dir));
  std::map<std::string, Bytes> out;
  for (const auto& name : names) out[name] = fs.Contents(JoinPath(dir, name));
  return out;
}

// Writes `files` into folder `dir` of `fs` (a copy of a disk, say).
inline void PutFiles(FileSystem& fs, const std::map<std::string, Bytes>& files,
                     const std::string& dir = kDir) {
  for (const auto& [name, bytes] : files) {
    REQUIRE_ASSIGN(auto file, fs.Create(JoinPath(dir, name), /*exclusive=*/false));
    REQUIRE_OK(file->WriteAt(0, bytes));
    REQUIRE_OK(file->Sync());
  }
}

// The names of `files`, for messages.
inline std::string Names(const std::map<std::string, Bytes>& files) {
  std::string out;
  for (const auto& [name, bytes] : files) out += " " + name;
  return out;
}

inline std::string AsText(const Bytes& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// CheckDisk without repair finds nothing.
inline void RequireCleanDisk(FileSystem& fs, const std::string& dd = kDd) {
  REQUIRE_ASSIGN(DiskCheckReport report, CheckDisk(fs, dd, /*repair=*/false));
  INFO("check of the disk: " << report.FirstProblem());
  REQUIRE(report.clean());
}

// `size` bytes of `value` at the front of a zeroed vector of `total`.
inline Bytes Filled(size_t total, size_t offset, size_t size, uint8_t value) {
  Bytes out(total);
  std::memset(out.data() + offset, value, size);
  return out;
}

}  // namespace ploop::snaptest
