// The sender's ways of reading its source, on real files (label posix):
//   - a source read through read-only mappings (MappedSource, what
//     `ploop send` does with PLOOP_SEND_MAP=1) gives byte-identical
//     streams to the one read ahead with direct I/O (ReadAhead, the
//     default) and to the same disk on the in-memory file system, for full,
//     incremental and layered streams of a chain whose runs come from
//     several layers, and whose top rewrote clusters unchanged (the
//     incremental sender compares them with the base, mapped or read);
//     stored data reaches the writer by WriteStable (vmsplice into a pipe)
//     on every path, mapped or read;
//   - MappedSource itself: every cluster of every level reads as pread
//     reads it, across many small windows; a cluster the BAT places past
//     the end of its (truncated) file is not mapped;
//   - ReadAhead itself: every cluster it is asked for reads as the chain
//     reads it, with blocks that gather clusters from several levels and
//     pieces that outlive the reader; a read error reaches the cluster of
//     its block and not an earlier one; an index it did not read, or a
//     level that does not hold the index, is refused;
// (FdStreamWriter, which vmsplices into the pipe: tests/mount-helper/
// stream_fd_test.cc.)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <thread>

#include "ploop/chain.h"
#include "ploop/io/io_memory.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/io/posix_file_system.h"
#include "snapshot/snapshot.h"
#include "snapshot/stream.h"
#include "snapshot/stream_format.h"
#include "snapshot/stream_source.h"
#include "snapshot_support.h"
#include "test_support.h"

