// Commands on whole disks (DiskDescriptor.xml): snapshots, restore of a
// lost descriptor, and the disk forms of info and check.
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "online.h"
#include "ploop/disk.h"
#include "snapshot/snapshot.h"
#include "units.h"

namespace ploop::cli {

namespace {

using nlohmann::json;

// Resolves FILE to a descriptor path; prints the error otherwise.
std::optional<std::string> Descriptor(std::string_view command, const std::string& file, int* rc) {
  std::string dd_path;
  if (IsDescriptorPath(DefaultFileSystem(), file, &dd_path)) return dd_path;
  *rc = Usage(command, file + " is not a DiskDescriptor.xml (nor a folder holding one)");
  return std::nullopt;
}

const char* SeverityName(CheckProblem::Severity s) {
  switch (s) {
    case CheckProblem::Severity::kFatal:
      return "fatal";
    case CheckProblem::Severity::kError:
      return "error";
    case CheckProblem::Severity::kLeak:
      return "leak";
  }
  return "?";
}

}  // namespace

int RunSnapshot(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto dd = Descriptor("snapshot", args.dd, &rc);
  if (!dd) return rc;
  if (auto mounted = ActiveMount(*dd)) {
    // Online: the daemon freezes the file system, switches to a new top
    // and saves the descriptor (online.cc).
    auto reply = OnlineCall(*mounted, {{"cmd", "snapshot"}, {"guid", args.guid}});
    if (!reply.ok()) return Fail("snapshot", reply.error());
    // The pause is in the daemon's log too.
    if (args.json) {
      std::cout << json{{"guid", reply->value("guid", "")},
                        {"online", true},
                        {"device", mounted->device},
                        {"frozen", reply->value("frozen", json::array())},
                        {"pause_ms", reply->value("pause_ms", 0.0)},
                        {"freeze_ms", reply->value("freeze_ms", 0.0)},
                        {"switch_ms", reply->value("switch_ms", 0.0)}}
                       .dump()
                << "\n";
    } else {
      std::cout << reply->value("guid", "") << "\n";
    }
    return kExitOk;
  }
  auto guid = CreateSnapshot(DefaultFileSystem(), *dd, args.guid, LoadOptions());
  if (!guid.ok()) return Fail("snapshot", guid.error());
  if (args.json) {
    std::cout << json{{"guid", *guid}, {"online", false}}.dump() << "\n";
  } else {
    std::cout << *guid << "\n";
  }
  return kExitOk;
}

int RunSnapshotList(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto path = Descriptor("snapshot-list", args.dd, &rc);
  if (!path) return rc;
  auto dd = ploop::Descriptor::Load(DefaultFileSystem(), *path, LoadOptions());
  if (!dd.ok()) return Fail("snapshot-list", dd.error());
  if (args.json) {
    json out = json::array();
    for (const auto& shot : dd->shots()) {
      const DescriptorImage* image = dd->FindImage(shot.guid);
      out.push_back({{"guid", shot.guid},
                     {"parent_guid", shot.parent_guid},
                     {"current", shot.guid == dd->top_guid()},
                     {"temporary", shot.temporary},
                     {"file", image->file}});
    }
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  // The tree, roots first, children indented under their parent.
  std::cout << "GUID                                    PARENT                                  "
               "FILE\n";
  std::function<void(const std::string&, int)> walk = [&](const std::string& parent, int depth) {
    for (const auto& child : dd->Children(parent)) {
      const DescriptorImage* image = dd->FindImage(child);
      std::cout << std::string(2 * depth, ' ') << child << (child == dd->top_guid() ? " *" : "  ")
                << dd->FindShot(child)->parent_guid << "  " << image->file
                << (dd->FindShot(child)->temporary ? "  (temporary)" : "") << "\n";
      walk(child, depth + 1);
    }
  };
  walk(std::string(kNullGuid), 0);
  std::cout << "(* = current top)\n";
  return kExitOk;
}

int RunSnapshotDelete(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto dd = Descriptor("snapshot-delete", args.dd, &rc);
  if (!dd) return rc;
  if (args.guid.empty()) return Usage("snapshot-delete", "-u GUID is required");
  Status s = DeleteSnapshot(DefaultFileSystem(), *dd, args.guid, LoadOptions());
  return s.ok() ? kExitOk : Fail("snapshot-delete", s);
}

int RunSnapshotMerge(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto dd = Descriptor("snapshot-merge", args.dd, &rc);
  if (!dd) return rc;
  if (args.all && !args.guid.empty())
    return Usage("snapshot-merge", "-u and -A exclude each other");
  if (auto online = MergeIfMounted(*dd, args.guid, args.all)) return *online;
  Status s = args.all ? MergeAll(DefaultFileSystem(), *dd, LoadOptions())
                      : MergeSnapshot(DefaultFileSystem(), *dd, args.guid, LoadOptions());
  return s.ok() ? kExitOk : Fail("snapshot-merge", s);
}

int RunSnapshotSwitch(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto dd = Descriptor("snapshot-switch", args.dd, &rc);
  if (!dd) return rc;
  if (args.guid.empty()) return Usage("snapshot-switch", "-u GUID is required");
  Status s = SwitchSnapshot(DefaultFileSystem(), *dd, args.guid, LoadOptions());
  return s.ok() ? kExitOk : Fail("snapshot-switch", s);
}

int RunCompact(const SnapshotArgs& args) {
  int rc = kExitOk;
  auto dd = Descriptor("compact", args.dd, &rc);
  if (!dd) return rc;
  Result<CompactResult> result = CompactDisk(DefaultFileSystem(), *dd, LoadOptions());
  if (!result.ok()) return Fail("compact", result.error());
  if (args.json) {
    json out = json::array();
    for (const auto& d : result->deltas) {
      out.push_back({{"guid", d.guid},
                     {"file", d.file},
                     {"moved_clusters", d.moved_clusters},
                     {"dropped_zero_clusters", d.dropped_zero_clusters},
                     {"bytes_before", d.bytes_before},
                     {"bytes_after", d.bytes_after}});
    }
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  uint64_t before = 0, after = 0;
  for (const auto& d : result->deltas) {
    before += d.bytes_before;
    after += d.bytes_after;
    std::cout << d.file << ": " << HumanSize(d.bytes_before) << " -> " << HumanSize(d.bytes_after)
              << " (" << d.moved_clusters << " clusters moved";
    if (d.dropped_zero_clusters > 0)
      std::cout << ", " << d.dropped_zero_clusters << " zero clusters dropped";
    std::cout << ")\n";
  }
  std::cout << "compacted " << result->deltas.size() << " delta(s): " << HumanSize(before) << " -> "
            << HumanSize(after) << "\n";
  return kExitOk;
}

int RunRestoreDescriptor(const RestoreArgs& args) {
  if (!args.format.empty() && args.format != "raw" && args.format != "ploop") {
    return Usage("restore-descriptor", "unknown format '" + args.format + "' (use raw or ploop)");
  }
  Status s = RestoreDescriptor(DefaultFileSystem(), args.dir, args.image, args.format == "raw");
  if (!s.ok()) return Fail("restore-descriptor", s);
  std::cout << "Wrote " << JoinPath(args.dir, std::string(kDescriptorFileName)) << "\n";
  return kExitOk;
}

int RunDiskInfo(const std::string& dd_path, bool as_json) {
  FileSystem& fs = DefaultFileSystem();
  auto dd = ploop::Descriptor::Load(fs, dd_path, LoadOptions());
  if (!dd.ok()) return Fail("info", dd.error());
  auto deltas = DescribeDisk(fs, *dd);
  if (!deltas.ok()) return Fail("info", deltas.error());
  uint64_t virtual_size = 0;
  for (const auto& d : *deltas) {
    if (d.image.guid == dd->top_guid()) virtual_size = d.size_bytes;
  }
  json j;
  j["descriptor"] = dd_path;
  j["virtual_size"] = virtual_size;
  j["cluster_size"] = dd->cluster_bytes();
  j["preallocated"] = dd->preallocated();
  j["top"] = dd->top_guid();
  j["chain"] = json::array();
  for (const auto& image : dd->Chain()) j["chain"].push_back(image.guid);
  j["deltas"] = json::array();
  for (const auto& d : *deltas) {
    j["deltas"].push_back({{"guid", d.image.guid},
                           {"parent_guid", d.parent_guid},
                           {"file", d.image.file},
                           {"type", d.image.kind == ImageKind::kRaw ? "raw" : "ploop"},
                           {"in_chain", d.in_active_chain},
                           {"virtual_size", d.size_bytes},
                           {"file_size", d.file_bytes},
                           {"allocated_clusters", d.allocated_clusters},
                           {"allocated_bytes", d.allocated_clusters * dd->cluster_bytes()},
                           {"dirty", d.dirty}});
  }
  if (as_json) {
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << "descriptor:    " << dd_path << "\n"
            << "virtual size:  " << HumanSize(virtual_size) << " (" << virtual_size << " bytes)\n"
            << "cluster size:  " << HumanSize(dd->cluster_bytes()) << "\n"
            << "deltas:        " << deltas->size() << " (" << dd->Chain().size()
            << " in the active chain)\n";
  std::cout << "chain (base first):\n";
  for (const auto& d : *deltas) {
    if (!d.in_active_chain) continue;
    std::cout << "  " << d.image.guid << (d.image.guid == dd->top_guid() ? " (top)" : "") << "  "
              << d.image.file << "  size " << HumanSize(d.size_bytes) << ", file "
              << HumanSize(d.file_bytes) << ", allocated "
              << HumanSize(d.allocated_clusters * dd->cluster_bytes()) << (d.dirty ? ", DIRTY" : "")
              << "\n";
  }
  for (const auto& d : *deltas) {
    if (d.in_active_chain) continue;
    std::cout << "  off-chain " << d.image.guid << "  " << d.image.file << "  file "
              << HumanSize(d.file_bytes) << "\n";
  }
  return kExitOk;
}

int RunDiskCheck(const std::string& dd_path, bool repair, bool as_json) {
  FileSystem& fs = DefaultFileSystem();
  int finished = 0;
  if (repair) {
    auto r = FinishInterruptedMerges(fs, dd_path, LoadOptions());
    if (!r.ok()) return Fail("check", r.error());
    finished = *r;
  }
  auto report = CheckDisk(fs, dd_path, repair, LoadOptions());
  if (!report.ok()) return Fail("check", report.error());
  bool fatal = false;
  for (const auto& p : report->problems) fatal |= p.severity == CheckProblem::Severity::kFatal;
  for (const auto& d : report->deltas) {
    fatal |= d.missing;
    for (const auto& p : d.report.problems) fatal |= p.severity == CheckProblem::Severity::kFatal;
  }
  const bool clean = report->clean();
  if (as_json) {
    json j;
    j["descriptor"] = dd_path;
    j["clean"] = clean;
    j["repairable"] = !fatal;
    j["merges_finished"] = finished;
    j["problems"] = json::array();
    for (const auto& p : report->problems) {
      j["problems"].push_back({{"severity", SeverityName(p.severity)},
                               {"message", p.message},
                               {"repaired", p.repaired}});
    }
    j["deltas"] = json::array();
    for (const auto& d : report->deltas) {
      json problems = json::array();
      for (const auto& p : d.report.problems) {
        problems.push_back({{"severity", SeverityName(p.severity)},
                            {"message", p.message},
                            {"repaired", p.repaired}});
      }
      j["deltas"].push_back({{"guid", d.guid},
                             {"file", d.file},
                             {"missing", d.missing},
                             {"clean", !d.missing && d.report.clean()},
                             {"problems", problems}});
    }
    std::cout << j.dump(2) << "\n";
  } else {
    if (finished > 0)
      std::cout << dd_path << ": finished " << finished << " interrupted merge(s)\n";
    for (const auto& d : report->deltas) {
      if (d.missing) std::cout << d.file << ": file is missing\n";
      for (const auto& p : d.report.problems) {
        std::cout << d.file << ": " << p.message << (p.repaired ? " [repaired]" : "") << "\n";
      }
    }
    for (const auto& p : report->problems) {
      std::cout << dd_path << ": " << p.message << (p.repaired ? " [repaired]" : "") << "\n";
    }
    if (clean) {
      std::cout << dd_path << ": " << report->deltas.size() << " deltas, "
                << (finished > 0 || !report->problems.empty() ? "repaired" : "no problems found")
                << "\n";
    } else if (fatal) {
      std::cout << dd_path << ": corrupt beyond repair\n";
    } else {
      std::cout << dd_path << ": problems found; run 'ploop check --repair " << dd_path << "'\n";
    }
  }
  if (clean) return kExitOk;
  return fatal ? kExitCorrupt : kExitProblems;
}

}  // namespace ploop::cli
