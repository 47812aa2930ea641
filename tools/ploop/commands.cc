#include "commands.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "cli_common.h"
#include "online.h"
#include "ploop/check.h"
#include "ploop/convert.h"
#include "ploop/delta.h"
#include "ploop/disk.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "ploop/lock.h"
#include "snapshot/snapshot.h"
#include "units.h"

namespace ploop::cli {

using nlohmann::json;

namespace {
std::function<std::string(const std::string&)> g_busy_explainer;
}  // namespace

void SetBusyExplainer(std::function<std::string(const std::string&)> explainer) {
  g_busy_explainer = std::move(explainer);
}

int Fail(std::string_view command, const Status& status) {
  std::string message = status.message();
  if (status.code() == StatusCode::kBusy && g_busy_explainer) {
    // "X is in use by another program ..." -> "X is in use by /dev/loop3 ...".
    if (std::string who = g_busy_explainer(message); !who.empty()) {
      const std::string generic = "in use by another program";
      size_t at = message.find(generic);
      message = at == std::string::npos ? message + ": in use by " + who
                                        : message.substr(0, at) + "in use by " + who;
    }
  }
  std::cerr << "ploop " << command << ": " << message;
  // A corrupt image: point at the command that diagnoses and repairs it
  // (not for a file that is simply not a ploop image).
  if (status.code() == StatusCode::kCorruption && command != "check" &&
      status.message().find("-f raw") == std::string::npos) {
    std::cerr << " (run 'ploop check' on it)";
  }
  std::cerr << "\n";
  return ExitCodeFor(status);
}

int Usage(std::string_view command, const std::string& message) {
  std::cerr << "ploop " << command << ": " << message << "\n";
  return kExitUsage;
}

std::optional<uint64_t> SizeArg(const std::string& text, const char* what, std::string_view cmd,
                                int* rc) {
  auto v = ParseSize(text);
  if (!v)
    *rc = Usage(cmd,
                std::string("invalid ") + what + " '" + text + "' (use e.g. 4096, 64K, 1M, 10G)");
  return v;
}

namespace {
bool g_allow_outside_files = false;
}  // namespace

DescriptorLoadOptions LoadOptions() {
  DescriptorLoadOptions load;
  load.allow_outside_files = g_allow_outside_files;
  return load;
}

namespace {

// Opens FILE for a command: a DiskDescriptor.xml (or a folder holding one)
// opens the disk's chain (up to snapshot `guid` when given); anything else
// is one image file, raw when asked with -f raw, otherwise a ploop image.
// A writable open of a disk first finishes a merge a crash interrupted.
Result<std::unique_ptr<Image>> OpenFor(const std::string& file, const std::string& format,
                                       bool writable, bool lock = true,
                                       const std::string& guid = "") {
  OpenOptions options;
  options.writable = writable;
  options.lock = lock;
  FileSystem& fs = DefaultFileSystem();
  std::string dd_path;
  if (IsDescriptorPath(fs, file, &dd_path)) {
    if (!format.empty()) {
      return Status::InvalidArgument("-f applies to image files, not to a descriptor");
    }
    if (writable) TRY(FinishInterruptedMerges(fs, dd_path, LoadOptions()).status());
    ASSIGN_OR_RETURN(auto chain, OpenDisk(fs, dd_path, guid, options, LoadOptions()));
    return std::unique_ptr<Image>(std::move(chain));
  }
  if (!guid.empty()) {
    return Status::InvalidArgument("-u selects a snapshot of a disk: give its DiskDescriptor.xml");
  }
  if (!format.empty()) {
    if (format != "raw" && format != "ploop" && format != "expanded" && format != "ploop1") {
      return Status::InvalidArgument("unknown format '" + format + "' (use raw or ploop)");
    }
    options.raw = format == "raw";
  }
  auto image = OpenImage(fs, file, options);
  if (!image.ok() && image.error().code() == StatusCode::kCorruption && !options.raw &&
      image.error().message().find("bad signature") != std::string::npos) {
    return Status::Corruption(file +
                              ": not a ploop image (bad signature); use -f raw for a raw file");
  }
  return image;
}

Result<CreateOptions> CreateArgs(const std::string& format, const std::string& cluster,
                                 bool allow_raw) {
  CreateOptions options;
  auto kind = ParseImageKind(format);
  if (!kind || (!allow_raw && *kind == ImageKind::kRaw)) {
    return Status::InvalidArgument("unknown image kind '" + format + "' (use expanded" +
                                   (allow_raw ? ", preallocated or raw)" : " or preallocated)"));
  }
  options.kind = *kind;
  if (!cluster.empty()) {
    auto cb = ParseSize(cluster);
    if (!cb) return Status::InvalidArgument("invalid cluster size '" + cluster + "'");
    if (!IsValidClusterBytes(*cb)) {
      return Status::InvalidArgument("cluster size " + cluster +
                                     " is not a power of two from 32K to 64M");
    }
    options.cluster_bytes = *cb;
  }
  return options;
}

}  // namespace

void SetAllowOutsideFiles(bool allow) { g_allow_outside_files = allow; }

int ExitCodeFor(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return kExitOk;
    case StatusCode::kInvalidArgument:
      return kExitUsage;
    case StatusCode::kNotFound:
      return kExitNotFound;
    case StatusCode::kAlreadyExists:
      return kExitExists;
    case StatusCode::kCorruption:
      return kExitCorrupt;
    case StatusCode::kNotSupported:
      return kExitUnsupported;
    case StatusCode::kIOError:
      return kExitIo;
    case StatusCode::kNoSpace:
      return kExitNoSpace;
    case StatusCode::kBusy:
      return kExitBusy;
    case StatusCode::kFailedPrecondition:
      return kExitState;
  }
  return kExitIo;
}