namespace ploop {
namespace {

using namespace snaptest;
using testing::TempDir;
using testing::TestRng;

constexpr uint64_t kCb = 32 * kKiB;
constexpr uint64_t kClusters = 2000;  // 62.5 MiB, several 4 MiB chunks

const std::string kS1 = "{11111111-1111-4111-8111-111111111111}";
const std::string kS2 = "{22222222-2222-4222-8222-222222222222}";

// Records what the sender writes, and how much of it came as stable
// (mapped) spans.
class RecordingWriter final : public StreamWriter {
 public:
  Status Write(std::span<const std::byte> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return Status::Ok();
  }
  Status WriteStable(std::span<const std::byte> data) override {
    stable_bytes += data.size();
    return Write(data);
  }
  Bytes bytes;
  uint64_t stable_bytes = 0;
};

// Random clusters (incompressible), compressible ones (1 KiB random, 3 KiB
// zeros per 4 KiB), zero clusters written explicitly, over two snapshots
// and a top, so that a flattened run takes clusters from every layer.
// Deterministic for `seed`, whatever the file system.
void MakeChain(FileSystem& fs, const std::string& dir, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto bytes = [&](size_t n, bool compressible) {
    Bytes b(n);
    for (size_t i = 0; i < n; ++i) {
      b[i] = (compressible && i % 4096 >= 1024) ? std::byte{0} : std::byte(gen() & 0xff);
    }
    return b;
  };
  CreateOptions o;
  o.size_bytes = kClusters * kCb;
  o.cluster_bytes = kCb;
  REQUIRE_OK(CreateDisk(fs, dir + "/root.hds", o));
  const std::string dd = dir + "/DiskDescriptor.xml";
  auto write = [&](uint64_t cluster, const Bytes& data) {
    auto chain = OpenTop(fs, dd);
    REQUIRE_OK(chain->Write(cluster * kCb, data));
    REQUIRE_OK(chain->Close());
  };
  // Level 0: the first 256 clusters random (chunks that go out stored
  // whatever the seed: nothing compressible is written there), then runs
  // of data between holes, some compressible, some zeros.
  write(0, bytes(256 * kCb, false));
  for (uint64_t i = 256; i < kClusters;) {
    const uint64_t run = 1 + gen() % 300;
    const uint64_t n = std::min(run, kClusters - i);
    switch (gen() % 4) {
      case 0:
        break;  // a hole
      case 1:
        write(i, Bytes(n * kCb));  // explicit zeros: allocated, not sent
        break;
      case 2:
        write(i, bytes(n * kCb, true));
        break;
      default:
        write(i, bytes(n * kCb, false));
    }
    i += n;
  }
  REQUIRE_OK(CreateSnapshot(fs, dd, kS1).status());
  // Level 1 and the top: scattered clusters over the runs below.
  for (int k = 0; k < 60; ++k) {
    const uint64_t i = gen() % kClusters;
    write(i, bytes(kCb, i >= 256 && gen() % 2 == 0));
  }
  REQUIRE_OK(CreateSnapshot(fs, dd, kS2).status());
  for (int k = 0; k < 60; ++k) {
    const uint64_t i = gen() % (kClusters - 4);
    write(i, bytes(4 * kCb, i >= 256 && gen() % 2 == 0));
  }
  // The top rewrites clusters with the bytes it already shows: held by the
  // top, yet mostly the same as in the snapshots (an incremental stream
  // leaves those home), holes of every layer among them (rewritten as
  // zeros).
  for (int k = 0; k < 40; ++k) {
    const uint64_t i = gen() % kClusters;
    Bytes now(kCb);
    {
      auto chain = OpenTop(fs, dd);
      REQUIRE_OK(chain->Read(i * kCb, now));
      REQUIRE_OK(chain->Close());
    }
    write(i, now);
  }
}

// MakeChain in a new folder "src" of `tmp` on the real file system; its
// DiskDescriptor.xml.
std::string MakePosixChain(PosixFileSystem& posix, TempDir& tmp, uint64_t seed) {
  const std::string dir = tmp / "src";
  REQUIRE(::mkdir(dir.c_str(), 0755) == 0);
  MakeChain(posix, dir, seed);
  return dir + "/DiskDescriptor.xml";
}

// MakeChain on the real file system, open, seen as a SourceChain.
struct PosixSource {
  PosixSource() : dd(MakePosixChain(posix, tmp, rng.seed())) {
    auto opened = OpenDisk(posix, dd, "", OpenOptions{});
    REQUIRE_OK(opened.status());
    chain = std::move(*opened);
    source.emplace(*chain);
  }
  TestRng rng;
  TempDir tmp;
  PosixFileSystem posix;
  std::string dd;
  std::unique_ptr<Chain> chain;
  std::optional<stream::SourceChain> source;
};

// The cluster of `level` that lies last in its file, and its offset there.
std::pair<uint64_t, uint64_t> LastInFile(stream::SourceChain& source, int level) {
  uint64_t last = 0;
  uint64_t last_offset = 0;
  for (uint64_t i = 0; i < source.level_clusters(level); ++i) {
    auto offset = source.FileOffset(level, i);
    if (offset && *offset >= last_offset) {
      last = i;
      last_offset = *offset;
    }
  }
  return {last, last_offset};
}

Bytes SendWith(FileSystem& fs, const std::string& dd, SendOptions options, bool map,
               uint64_t* stable = nullptr) {
  options.map_source = map;
  RecordingWriter out;
  REQUIRE_OK(SendStream(fs, dd, out, options).status());
  if (stable != nullptr) *stable = out.stable_bytes;
  return out.bytes;
}

TEST_SUITE_BEGIN("posix");

TEST_CASE("stream: a mapped source sends the same bytes as pread and the in-memory disk") {
  TestRng rng;
  TempDir tmp;
  PosixFileSystem posix;
  MemoryFileSystem mem;
  const std::string dd = MakePosixChain(posix, tmp, rng.seed());
  MakeChain(mem, "src", rng.seed());

  // Whether some chunks surely go out stored (not compressed): not when
  // the incremental stream's few scattered clusters mix in compressible
  // ones.
  struct Case {
    const char* name;
    SendOptions options;
    bool stores = true;
  };
  std::vector<Case> cases;
  cases.push_back({"full top", SendOptions{}});
  cases.push_back({"full top, no lz4", SendOptions{}});
  cases.back().options.compress = false;
  cases.push_back({"full S2", SendOptions{}});
  cases.back().options.guid = kS2;
  cases.push_back({"incremental S1 to top", SendOptions{}, false});
  cases.back().options.from_guid = kS1;
  cases.push_back({"incremental S1 to top, no lz4", SendOptions{}});
  cases.back().options.from_guid = kS1;
  cases.back().options.compress = false;
  cases.push_back({"layered", SendOptions{}});
  cases.back().options.layout = StreamLayout::kLayers;
  for (const Case& c : cases) {
    INFO(std::string(c.name));
    uint64_t stable_mapped = 0;
    uint64_t stable_read = 0;
    const Bytes mapped = SendWith(posix, dd, c.options, true, &stable_mapped);
    const Bytes read = SendWith(posix, dd, c.options, false, &stable_read);
    const Bytes memory = SendWith(mem, "src/DiskDescriptor.xml", c.options, true);
    const Bytes memory_read = SendWith(mem, "src/DiskDescriptor.xml", c.options, false);
    CHECK(mapped.size() > 0);
    CHECK(mapped == read);
    CHECK(mapped == memory);
    CHECK(mapped == memory_read);
    // Stored chunks go out by WriteStable, mapped or read.
    if (c.stores) CHECK(stable_mapped > 0);
    CHECK(stable_read == stable_mapped);
  }
}

TEST_CASE("stream: MappedSource maps every cluster as pread reads it, window after window") {
  PosixSource fixture;
  stream::SourceChain& source = *fixture.source;
  // Windows of two clusters: most clusters need a new one.
  stream::MappedSource mapped(source, true, 2 * kCb);
  stream::MappedSource disabled(source, false);
  Bytes expect(kCb);
  uint64_t checked = 0;
  std::vector<std::shared_ptr<const FileMapping>> kept;
  for (int level = 0; level < source.levels(); ++level) {
    for (uint64_t i = 0; i < source.level_clusters(level); ++i) {
      if (!source.Holds(level, i)) continue;
      auto piece = mapped.Cluster(level, i);
      REQUIRE(piece.data != nullptr);
      CHECK(disabled.Cluster(level, i).data == nullptr);
      REQUIRE_OK(source.file(level)->ReadAt(*source.FileOffset(level, i), expect));
      CHECK(std::memcmp(piece.data, expect.data(), kCb) == 0);
      // A piece keeps its window mapped after the source moved on.
      if (kept.size() < 8) kept.push_back(piece.mapping);
      ++checked;
    }
  }
  CHECK(checked >= 256);  // at least level 0's first run
  for (const auto& m : kept) CHECK(m->data().size() >= kCb);

  // A file cut below a cluster its BAT points to: that cluster is not
  // mapped (touching it would raise SIGBUS); pread reports it.
  const int top = source.levels() - 1;
  const auto [last, last_offset] = LastInFile(source, top);
  REQUIRE(last_offset > 0);
  REQUIRE(::truncate(source.layer(top).path().c_str(), static_cast<off_t>(last_offset + kCb / 2)) ==
          0);
  stream::MappedSource after(source, true);
  CHECK(after.Cluster(top, last).data == nullptr);
  CHECK(!source.file(top)->ReadAt(last_offset, expect).ok());
}

TEST_CASE("stream: ReadAhead reads every cluster it is asked for as the chain reads it") {
  PosixSource fixture;
  stream::SourceChain& source = *fixture.source;
  const int top = source.levels() - 1;
  REQUIRE(top >= 2);
  // Every second held index from 100 on: blocks of 3 clusters that skip
  // indices and mix levels (the top's scattered clusters over level 0's).
  auto level_of = [&](uint64_t i) { return i % 2 == 0 ? source.Highest(i, top) : -1; };
  std::vector<std::pair<uint64_t, stream::ReadAhead::Piece>> kept;
  uint64_t checked = 0;
  Bytes expect(kCb);
  {
    stream::ReadAhead ahead(source, level_of, 100, kClusters, 3, 2, 3 * kCb);
    for (uint64_t i = 100; i < kClusters; ++i) {
      if (level_of(i) < 0) continue;
      REQUIRE_ASSIGN(auto piece, ahead.Cluster(i));
      REQUIRE_OK(source.ReadView(top, i, 1, expect));
      CHECK(std::memcmp(piece.data, expect.data(), kCb) == 0);
      if (checked % 50 == 0) kept.emplace_back(i, piece);
      ++checked;
    }
    // Past the last index asked: refused.
    CHECK(ahead.Cluster(kClusters).status().code() == StatusCode::kFailedPrecondition);
  }
  // Level 0's first 256 clusters are data: at least the even ones from 100.
  CHECK(checked >= 78);
  // Pieces keep their blocks after the reader is gone.
  REQUIRE(kept.size() >= 2);
  for (const auto& [i, piece] : kept) {
    REQUIRE_OK(source.ReadView(top, i, 1, expect));
    CHECK(std::memcmp(piece.data, expect.data(), kCb) == 0);
  }
  {
    // An index the walk skipped (odd): refused, not answered from a block.
    stream::ReadAhead ahead(source, level_of, 100, kClusters, 2, 4, 4 * kCb);
    REQUIRE(ahead.Cluster(100).ok());
    CHECK(ahead.Cluster(101).status().code() == StatusCode::kFailedPrecondition);
  }
  {
    // A level that does not hold the index: refused, not read from the
    // file's start.
    // (The top holds a few hundred scattered clusters of 2000.)
    uint64_t hole = 0;
    while (hole < source.level_clusters(top) && source.Holds(top, hole)) ++hole;
    REQUIRE(hole < source.level_clusters(top));
    stream::ReadAhead ahead(
        source, [&](uint64_t i) { return i == hole ? top : -1; }, 0, kClusters, 1, 1, kCb);
    CHECK(ahead.Cluster(hole).status().code() == StatusCode::kFailedPrecondition);
  }

  // The top's file cut below its last cluster: the clusters before that
  // cluster's block still read, that one fails with the read's error.
  const auto [last, last_offset] = LastInFile(source, top);
  REQUIRE(last_offset > 0);
  REQUIRE(::truncate(source.layer(top).path().c_str(), static_cast<off_t>(last_offset + kCb / 2)) ==
          0);
  uint64_t before = kClusters;  // a top cluster before it in the file
  for (uint64_t i = 0; i < source.level_clusters(top) && before == kClusters; ++i) {
    auto offset = source.FileOffset(top, i);
    if (i != last && offset && *offset + kCb <= last_offset) {
      before = i;
    }
  }
  REQUIRE(before < kClusters);
  auto two = [&](uint64_t i) { return i == before || i == last ? top : -1; };
  stream::ReadAhead cut(source, two, 0, kClusters, 2, 2, kCb);
  if (before < last) {
    REQUIRE_ASSIGN(auto piece, cut.Cluster(before));
    REQUIRE_OK(source.ReadView(top, before, 1, expect));
    CHECK(std::memcmp(piece.data, expect.data(), kCb) == 0);
  }
  auto r = cut.Cluster(last);
  REQUIRE(!r.ok());
  CHECK(r.status().code() == StatusCode::kCorruption);
  CHECK(r.status().message().find(source.layer(top).path()) != std::string::npos);
}

TEST_CASE("stream: LentPages marks the huge pages a span lent covers, inside its block only") {
  constexpr size_t kHuge = kIoMemoryHugePageBytes;
  // Only addresses are used: the memory is never touched.
  auto memory = std::make_unique_for_overwrite<std::byte[]>(8 * kHuge);
  std::byte* block = memory.get() + kHuge;
  stream::LentPages lent;
  lent.Mark(block, kHuge);  // before Attach: not a block yet
  CHECK(lent.mask() == 0);
  lent.Attach(block, 4 * kHuge);
  lent.Mark(memory.get(), kHuge);       // wholly before the block
  lent.Mark(block + 4 * kHuge, kHuge);  // wholly after it
  CHECK(lent.mask() == 0);
  lent.Mark(block + kHuge + 4096, 4096);  // inside page 1
  CHECK(lent.mask() == 0b10);
  lent.Mark(block - 4096, 8192);  // straddles the start: page 0
  CHECK(lent.mask() == 0b11);
  lent.Mark(block + 3 * kHuge - 1, 2);  // the edge of pages 2 and 3
  CHECK(lent.mask() == 0b1111);

  // A block of more than 64 huge pages: bit 63 stands for the rest.
  auto large = std::make_unique_for_overwrite<std::byte[]>(70 * kHuge);
  stream::LentPages far;
  far.Attach(large.get(), 70 * kHuge);
  far.Mark(large.get() + 68 * kHuge, 4096);
  CHECK(far.mask() == uint64_t{1} << 63);
  far.Mark(large.get() + 62 * kHuge, kHuge + 1);
  CHECK(far.mask() == (uint64_t{3} << 62));
}

TEST_CASE("stream: LentPages drops the marked huge pages and no others") {
  constexpr size_t kHuge = kIoMemoryHugePageBytes;
  // Four huge pages and a 4 KiB tail (a frame buffer's lz4 bound).
  const size_t bytes = 4 * kHuge + 4096;
  IoMemory m = AllocateIoMemory(bytes);
  REQUIRE(m != nullptr);
  std::memset(m.get(), 0x5a, bytes);
  stream::LentPages lent;
  lent.Attach(m.get(), bytes);
  CHECK(lent.Drop());  // nothing marked
  CHECK(m[0] == std::byte{0x5a});
  lent.Mark(m.get() + kHuge + 10, 2 * kHuge);  // pages 1-3: one run
  lent.Mark(m.get() + 4 * kHuge, 1);           // the tail
  REQUIRE(lent.Drop());
  auto all = [&](size_t from, size_t to, std::byte b) {
    return std::all_of(m.get() + from, m.get() + to, [b](std::byte x) { return x == b; });
  };
  CHECK(all(0, kHuge, std::byte{0x5a}));
  CHECK(all(kHuge, bytes, std::byte{0}));
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
