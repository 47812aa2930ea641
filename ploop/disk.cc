#include "ploop/disk.h"

#include <algorithm>
#include <array>
#include <map>
#include <set>

#include "ploop/delta.h"
#include "ploop/lock.h"

namespace ploop {

bool IsDescriptorPath(FileSystem& fs, const std::string& path, std::string* descriptor_path) {
  if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".xml") == 0) {
    *descriptor_path = path;
    return true;
  }
  std::string inside = JoinPath(path, std::string(kDescriptorFileName));
  auto listed = fs.ListDir(path);  // succeeds only for a folder
  if (listed.ok()) {
    for (const auto& name : *listed) {
      if (name == kDescriptorFileName) {
        *descriptor_path = inside;
        return true;
      }
    }
  }
  return false;
}

Status CreateDisk(FileSystem& fs, const std::string& image_path, const CreateOptions& options) {
  const std::string dir = DirName(image_path);
  const std::string dd_path = JoinPath(dir, std::string(kDescriptorFileName));
  ASSIGN_OR_RETURN(bool dd_exists, fs.Exists(dd_path));
  if (dd_exists) return Status::AlreadyExists(dd_path + " already exists");
  ASSIGN_OR_RETURN(bool image_exists, fs.Exists(image_path));
  if (image_exists) return Status::AlreadyExists(image_path + " already exists");

  // The descriptor first (in memory): it validates the size and names.
  const bool raw = options.kind == ImageKind::kRaw;
  ASSIGN_OR_RETURN(Header header, MakeHeader(options.size_bytes, options.cluster_bytes));
  const uint64_t size = raw ? options.size_bytes : header.size_bytes();
  ASSIGN_OR_RETURN(Descriptor dd,
                   Descriptor::NewSingle(dd_path, size, options.cluster_bytes, options.kind,
                                         BaseName(image_path), kTopGuid,
                                         options.kind == ImageKind::kPreallocated, header.cylinders,
                                         header.heads));
  ASSIGN_OR_RETURN(auto image, CreateImage(fs, image_path, options));
  Status s = image->Close();
  image.reset();
  if (s.ok()) s = dd.Save(fs);
  if (!s.ok()) {
    fs.Remove(image_path).IgnoreError();
    return s;
  }
  return Status::Ok();
}

Result<std::unique_ptr<Chain>> OpenDisk(FileSystem& fs, const std::string& dd_path,
                                        std::string_view guid, const OpenOptions& options,
                                        const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  return Chain::Open(fs, dd, guid, options);
}

Status RestoreDescriptor(FileSystem& fs, const std::string& dir, const std::string& image_path,
                         bool raw) {
  const std::string dd_path = JoinPath(dir, std::string(kDescriptorFileName));
  ASSIGN_OR_RETURN(bool dd_exists, fs.Exists(dd_path));
  if (dd_exists) return Status::AlreadyExists(dd_path + " already exists");
  ASSIGN_OR_RETURN(std::string real_dir, fs.RealPath(dir.empty() ? "." : dir));
  ASSIGN_OR_RETURN(std::string image_dir,
                   fs.RealPath(DirName(image_path).empty() ? "." : DirName(image_path)));
  if (real_dir != image_dir) {
    return Status::InvalidArgument(image_path + " is not in " + dir +
                                   "; a descriptor names images in its own folder");
  }
  OpenOptions open;
  open.raw = raw;
  open.lock = false;
  ASSIGN_OR_RETURN(auto image, OpenImage(fs, image_path, open));
  uint64_t size = image->size_bytes();
  uint64_t cluster = image->cluster_bytes();
  bool preallocated = false;
  if (raw) {
    cluster = 0;
    for (uint64_t c = kDefaultClusterBytes; c >= kMinClusterBytes; c /= 2) {
      if (size % c == 0) {
        cluster = c;
        break;
      }
    }
    if (cluster == 0) {
      return Status::InvalidArgument(image_path + ": a raw image's size must be a multiple of 32K");
    }
  } else {
    preallocated = image->kind() == ImageKind::kPreallocated;
  }
  ASSIGN_OR_RETURN(Header chs, MakeHeader(size, cluster));
  if (auto* delta = dynamic_cast<Delta*>(image.get())) {
    size = delta->header().size_bytes();
    chs.heads = delta->header().heads;
    chs.cylinders = delta->header().cylinders;
  }
  image.reset();
  ASSIGN_OR_RETURN(Descriptor dd,
                   Descriptor::NewSingle(
                       dd_path, size, cluster, raw ? ImageKind::kRaw : ImageKind::kExpanded,
                       BaseName(image_path), kTopGuid, preallocated, chs.cylinders, chs.heads));
  return dd.Save(fs);
}

Result<std::vector<DeltaInfo>> DescribeDisk(FileSystem& fs, const Descriptor& dd) {
  std::set<std::string> active;
  for (const auto& image : dd.Chain()) active.insert(image.guid);
  std::vector<DeltaInfo> out;
  for (const auto& image : dd.images()) {
    DeltaInfo info;
    info.image = image;
    info.parent_guid = dd.FindShot(image.guid)->parent_guid;
    info.in_active_chain = active.count(image.guid) > 0;
    OpenOptions open;
    open.raw = image.kind == ImageKind::kRaw;
    open.lock = false;
    ASSIGN_OR_RETURN_CTX(auto opened, OpenImage(fs, image.path, open),
                         "delta " + image.guid + " (" + image.file + ")");
    ASSIGN_OR_RETURN(ImageStats st, opened->Stats());
    info.size_bytes = opened->size_bytes();
    info.file_bytes = st.file_bytes;
    info.allocated_clusters = st.allocated_clusters;
    if (auto* delta = dynamic_cast<Delta*>(opened.get())) info.dirty = delta->header().dirty();
    out.push_back(std::move(info));
  }
  return out;
}