const char* ExitCodeTable() {
  return "Exit codes:\n"
         "  0  success (check: the image is clean, or was repaired)\n"
         "  1  check found problems; io 'read -P' found other data\n"
         "  2  bad command line or argument value\n"
         "  3  file not found\n"
         "  4  file already exists\n"
         "  5  image is corrupt or not a ploop image\n"
         "  6  not supported\n"
         "  7  I/O error\n"
         "  8  no space left on the host file system\n"
         "  9  image is in use by another program\n"
         " 10  wrong state (read-only image, shrinking, ...)\n"
         " 11  receive interrupted: partial state kept, continue with receive --resume\n";
}

int RunInit(const InitArgs& args) {
  int rc = kExitOk;
  auto size = SizeArg(args.size, "size", "init", &rc);
  if (!size) return rc;
  auto options = CreateArgs(args.format, args.cluster, /*allow_raw=*/true);
  if (!options.ok()) return Fail("init", options.error());
  options->size_bytes = *size;
  auto fs_type = InitFsType(args);
  if (!fs_type.ok()) return Fail("init", fs_type.error());
  if (!args.no_descriptor) {
    // OpenVZ layout: DIR/root.hds and DIR/DiskDescriptor.xml.
    FileSystem& fs = DefaultFileSystem();
    if (Status s = CreateDisk(fs, args.file, *options); !s.ok()) {
      return Fail("init", s);
    }
    std::string dd_path = JoinPath(DirName(args.file), std::string(kDescriptorFileName));
    std::string fs_summary;
    if (*fs_type != "none") {
      // The disk is ours and new: a failed mkfs leaves nothing behind.
      auto remove_disk = [&] {
        fs.Remove(dd_path).IgnoreError();
        fs.Remove(args.file).IgnoreError();
      };
      OpenOptions open;
      open.writable = true;
      auto chain = OpenDisk(fs, dd_path, "", open, LoadOptions());
      if (!chain.ok()) {
        remove_disk();
        return Fail("init", chain.error());
      }
      auto made = MakeInitFilesystem(args, **chain);
      Status closed = (*chain)->Close();
      if (!made.ok() || !closed.ok()) {
        chain->reset();
        remove_disk();
        return Fail("init", made.ok() ? closed : made.error());
      }
      fs_summary = ", " + *made;
    }
    std::cout << "Created " << args.file << " and " << dd_path << ": "
              << ImageKindName(options->kind) << ", " << HumanSize(*size) << fs_summary << "\n";
    return kExitOk;
  }
  auto image = CreateImage(DefaultFileSystem(), args.file, *options);
  if (!image.ok()) return Fail("init", image.error());
  uint64_t virtual_size = (*image)->size_bytes();
  std::string fs_summary;
  Status s;
  if (*fs_type != "none") {
    auto made = MakeInitFilesystem(args, **image);
    if (made.ok()) fs_summary = ", " + *made;
    s = made.status();
  }
  if (s.ok()) s = (*image)->Close();
  if (!s.ok()) {
    // The file is ours and new: a failed init leaves nothing behind.
    image->reset();
    DefaultFileSystem().Remove(args.file).IgnoreError();
    return Fail("init", s);
  }
  std::cout << "Created " << args.file << ": " << ImageKindName(options->kind) << ", "
            << HumanSize(virtual_size) << fs_summary << "\n";
  return kExitOk;
}

