// Check and repair of one ploop image.
//
// The check reads the header and the whole BAT region [64, first_block)
// once, builds an owner map of the file's clusters and reports every
// inconsistency. Repair changes the file in this order, each step durable
// before the next, so that an interrupted repair leaves an image that is
// still consistent for what it references and is simply repaired again:
//
//   0. set the in-use marker (a crash from here on is seen as dirty);
//   1. copy each cluster referenced twice to a fresh cluster at the end --
//      when there are bad entries, only after a BAT with them zeroed is
//      durable: an entry pointing past EOF must not come to point at a
//      copy when the copies extend the file and a crash follows;
//   2. write the corrected BAT (bad entries zeroed, duplicates repointed);
//   3. truncate unreferenced clusters (and a partial cluster) at the end;
//   4. write the header: exact first-block offset, marker cleared.
#include "ploop/check.h"

#include <algorithm>
#include <array>

namespace ploop {

namespace {

using Severity = CheckProblem::Severity;

class Problems {
 public:
  explicit Problems(CheckReport& report) : report_(report) {}

  void Add(Severity severity, std::string message) {
    if (report_.problems.size() < CheckReport::kMaxListed) {
      report_.problems.push_back({severity, std::move(message), false});
    } else {
      ++report_.unlisted_problems;
    }
    if (severity == Severity::kFatal) fatal_ = true;
  }
  bool fatal() const { return fatal_; }
  bool any() const { return !report_.problems.empty(); }
  void MarkAllRepaired() {
    for (auto& p : report_.problems) {
      if (p.severity != Severity::kFatal) p.repaired = true;
    }
    report_.unlisted_repaired = true;
  }

 private:
  CheckReport& report_;
  bool fatal_ = false;
};

std::string Num(uint64_t v) { return std::to_string(v); }

}  // namespace

bool CheckReport::clean() const {
  for (const auto& p : problems) {
    if (!p.repaired) return false;
  }
  return unlisted_problems == 0 || unlisted_repaired;
}

std::string CheckReport::FirstProblem() const {
  for (const auto& p : problems) {
    if (!p.repaired) return p.message;
  }
  return clean() ? "" : std::to_string(unlisted_problems) + " more problems";
}

Result<CheckReport> CheckImage(BlockFile& file, bool repair) {
  CheckReport report;
  Problems problems(report);
  ASSIGN_OR_RETURN(report.file_bytes, file.Size());
  if (report.file_bytes < kHeaderBytes) {
    problems.Add(Severity::kFatal,
                 "file is too short for a ploop header (" + Num(report.file_bytes) + " bytes)");
    return report;
  }
  std::array<std::byte, kHeaderBytes> raw_header;
  TRY_CTX(file.ReadAt(0, raw_header), "read header");
  auto decoded = DecodeHeader(raw_header);
  if (!decoded.ok()) {
    problems.Add(Severity::kFatal, decoded.error().message());
    return report;
  }
  Header h = *decoded;
  report.header = h;
  report.header_valid = true;
  report.was_dirty = h.dirty();
  if (h.flags & kFlagFmtVersionConvert) {
    problems.Add(Severity::kFatal, "a format version conversion was interrupted");
    return report;
  }

  const uint64_t cb = h.cluster_bytes();
  const uint64_t n = h.bat_entries;
  const uint64_t min_first_block = FirstBlockBytes(n, cb);
  uint64_t first_block = h.first_block_bytes();
  bool header_changed = false;
  if (!h.v2() && first_block == 0) {
    first_block = (kHeaderBytes + 4 * n + kSectorBytes - 1) / kSectorBytes * kSectorBytes;
  } else if (h.v2() && first_block != min_first_block) {
    if (first_block < min_first_block) {
      problems.Add(Severity::kFatal, "bad first block offset " + Num(first_block) +
                                         " bytes: the BAT needs " + Num(min_first_block));
      return report;
    }
    problems.Add(Severity::kError, "first block offset is " + Num(first_block) +
                                       " bytes, expected " + Num(min_first_block));
    first_block = min_first_block;
    header_changed = true;
  }
  if (report.file_bytes < first_block) {
    problems.Add(Severity::kFatal, "file is truncated: " + Num(report.file_bytes) +
                                       " bytes, but the header and BAT need " + Num(first_block));
    return report;
  }

  // The whole BAT region: n entries, then padding slots that must be zero.
  const uint64_t slots = (first_block - kHeaderBytes) / 4;
  std::vector<std::byte> raw((first_block - kHeaderBytes) / 4 * 4);
  TRY_CTX(file.ReadAt(kHeaderBytes, raw), "read BAT");
  std::vector<uint32_t> bat(slots);
  for (uint64_t i = 0; i < slots; ++i) bat[i] = LoadLe32(raw.data() + 4 * i);
  bool bat_changed = false;

  const uint64_t file_clusters = report.file_bytes / cb;
  const uint64_t first_cluster = first_block / cb;
  auto to_cluster = [&](uint32_t e) -> uint64_t { return h.v2() ? e : e / h.cluster_sectors; };
  auto to_entry = [&](uint64_t fc) -> uint32_t {
    return static_cast<uint32_t>(h.v2() ? fc : fc * h.cluster_sectors);
  };

  constexpr uint64_t kNoOwner = UINT64_MAX;
  std::vector<uint64_t> owner(file_clusters, kNoOwner);
  std::vector<uint64_t> duplicates;  // entries whose cluster another entry owns
  uint64_t end_cluster = std::max<uint64_t>(first_cluster, (first_block + cb - 1) / cb);
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t e = bat[i];
    if (e == 0) continue;
    if (!h.v2() && e % h.cluster_sectors != 0) {
      problems.Add(Severity::kError, "BAT entry " + Num(i) + " is not cluster-aligned");
      bat[i] = 0;
      bat_changed = true;
      continue;
    }
    uint64_t fc = to_cluster(e);
    if (fc * cb < first_block) {
      problems.Add(Severity::kError, "BAT entry " + Num(i) + " points into the BAT area");
      bat[i] = 0;
      bat_changed = true;
    } else if (fc >= file_clusters) {
      problems.Add(Severity::kError, "BAT entry " + Num(i) + " points past the end of the file");
      bat[i] = 0;
      bat_changed = true;
    } else if (owner[fc] != kNoOwner) {
      problems.Add(Severity::kError, "cluster " + Num(fc) + " is used by BAT entries " +
                                         Num(owner[fc]) + " and " + Num(i));
      duplicates.push_back(i);
    } else {
      owner[fc] = i;
      ++report.allocated_clusters;
      end_cluster = std::max(end_cluster, fc + 1);
    }
  }
  for (uint64_t i = n; i < slots; ++i) {
    if (bat[i] != 0) {
      problems.Add(Severity::kError, "BAT slot " + Num(i) + " is past the disk size (" + Num(n) +
                                         " clusters) but not zero");
      bat[i] = 0;
      bat_changed = true;
    }
  }
  for (uint64_t fc = first_cluster; fc < end_cluster && fc < file_clusters; ++fc) {
    report.free_clusters += owner[fc] == kNoOwner;
  }
  const bool keep_extension = h.in_use == kInUseCleanExt && h.ext_offset_sectors != 0;
  if (!keep_extension) {
    if (file_clusters > end_cluster) {
      report.leaked_clusters = file_clusters - end_cluster;
      problems.Add(Severity::kLeak,
                   Num(report.leaked_clusters) + " unreferenced clusters at the end of the file");
    }
    if (report.file_bytes % cb != 0) {
      problems.Add(Severity::kLeak, "file length " + Num(report.file_bytes) +
                                        " is not a multiple of the cluster size");
    }
  }
  if (h.dirty()) {
    problems.Add(Severity::kError, "image was not closed cleanly (in-use marker set)");
  }

