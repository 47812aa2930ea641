// Model-based test of the snapshot layer: a long random sequence of writes,
// discards and flushes (through a disk opened writable, sometimes kept open
// across steps), snapshots, switches, merges, merge -A, deletes and resizes,
// checked after every step against an in-memory model of every snapshot's
// content and of the snapshot tree. Operations OpenVZ refuses (deleting the
// top or a snapshot with two children, merging into a shared parent, any
// change of the chain while the disk is in use) must be refused with the
// right code and change nothing.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "ploop/delta.h"
#include "ploop/io/memory_file_system.h"
#include "snapshot/snapshot.h"
#include "snapshot_support.h"
#include "test_support.h"

namespace ploop {
namespace {

using namespace snaptest;
using testing::TestRng;

// What every snapshot of the disk reads as, and the snapshot tree.
struct Model {
  std::map<std::string, Bytes> content;       // GUID -> what it reads as
  std::map<std::string, std::string> parent;  // GUID -> parent GUID (kNull: a root)

  std::vector<std::string> Children(const std::string& guid) const {
    std::vector<std::string> out;
    for (const auto& [g, p] : parent) {
      if (p == guid) out.push_back(g);
    }
    return out;
  }
  // Root first, the top last.
  std::vector<std::string> ActiveChain() const {
    std::vector<std::string> out;
    for (std::string g = kTop; g != kNull; g = parent.at(g)) out.push_back(g);
    std::reverse(out.begin(), out.end());
    return out;
  }
  bool InActiveChain(const std::string& guid) const {
    auto chain = ActiveChain();
    return std::find(chain.begin(), chain.end(), guid) != chain.end();
  }
  void Remove(const std::string& guid) {
    content.erase(guid);
    parent.erase(guid);
  }
  // `child` takes the place of its parent (merge or delete with one child).
  void MergeIntoParent(const std::string& child) {
    std::string p = parent.at(child);
    parent[child] = parent.at(p);
    Remove(p);
  }
};

// The GUID as typed by a user: braced lower case, or bare upper case.
std::string Spell(TestRng& rng, const std::string& guid) {
  if (guid.empty() || rng.Uniform(0, 1) == 0) return guid;
  std::string out = guid.substr(1, guid.size() - 2);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

template <typename T>
const T& Pick(TestRng& rng, const std::vector<T>& v) {
  REQUIRE_FALSE(v.empty());
  return v[rng.Uniform(0, v.size() - 1)];
}

std::vector<std::string> Guids(const Model& m) {
  std::vector<std::string> out;
  for (const auto& [g, bytes] : m.content) out.push_back(g);
  return out;
}

class ModelRun {
 public:
  ModelRun(TestRng& rng, ImageKind base_kind, uint64_t cluster_bytes)
      : rng_(rng), cb_(cluster_bytes), max_size_(48 * cluster_bytes) {
    const uint64_t size = rng_.Uniform(8, 24) * cb_;
    MakeDisk(fs_, size, cb_, base_kind);
    model_.content[kTop] = Bytes(size);
    model_.parent[kTop] = kNull;
  }

  void Run(int steps) {
    for (step_ = 0; step_ < steps; ++step_) {
      CAPTURE(step_);
      Step();
      Verify();
    }
    CloseSession();
    Verify();
    Finale();
  }

  int steps_done = 0;
  std::map<std::string, int> counts;

 private:
  void Step() {
    // Many snapshots make each step slow to verify; lean towards removing
    // them when there are many.
    const bool crowded = model_.content.size() > 10;
    const uint64_t roll = rng_.Uniform(0, 99);
    if (roll < 20) return Write();
    if (roll < 27) return Discard();
    if (roll < 30) return Flush();
    if (roll < 35) return ToggleSession();
    if (roll < (crowded ? 40 : 52)) return Snapshot();
    if (roll < 64) return Switch();
    if (roll < 75) return Merge();
    if (roll < 80) return MergeAllStep();
    if (roll < 94) return Delete();
    return Resize();
  }

  // --- I/O through the top ---------------------------------------------

  Image& Top() {
    if (!session_) session_ = OpenTop(fs_);
    return *session_;
  }
  void Done() {
    if (!keep_open_) CloseSession();
  }
  void CloseSession() {
    if (session_) {
      REQUIRE_OK(session_->Close());
      session_.reset();
    }
  }
  void ToggleSession() {
    ++counts["session"];
    keep_open_ = !keep_open_;
    if (keep_open_) {
      Top();
    } else {
      CloseSession();
    }
  }

  // The bytes of every delta file but the top's.
  std::map<std::string, Bytes> LowerFiles() {
    Descriptor dd = LoadDd(fs_);
    std::map<std::string, Bytes> out;
    for (const auto& image : dd.images()) {
      if (image.guid != kTop) out[image.path] = fs_.Contents(image.path);
    }
    return out;
  }
  void RequireLowerUnchanged(const std::map<std::string, Bytes>& before) {
    for (const auto& [path, bytes] : before) {
      INFO("a write to the top changed " << path);
      REQUIRE(fs_.Contents(path) == bytes);
    }
  }

  void Write() {
    ++counts["write"];
    Bytes& top = model_.content[kTop];
    const uint64_t off = rng_.Uniform(0, top.size() - 1);
    const uint64_t len = rng_.Uniform(1, std::min<uint64_t>(top.size() - off, 3 * cb_));
    Bytes data = rng_.Uniform(0, 4) == 0 ? Bytes(len) : rng_.Bytes(len);
    auto lower = LowerFiles();
    REQUIRE_OK(Top().Write(off, data));
    std::memcpy(top.data() + off, data.data(), len);
    Done();
    RequireLowerUnchanged(lower);
  }

  void Discard() {
    ++counts["discard"];
    Bytes& top = model_.content[kTop];
    // Whole clusters more often than not: those are what discards free.
    uint64_t off, len;
    if (rng_.Uniform(0, 2) != 0) {
      const uint64_t clusters = top.size() / cb_;
      off = rng_.Uniform(0, clusters - 1) * cb_;
      len = rng_.Uniform(1, std::min<uint64_t>(clusters - off / cb_, 3)) * cb_;
    } else {
      off = rng_.Uniform(0, top.size() - 1);
      len = rng_.Uniform(1, std::min<uint64_t>(top.size() - off, 2 * cb_));
    }
    auto lower = LowerFiles();
    REQUIRE_OK(Top().Discard(off, len));
    std::memset(top.data() + off, 0, len);
    Done();
    RequireLowerUnchanged(lower);
  }

  void Flush() {
    ++counts["flush"];
    if (!session_) return;
    REQUIRE_OK(session_->Flush());
  }

  // --- Chain operations ------------------------------------------------

  // Before a chain operation: usually the disk is closed first; otherwise
  // the operation runs while the disk is in use.
  void MaybeClose() {
    if (session_ && (forced_ || rng_.Uniform(0, 2) != 0)) {
      keep_open_ = false;
      CloseSession();
    }
  }

  // Runs `op`, which the model says fails with `code`: nothing may change.
  template <typename Op>
  void ExpectRefused(StatusCode code, const char* what, Op op) {
    ++counts[std::string(what) + " refused"];
    const auto before = Files(fs_);
    Status s = op();
    INFO(std::string(what) << " returned " << s.ToString());
    REQUIRE(s.code() == code);
    REQUIRE(Files(fs_) == before);
  }

  void Snapshot() {
    MaybeClose();
    const uint64_t kind = forced_ ? 9 : rng_.Uniform(0, 9);
    std::string wanted;
    if (kind == 0) {
      // A taken GUID (or the top's, which is reserved).
      const std::string taken = Pick(rng_, Guids(model_));
      ExpectRefused(taken == kTop ? StatusCode::kInvalidArgument : StatusCode::kAlreadyExists,
                    "snapshot",
                    [&] { return CreateSnapshot(fs_, kDd, Spell(rng_, taken)).error(); });
      return;
    }
    if (kind == 1) {
      REQUIRE_ASSIGN(wanted, NewRandomGuid());
    }
    if (session_) {
      ExpectRefused(StatusCode::kBusy, "snapshot",
                    [&] { return CreateSnapshot(fs_, kDd, Spell(rng_, wanted)).error(); });
      return;
    }
    ++counts["snapshot"];
    REQUIRE_ASSIGN(std::string snap,
                   CreateSnapshot(fs_, kDd, wanted.empty() ? "" : Spell(rng_, wanted)));
    if (!wanted.empty()) REQUIRE(snap == wanted);
    REQUIRE(model_.content.count(snap) == 0);
    model_.content[snap] = model_.content[kTop];
    model_.parent[snap] = model_.parent[kTop];
    model_.parent[kTop] = snap;
  }

  void Switch(std::optional<std::string> forced = std::nullopt) {
    MaybeClose();
    std::vector<std::string> targets;
    for (const auto& g : Guids(model_)) {
      if (g != kTop) targets.push_back(g);
    }
    if (!forced && (targets.empty() || rng_.Uniform(0, 19) == 0)) {
      ExpectRefused(StatusCode::kInvalidArgument, "switch",
                    [&] { return SwitchSnapshot(fs_, kDd, Spell(rng_, kTop)); });
      return;
    }
    const std::string target = forced ? *forced : Pick(rng_, targets);
    if (session_) {
      ExpectRefused(StatusCode::kBusy, "switch",
                    [&] { return SwitchSnapshot(fs_, kDd, Spell(rng_, target)); });
      return;
    }
    ++counts["switch"];
    REQUIRE_OK(SwitchSnapshot(fs_, kDd, Spell(rng_, target)));
    model_.content[kTop] = model_.content[target];
    model_.parent[kTop] = target;
  }

  void Merge(std::optional<std::string> forced = std::nullopt) {
    MaybeClose();
    const std::string child = forced ? *forced : Pick(rng_, Guids(model_));
    const std::string parent = model_.parent.at(child);
    auto op = [&] { return MergeSnapshot(fs_, kDd, child == kTop ? "" : Spell(rng_, child)); };
    if (parent == kNull || model_.Children(parent).size() != 1) {
      ExpectRefused(StatusCode::kFailedPrecondition, "merge", op);
      return;
    }
    // The merge writes the parent and reads the child: both must be free.
    if (session_ && (model_.InActiveChain(parent) || child == kTop)) {
      ExpectRefused(StatusCode::kBusy, "merge", op);
      return;
    }
    ++counts[session_ ? "merge while in use" : "merge"];
    REQUIRE_OK(op());
    model_.MergeIntoParent(child);
  }

  void MergeAllStep() {
    MaybeClose();
    auto chain = model_.ActiveChain();
    auto op = [&] { return MergeAll(fs_, kDd); };
    bool branched = false;
    for (size_t i = 0; i + 1 < chain.size(); ++i) {
      branched |= model_.Children(chain[i]).size() != 1;
    }
    if (chain.size() > 1 && branched) {
      ExpectRefused(StatusCode::kFailedPrecondition, "merge -A", op);
      return;
    }
    if (chain.size() > 1 && session_) {
      ExpectRefused(StatusCode::kBusy, "merge -A", op);
      return;
    }
    ++counts["merge -A"];
    REQUIRE_OK(op());
    for (size_t i = 0; i + 1 < chain.size(); ++i) model_.Remove(chain[i]);
    model_.parent[kTop] = kNull;
  }

  void Delete(std::optional<std::string> forced = std::nullopt) {
    MaybeClose();
    // Leaves off the active chain (left by switches) are rare; pick them
    // on purpose now and then.
    std::vector<std::string> leaves;
    for (const auto& g : Guids(model_)) {
      if (g != kTop && model_.Children(g).empty()) leaves.push_back(g);
    }
    const std::string target = forced ? *forced
                               : !leaves.empty() && rng_.Uniform(0, 9) < 7
                                   ? Pick(rng_, leaves)
                                   : Pick(rng_, Guids(model_));
    auto op = [&] { return DeleteSnapshot(fs_, kDd, Spell(rng_, target)); };
    auto children = model_.Children(target);
    if (target == kTop || children.size() > 1) {
      ExpectRefused(StatusCode::kFailedPrecondition, "delete", op);
      return;
    }
    if (children.size() == 1 && session_ && model_.InActiveChain(target)) {
      ExpectRefused(StatusCode::kBusy, "delete", op);
      return;
    }
    ++counts[children.empty() ? "delete leaf" : "delete with child"];
    REQUIRE_OK(op());
    if (children.empty()) {
      model_.Remove(target);
    } else {
      model_.MergeIntoParent(children[0]);
    }
  }

  void Resize() {
    MaybeClose();
    Bytes& top = model_.content[kTop];
    const uint64_t size = std::min<uint64_t>(max_size_, top.size() + rng_.Uniform(0, 6) * cb_);
    if (session_) {
      ExpectRefused(StatusCode::kBusy, "resize", [&] { return ResizeDisk(fs_, kDd, size); });
      return;
    }
    ++counts["resize"];
    REQUIRE_OK(ResizeDisk(fs_, kDd, size));
    top.resize(size);
  }

  // --- Coverage ----------------------------------------------------------

  // Every kind of operation the random mix may have missed, with forced
  // choices (the disk closed, fresh GUIDs); each is checked as any step.
  void Finale() {
    forced_ = true;
    auto step = [&](auto&& fn) {
      ++step_;
      CAPTURE(step_);
      fn();
      Verify();
    };
    if (counts["snapshot"] == 0) step([&] { Snapshot(); });
    if (counts["resize"] == 0) step([&] { Resize(); });
    if (counts["merge"] == 0) {
      step([&] { Snapshot(); });
      step([&] { Merge(kTop); });
    }
    if (counts["delete with child"] == 0) {
      step([&] { Snapshot(); });
      step([&] { Delete(model_.parent.at(kTop)); });
    }
    if (counts["switch"] == 0 || counts["delete leaf"] == 0) {
      // a <- b <- top, then back to a: b is a leaf off the active chain.
      step([&] { Snapshot(); });
      const std::string a = model_.parent.at(kTop);
      step([&] { Snapshot(); });
      step([&] { Switch(a); });
      step([&] { Delete(OffChainLeaf()); });
    }
    if (counts["merge -A"] == 0) {
      step([&] { Snapshot(); });
      // Leaves off the active chain go first, so that nothing branches.
      while (!OffChainLeaf().empty()) step([&] { Delete(OffChainLeaf()); });
      step([&] { MergeAllStep(); });
    }
    if (counts["delete refused"] == 0) step([&] { Delete(kTop); });
    if (counts["merge refused"] == 0) step([&] { Merge(model_.ActiveChain().front()); });
    forced_ = false;
  }

  // A snapshot without children that is not the top, or "".
  std::string OffChainLeaf() const {
    for (const auto& [g, p] : model_.parent) {
      if (g != kTop && model_.Children(g).empty()) return g;
    }
    return "";
  }

  // --- Checks ------------------------------------------------------------

  void Verify() {
    Descriptor dd = LoadDd(fs_);
    // The tree.
    std::map<std::string, std::string> parents;
    for (const auto& shot : dd.shots()) {
      REQUIRE_FALSE(shot.temporary);
      parents[shot.guid] = shot.parent_guid;
    }
    REQUIRE(parents == model_.parent);
    REQUIRE(dd.top_guid() == kTop);
    REQUIRE(dd.disk_size_bytes() == model_.content[kTop].size());
    // The content of every snapshot, the top through the open session.
    for (const auto& [guid, content] : model_.content) {
      INFO("snapshot " << guid << " does not read as the model");
      if (guid == kTop && session_) {
        REQUIRE(ReadAll(*session_) == content);
      } else {
        REQUIRE(ReadSnapshot(fs_, guid) == content);
      }
    }
    // check needs the disk closed; it also finds orphan files.
    if (!session_) RequireCleanDisk(fs_);
  }

  TestRng& rng_;
  const uint64_t cb_;
  const uint64_t max_size_;
  MemoryFileSystem fs_;
  Model model_;
  std::unique_ptr<Chain> session_;
  bool keep_open_ = false;
  bool forced_ = false;  // Finale(): no random refusals, the disk closed
  int step_ = 0;
};

TEST_SUITE_BEGIN("unit");

TEST_CASE("snapshot model: random chain operations and I/O match a model") {
  TestRng rng;
  ImageKind kind = ImageKind::kExpanded;
  uint64_t cb = 32 * kKiB;
  SUBCASE("expanded base, 32K clusters") {}
  SUBCASE("expanded base, 64K clusters") { cb = 64 * kKiB; }
  SUBCASE("preallocated base") { kind = ImageKind::kPreallocated; }
  SUBCASE("raw base") { kind = ImageKind::kRaw; }
  CAPTURE(ImageKindName(kind));
  CAPTURE(cb);
  ModelRun run(rng, kind, cb);
  run.Run(300);
  // The run covered what it is meant to cover (the mix is random; these
  // hold for any seed with overwhelming probability).
  std::string mix;
  for (const auto& [name, count] : run.counts) mix += " " + name + "=" + std::to_string(count);
  INFO("operations:" << mix);
  for (std::string op : {"snapshot", "switch", "merge", "delete leaf", "delete with child",
                         "merge -A", "resize", "delete refused", "merge refused"}) {
    CAPTURE(op);
    CHECK(run.counts[op] > 0);
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