int RunInfo(const InfoArgs& args) {
  std::string dd_path;
  if (args.format.empty() && IsDescriptorPath(DefaultFileSystem(), args.file, &dd_path)) {
    return RunDiskInfo(dd_path, args.json);
  }
  // Read-only and without taking the lock: info only looks at metadata and
  // must work on an image another program has open.
  auto opened = OpenFor(args.file, args.format, /*writable=*/false, /*lock=*/false);
  if (!opened.ok()) return Fail("info", opened.error());
  Image& image = **opened;
  auto stats = image.Stats();
  if (!stats.ok()) return Fail("info", stats.error());
  const auto* delta = dynamic_cast<const Delta*>(&image);
  json j;
  j["file"] = args.file;
  j["format"] = delta ? "ploop" : "raw";
  if (delta) j["version"] = delta->header().v2() ? 2 : 1;
  j["kind"] = std::string(ImageKindName(image.kind()));
  j["virtual_size"] = image.size_bytes();
  j["cluster_size"] = image.cluster_bytes();
  j["allocated_clusters"] = stats->allocated_clusters;
  j["allocated_bytes"] = stats->allocated_clusters * image.cluster_bytes();
  j["file_size"] = stats->file_bytes;
  j["dirty"] = delta ? delta->header().dirty() : false;
  if (args.json) {
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << "file:          " << args.file << "\n";
  if (delta) {
    std::cout << "format:        ploop v" << (delta->header().v2() ? 2 : 1) << " ("
              << (delta->header().v2() ? kSignatureV2 : kSignatureV1) << ")\n";
  } else {
    std::cout << "format:        raw\n";
  }
  std::cout << "kind:          " << ImageKindName(image.kind()) << "\n"
            << "virtual size:  " << HumanSize(image.size_bytes()) << " (" << image.size_bytes()
            << " bytes)\n"
            << "cluster size:  " << HumanSize(image.cluster_bytes()) << "\n"
            << "allocated:     " << stats->allocated_clusters << " clusters ("
            << HumanSize(stats->allocated_clusters * image.cluster_bytes()) << ")\n"
            << "file size:     " << HumanSize(stats->file_bytes) << " (" << stats->file_bytes
            << " bytes)\n"
            << "dirty:         " << (j["dirty"].get<bool>() ? "yes (not closed cleanly)" : "no")
            << "\n";
  return kExitOk;
}

int RunCheck(const CheckArgs& args) {
  FileSystem& fs = DefaultFileSystem();
  std::string dd_path;
  if (IsDescriptorPath(fs, args.file, &dd_path))
    return RunDiskCheck(dd_path, args.repair, args.json);
  auto file = fs.Open(args.file, args.repair ? OpenMode::kReadWrite : OpenMode::kReadOnly);
  if (!file.ok()) return Fail("check", file.error());
  if (Status s = LockImage(**file, args.repair); !s.ok()) return Fail("check", s);
  auto report = CheckImage(**file, args.repair);
  if (!report.ok()) return Fail("check", report.error());
  bool fatal = false;
  for (const auto& p : report->problems) fatal |= p.severity == CheckProblem::Severity::kFatal;
  const bool clean = report->clean();
  if (args.json) {
    json j;
    j["file"] = args.file;
    j["clean"] = clean;
    j["repairable"] = !fatal;
    j["was_dirty"] = report->was_dirty;
    j["allocated_clusters"] = report->allocated_clusters;
    j["leaked_clusters"] = report->leaked_clusters;
    j["free_clusters"] = report->free_clusters;
    j["file_size"] = report->file_bytes;
    j["problems"] = json::array();
    for (const auto& p : report->problems) {
      const char* sev = p.severity == CheckProblem::Severity::kFatal   ? "fatal"
                        : p.severity == CheckProblem::Severity::kError ? "error"
                                                                       : "leak";
      j["problems"].push_back(
          {{"severity", sev}, {"message", p.message}, {"repaired", p.repaired}});
    }
    j["unlisted_problems"] = report->unlisted_problems;
    std::cout << j.dump(2) << "\n";
  } else {
    for (const auto& p : report->problems) {
      std::cout << args.file << ": " << p.message << (p.repaired ? " [repaired]" : "") << "\n";
    }
    if (report->unlisted_problems > 0) {
      std::cout << args.file << ": ... and " << report->unlisted_problems << " more problems"
                << (report->unlisted_repaired ? " [repaired]" : "") << "\n";
    }
    if (report->problems.empty()) {
      std::cout << args.file << ": no problems found; " << report->allocated_clusters
                << " clusters allocated\n";
    } else if (clean) {
      std::cout << args.file << ": repaired\n";
    } else if (fatal) {
      std::cout << args.file << ": corrupt beyond repair\n";
    } else {
      std::cout << args.file << ": problems found; run 'ploop check --repair " << args.file
                << "'\n";
    }
  }
  if (clean) return kExitOk;
  return fatal ? kExitCorrupt : kExitProblems;
}

int RunImport(const ImportArgs& args) {
  auto options = CreateArgs(args.format, args.cluster, /*allow_raw=*/false);
  if (!options.ok()) return Fail("import", options.error());
  Status s = ImportRaw(DefaultFileSystem(), args.src, args.dst, *options);
  if (!s.ok()) return Fail("import", s);
  return kExitOk;
}

int RunExport(const ExportArgs& args) {
  auto image = OpenFor(args.src, args.format, /*writable=*/false, /*lock=*/true, args.guid);
  if (!image.ok()) return Fail("export", image.error());
  Status s = ExportRaw(**image, DefaultFileSystem(), args.dst);
  if (!s.ok()) return Fail("export", s);
  return kExitOk;
}

int RunResize(const ResizeArgs& args) {
  int rc = kExitOk;
  auto size = SizeArg(args.size, "size", "resize", &rc);
  if (!size) return rc;
  std::string dd_path;
  if (IsDescriptorPath(DefaultFileSystem(), args.file, &dd_path)) {
    return ResizeDescriptorDisk(dd_path, *size);
  }
  auto image = OpenFor(args.file, args.format, /*writable=*/true);
  if (!image.ok()) return Fail("resize", image.error());
  if (Status s = (*image)->Grow(*size); !s.ok()) return Fail("resize", s);
  if (Status s = (*image)->Close(); !s.ok()) return Fail("resize", s);
  return kExitOk;
}

// --- io ---

namespace {

std::vector<std::string> Split(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

constexpr uint64_t kIoChunk = 4 << 20;

// Runs one io command; returns an exit code (kExitOk to go on).
int RunIoCommand(Image& image, const std::string& text) {
  auto words = Split(text);
  auto bad = [&](const std::string& why) { return Usage("io", "'" + text + "': " + why); };
  if (words.empty()) return bad("empty command");
  const std::string& op = words[0];
  auto size_at = [&](size_t i, uint64_t* out) {
    if (i >= words.size()) return false;
    auto v = ParseSize(words[i]);
    if (!v) return false;
    *out = *v;
    return true;
  };
  if (op == "flush") {
    if (words.size() != 1) return bad("flush takes no arguments");
    if (Status s = image.Flush(); !s.ok()) return Fail("io", s);
    return kExitOk;
  }
  if (op == "sleep") {
    // Keeps the image open (and locked) for MS milliseconds, like qemu-io's
    // `sleep`; tests use it to hold an image while another program tries it.
    // Output so far is flushed first so a waiting test can see it.
    constexpr uint64_t kMaxSleepMs = 24 * 3600 * 1000;
    uint64_t ms = 0;
    if (words.size() != 2) return bad("usage: sleep MS");
    const std::string& w = words[1];
    auto [ptr, ec] = std::from_chars(w.data(), w.data() + w.size(), ms);
    if (ec != std::errc() || ptr != w.data() + w.size() || ms > kMaxSleepMs) {
      return bad("invalid milliseconds '" + w + "' (0 to " + std::to_string(kMaxSleepMs) + ")");
    }
    std::cout.flush();
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return kExitOk;
  }
  if (op == "discard") {
    uint64_t off, len;
    if (words.size() != 3 || !size_at(1, &off) || !size_at(2, &len)) {
      return bad("usage: discard OFF LEN");
    }
    if (Status s = image.Discard(off, len); !s.ok()) return Fail("io", s);
    std::cout << "discarded " << len << " bytes at offset " << off << "\n";
    return kExitOk;
  }
  if (op == "write" && words.size() == 4 && words[1] == "-f") {
    uint64_t off;
    if (!size_at(3, &off)) return bad("usage: write -f FILE OFF");
    FileSystem& fs = DefaultFileSystem();
    auto src = fs.Open(words[2], OpenMode::kReadOnly);
    if (!src.ok()) return Fail("io", src.error());
    auto len = (*src)->Size();
    if (!len.ok()) return Fail("io", len.error());
    std::vector<std::byte> buf(std::min<uint64_t>(*len, kIoChunk));
    for (uint64_t done = 0; done < *len;) {
      uint64_t n = std::min<uint64_t>(buf.size(), *len - done);
      auto span = std::span<std::byte>(buf.data(), n);
      if (Status s = (*src)->ReadAt(done, span); !s.ok()) return Fail("io", s);
      if (Status s = image.Write(off + done, span); !s.ok()) return Fail("io", s);
      done += n;
    }
    std::cout << "wrote " << *len << " bytes at offset " << off << "\n";
    return kExitOk;
  }
  if (op == "write" || op == "read") {
    std::optional<uint8_t> pattern;
    size_t i = 1;
    if (i < words.size() && words[i] == "-P") {
      if (i + 1 >= words.size()) return bad("-P needs a byte value");
      pattern = ParseByte(words[i + 1]);
      if (!pattern) return bad("invalid byte '" + words[i + 1] + "'");
      i += 2;
    } else if (op == "write" && i < words.size() && words[i] == "-z") {
      pattern = 0;
      ++i;
    }
    uint64_t off, len;
    if (words.size() != i + 2 || !size_at(i, &off) || !size_at(i + 1, &len)) {
      return bad(op == "write"
                     ? "usage: write -P BYTE OFF LEN | write -z OFF LEN | write -f FILE OFF"
                     : "usage: read [-P BYTE] OFF LEN");
    }
    if (op == "write" && !pattern) return bad("write needs -P BYTE, -z or -f FILE");
    std::vector<std::byte> buf(std::min<uint64_t>(len, kIoChunk));
    if (op == "write") std::fill(buf.begin(), buf.end(), std::byte{*pattern});
    for (uint64_t done = 0; done < len;) {
      uint64_t n = std::min<uint64_t>(buf.size(), len - done);
      auto span = std::span<std::byte>(buf.data(), n);
      if (op == "write") {
        if (Status s = image.Write(off + done, span); !s.ok()) return Fail("io", s);
      } else {
        if (Status s = image.Read(off + done, span); !s.ok()) return Fail("io", s);
        if (pattern) {
          for (uint64_t k = 0; k < n; ++k) {
            if (span[k] != std::byte{*pattern}) {
              std::cerr << "ploop io: read -P 0x" << std::hex << int(*pattern) << std::dec
                        << ": byte at offset " << (off + done + k) << " is 0x" << std::hex
                        << int(span[k]) << std::dec << ", expected pattern\n";
              return kExitProblems;
            }
          }
        }
      }
      done += n;
    }
    std::cout << (op == "write" ? "wrote " : "read ") << len << " bytes at offset " << off
              << (pattern && op == "read" ? " (pattern verified)" : "") << "\n";
    return kExitOk;
  }
  return bad("unknown command (write, read, discard, flush, sleep)");
}

}  // namespace

int RunIo(const IoArgs& args) {
  auto image =
      OpenFor(args.file, args.format, /*writable=*/!args.read_only, /*lock=*/true, args.guid);
  if (!image.ok()) return Fail("io", image.error());
  for (const auto& command : args.commands) {
    int rc = RunIoCommand(**image, command);
    if (rc != kExitOk) return rc;  // the image is closed (flushed) on the way out
  }
  if (Status s = (*image)->Close(); !s.ok()) return Fail("io", s);
  return kExitOk;
}

}  // namespace ploop::cli