  if (!repair || problems.fatal() || !problems.any()) return report;

  // --- Repair, in the crash-safe order described at the top. ---
  auto write_header = [&](const Header& hdr) -> Status {
    std::array<std::byte, kHeaderBytes> out;
    EncodeHeader(hdr, out);
    TRY(file.WriteAt(0, out));
    return file.Sync();
  };
  Header work = h;
  work.in_use = kInUseDirty;
  TRY_CTX(write_header(work), "repair: mark in use");

  auto write_bat = [&]() -> Status {
    for (uint64_t i = 0; i < slots; ++i) StoreLe32(raw.data() + 4 * i, bat[i]);
    TRY(file.WriteAt(kHeaderBytes, raw));
    return file.Sync();
  };
  uint64_t next_cluster = end_cluster;
  if (!duplicates.empty()) {
    if (bat_changed) TRY_CTX(write_bat(), "repair: clear bad BAT entries");
    std::vector<std::byte> buf(cb);
    for (uint64_t i : duplicates) {
      uint64_t src = to_cluster(bat[i]);
      TRY_CTX(file.ReadAt(src * cb, buf), "repair: copy shared cluster");
      TRY_CTX(file.WriteAt(next_cluster * cb, buf), "repair: copy shared cluster");
      bat[i] = to_entry(next_cluster++);
      ++report.allocated_clusters;
    }
    TRY_CTX(file.Sync(), "repair: copy shared clusters");
    bat_changed = true;
  }
  if (bat_changed) TRY_CTX(write_bat(), "repair: write BAT");
  ASSIGN_OR_RETURN(uint64_t size_now, file.Size());
  if (size_now != next_cluster * cb) {
    TRY_CTX(file.Truncate(next_cluster * cb), "repair: trim file");
    TRY_CTX(file.Sync(), "repair: trim file");
  }
  if (header_changed) work.first_block_sectors = static_cast<uint32_t>(first_block / kSectorBytes);
  work.in_use = kInUseClean;
  work.ext_offset_sectors = 0;
  TRY_CTX(write_header(work), "repair: mark clean");
  report.header = work;
  report.file_bytes = next_cluster * cb;
  report.leaked_clusters = 0;
  problems.MarkAllRepaired();
  return report;
}

}  // namespace ploop