bool DiskCheckReport::clean() const {
  for (const auto& p : problems) {
    if (!p.repaired) return false;
  }
  for (const auto& d : deltas) {
    if (d.missing || !d.report.clean()) return false;
  }
  return true;
}

std::string DiskCheckReport::FirstProblem() const {
  for (const auto& p : problems) {
    if (!p.repaired) return p.message;
  }
  for (const auto& d : deltas) {
    if (d.missing) return "delta " + d.guid + ": " + d.file + " is missing";
    if (!d.report.clean()) return "delta " + d.guid + ": " + d.report.FirstProblem();
  }
  return "";
}

namespace {

// "root.hds.{5fbaabe3-6958-40ff-92a7-860e329aab41}": the names snapshot
// operations give new deltas.
bool HasGuidSuffix(const std::string& name) {
  size_t dot = name.rfind(".{");
  return dot != std::string::npos && ParseGuid(name.substr(dot + 1)).ok();
}

}  // namespace

Result<DiskCheckReport> CheckDisk(FileSystem& fs, const std::string& dd_path, bool repair,
                                  const DescriptorLoadOptions& load) {
  ASSIGN_OR_RETURN(Descriptor dd, Descriptor::Load(fs, dd_path, load));
  DiskCheckReport report;
  using Severity = CheckProblem::Severity;
  std::map<std::string, uint64_t> sizes;
  for (const auto& image : dd.images()) {
    DiskCheckReport::Delta entry;
    entry.guid = image.guid;
    entry.file = image.file;
    ASSIGN_OR_RETURN(bool exists, fs.Exists(image.path));
    if (!exists) {
      entry.missing = true;
      report.deltas.push_back(std::move(entry));
      continue;
    }
    ASSIGN_OR_RETURN_CTX(auto file,
                         fs.Open(image.path, repair ? OpenMode::kReadWrite : OpenMode::kReadOnly),
                         "delta " + image.guid);
    TRY_CTX(LockImage(*file, repair), "delta " + image.guid);
    if (image.kind == ImageKind::kRaw) {
      ASSIGN_OR_RETURN(sizes[image.guid], file->Size());
    } else {
      ASSIGN_OR_RETURN_CTX(entry.report, CheckImage(*file, repair), "delta " + image.guid);
      if (entry.report.header_valid) {
        sizes[image.guid] = entry.report.header.size_bytes();
        if (entry.report.header.cluster_bytes() != dd.cluster_bytes()) {
          report.problems.push_back({Severity::kFatal,
                                     "delta " + image.guid + " has cluster size " +
                                         std::to_string(entry.report.header.cluster_bytes()) +
                                         " but the descriptor says " +
                                         std::to_string(dd.cluster_bytes()),
                                     false});
        }
      }
    }
    report.deltas.push_back(std::move(entry));
  }
  // Sizes never shrink going up a chain.
  for (const auto& shot : dd.shots()) {
    // A merge into a root (the base) is interrupted just like one into a
    // middle delta: check this before skipping roots below.
    if (shot.temporary && dd.Children(shot.guid).size() == 1) {
      report.problems.push_back(
          {Severity::kError,
           "merge into " + shot.guid + " was interrupted; run snapshot-merge or check --repair",
           false});
    }
    if (shot.parent_guid == kNullGuid) continue;
    auto child = sizes.find(shot.guid);
    auto parent = sizes.find(shot.parent_guid);
    if (child != sizes.end() && parent != sizes.end() && parent->second > child->second) {
      report.problems.push_back(
          {Severity::kFatal, "delta " + shot.parent_guid + " is larger than its child " + shot.guid,
           false});
    }
  }
  // Delta files in the folder that the descriptor does not name.
  std::set<std::string> referenced;
  for (const auto& image : dd.images()) referenced.insert(BaseName(image.path));
  ASSIGN_OR_RETURN(auto names, fs.ListDir(dd.folder()));
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    if (referenced.count(name) || name == kDescriptorFileName) continue;
    if (name == std::string(kDescriptorFileName) + ".tmp") {
      // A descriptor save cut before its rename: the real descriptor is
      // the one in force, this copy is garbage.
      CheckProblem p{Severity::kLeak, "leftover " + name + " from an interrupted save", false};
      if (repair) p.repaired = fs.Remove(JoinPath(dd.folder(), name)).ok();
      report.problems.push_back(std::move(p));
      continue;
    }
    const std::string path = JoinPath(dd.folder(), name);
    auto file = fs.Open(path, OpenMode::kReadOnly);
    if (!file.ok()) continue;
    std::array<std::byte, 16> sig{};
    ASSIGN_OR_RETURN(uint64_t size, (*file)->Size());
    const bool read = size >= sig.size() && (*file)->ReadAt(0, sig).ok();
    // A crash during the creation of a snapshot's delta can leave its file
    // empty or with zeros where the header should be (created, never
    // written); with the snapshot naming pattern that is a leftover too.
    const bool unwritten = HasGuidSuffix(name) && (size == 0 || (read && IsZero(sig)));
    if (!unwritten && !(read && HasPloopSignature(sig))) continue;
    file->reset();
    CheckProblem p{Severity::kLeak, "orphan delta file " + name + " is not in the descriptor",
                   false};
    if (repair && HasGuidSuffix(name)) {
      // Left behind by an interrupted snapshot operation: nothing names it.
      p.repaired = fs.Remove(path).ok();
      if (p.repaired) p.message += " (removed)";
    }
    report.problems.push_back(std::move(p));
  }
  return report;
}

}  // namespace ploop
