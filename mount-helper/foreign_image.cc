// ploop convert: raw in-process, qcow2/vmdk through qemu-img and our NBD
// export. See foreign_image.h for the contract.
//
//   --to FMT:   disk --(NbdServer, read-only)--> qemu-img convert -f raw
//               nbd+unix://S -O FMT  OUT.convert-tmp  --fsync, rename--> OUT
//   --from FMT: qemu-img info IN (virtual size)
//               CreateImage(root.hds.convert-tmp)
//               IN --qemu-img convert -n --target-is-zero -O raw-->
//               NbdServer (writable) --> root.hds.convert-tmp
//               stop (flush, clean close) --rename--> root.hds
//               RestoreDescriptor --> DiskDescriptor.xml (last)
//
// A crash leaves at most the temporary file (replaced by the next
// conversion to the same destination) or, between the last two steps, a
// complete and clean root.hds without a descriptor.
#include "mount-helper/foreign_image.h"

#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "mount-helper/block_export.h"
#include "mount-helper/child_process.h"
#include "mount-helper/nbd_server.h"
#include "ploop/convert.h"
#include "ploop/disk.h"
#include "ploop/path.h"

namespace ploop::mount {

namespace {

constexpr std::string_view kTmpSuffix = ".convert-tmp";

// A private folder for the NBD socket, removed with it.
class SocketDir {
 public:
  ~SocketDir() {
    if (dir_.empty()) return;
    ::unlink(socket().c_str());
    ::rmdir(dir_.c_str());
  }

  Status Create() {
    const char* env = std::getenv("TMPDIR");
    std::string base = env != nullptr && *env != '\0' ? env : "/tmp";
    // A socket address holds 107 bytes; a deep TMPDIR would not fit.
    if (base.size() > 60) base = "/tmp";
    std::string templ = base + "/ploop-nbd.XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) {
      return Status::FromErrno(errno, "create a folder for the NBD socket in " + base);
    }
    dir_ = templ;
    return Status::Ok();
  }

  std::string socket() const { return dir_ + "/nbd.sock"; }

 private:
  std::string dir_;
};

struct ToolRun {
  ChildExit exit;
  std::vector<std::string> out;
  std::vector<std::string> err;

  // qemu-img's last message, without its "qemu-img: " prefix.
  std::string LastError() const {
    for (auto it = err.rbegin(); it != err.rend(); ++it) {
      if (it->empty()) continue;
      std::string_view line = *it;
      constexpr std::string_view kPrefix = "qemu-img: ";
      if (line.substr(0, kPrefix.size()) == kPrefix) line.remove_prefix(kPrefix.size());
      return std::string(line);
    }
    return exit.Describe();
  }
};

Result<std::string> QemuImg() {
  std::string path = FindProgram("qemu-img");
  if (path.empty()) {
    return Status::NotSupported(
        "qemu-img is not installed (converting qcow2 and vmdk runs it; install qemu-utils)");
  }
  return path;
}

// Runs a tool to completion, collecting its output.
Result<ToolRun> RunTool(std::vector<std::string> argv, int cancel_fd) {
  auto run = std::make_shared<ToolRun>();
  auto mu = std::make_shared<std::mutex>();
  SpawnOptions spawn;
  spawn.argv = std::move(argv);
  spawn.capture_stdout = true;
  ASSIGN_OR_RETURN(auto child,
                   ChildProcess::Spawn(spawn, [run, mu](ChildStream s, std::string_view line) {
                     std::lock_guard lock(*mu);
                     (s == ChildStream::kStdout ? run->out : run->err).emplace_back(line);
                   }));
  ChildExit exit = child->Wait(cancel_fd);
  child.reset();  // joins the pump thread: the output is complete
  std::lock_guard lock(*mu);
  run->exit = exit;
  return *run;
}

Status Interrupted() { return Status::FromErrno(EINTR, "interrupted"); }

bool Cancelled(int cancel_fd) {
  if (cancel_fd < 0) return false;
  pollfd p{cancel_fd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
}

Status RemoveIfExists(FileSystem& fs, const std::string& path) {
  ASSIGN_OR_RETURN(bool exists, fs.Exists(path));
  if (exists) TRY_CTX(fs.Remove(path), "remove the leftover " + path);
  return Status::Ok();
}

// Makes `path` (written by another process) durable.
Status SyncFile(FileSystem& fs, const std::string& path) {
  ASSIGN_OR_RETURN(auto file, fs.Open(path, OpenMode::kReadOnly));
  return file->Sync();
}

// Serves `image` on a private socket while `qemu_args` run (the NBD URI
// is substituted for "{uri}"), then stops the server. The server's close
// status counts: a write that did not reach the disk cleanly fails the run.
Status RunQemuImgAgainst(const NbdServeOptions& base, const std::vector<std::string>& qemu_args,
                         int cancel_fd, const std::string& what) {
  ASSIGN_OR_RETURN(std::string qemu_img, QemuImg());
  SocketDir dir;
  TRY(dir.Create());
  NbdServeOptions serve = base;
  serve.socket_path = dir.socket();
  ASSIGN_OR_RETURN(auto server, NbdServer::Start(serve, {}));
  std::vector<std::string> argv = {qemu_img};
  for (const auto& a : qemu_args) argv.push_back(a == "{uri}" ? server->uri() : a);
  auto run = RunTool(argv, cancel_fd);
  Status served = server->Stop();
  if (!run.ok()) return run.error();
  if (run->exit.cancelled) return Interrupted();
  if (!run->exit.ok()) {
    // The disk's own error (a full host file system, ...) says more than
    // qemu-img's account of the NBD error it got.
    if (auto disk_error = server->first_request_error()) return *disk_error;
    return Status::FromErrno(EIO, what + ": " + run->LastError());
  }
  return served;
}

// The virtual size qemu-img reports for `in` read as `format`.
Result<uint64_t> ForeignVirtualSize(const std::string& in, ForeignFormat format, int cancel_fd) {
  ASSIGN_OR_RETURN(std::string qemu_img, QemuImg());
  ASSIGN_OR_RETURN(ToolRun run, RunTool({qemu_img, "info", "--output=json", "-f",
                                         std::string(ForeignFormatName(format)), in},
                                        cancel_fd));
  if (run.exit.cancelled) return Interrupted();
  if (!run.exit.ok()) {
    return Status::Corruption(in + ": not a valid " + std::string(ForeignFormatName(format)) +
                              " image: " + run.LastError());
  }
  std::string text;
  for (const auto& l : run.out) text += l + "\n";
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("virtual-size") ||
      !j["virtual-size"].is_number_unsigned()) {
    return Status::Corruption(in + ": qemu-img info gave no virtual size");
  }
  uint64_t size = j["virtual-size"].get<uint64_t>();
  if (size == 0) return Status::InvalidArgument(in + " is an empty disk");
  return size;
}

// NotFound unless the folder that is to hold `path` exists.
Status CheckFolderOf(FileSystem& fs, const std::string& path) {
  const std::string dir = DirName(path);
  if (dir.empty()) return Status::Ok();
  ASSIGN_OR_RETURN(bool exists, fs.Exists(dir));
  if (!exists) return Status::NotFound("folder " + dir + " does not exist");
  return Status::Ok();
}

}  // namespace

std::optional<ForeignFormat> ParseForeignFormat(std::string_view name) {
  if (name == "raw") return ForeignFormat::kRaw;
  if (name == "qcow2") return ForeignFormat::kQcow2;
  if (name == "vmdk") return ForeignFormat::kVmdk;
  return std::nullopt;
}

std::string_view ForeignFormatName(ForeignFormat format) {
  switch (format) {
    case ForeignFormat::kRaw:
      return "raw";
    case ForeignFormat::kQcow2:
      return "qcow2";
    case ForeignFormat::kVmdk:
      return "vmdk";
  }
  return "raw";
}

bool UsesHelpers(ForeignFormat format) { return format != ForeignFormat::kRaw; }

Status ConvertToForeign(FileSystem& fs, const ConvertToOptions& options) {
  const std::string& out = options.out_path;
  ASSIGN_OR_RETURN(bool out_exists, fs.Exists(out));
  if (out_exists) return Status::AlreadyExists(out + " already exists");
  TRY(CheckFolderOf(fs, out));
  const std::string tmp = out + std::string(kTmpSuffix);
  TRY(RemoveIfExists(fs, tmp));

  Status s;
  if (options.format == ForeignFormat::kRaw) {
    ExportTarget target{options.disk_path, options.snapshot_guid, false, options.load};
    ASSIGN_OR_RETURN(auto image, OpenTarget(fs, target));
    s = ExportRaw(*image, fs, tmp);  // sparse, synced; removes tmp on failure
    if (s.ok()) s = image->Close();
  } else {
    NbdServeOptions serve;
    serve.disk_path = options.disk_path;
    serve.snapshot_guid = options.snapshot_guid;
    serve.allow_outside_files = options.load.allow_outside_files;
    s = RunQemuImgAgainst(serve,
                          {"convert", "-q", "-f", "raw", "-O",
                           std::string(ForeignFormatName(options.format)), "{uri}", tmp},
                          options.cancel_fd, "qemu-img convert");
    if (s.ok()) s = SyncFile(fs, tmp).WithContext("sync " + tmp);
  }
  if (s.ok() && Cancelled(options.cancel_fd)) s = Interrupted();
  if (s.ok()) s = fs.Rename(tmp, out);
  if (!s.ok()) {
    RemoveIfExists(fs, tmp).IgnoreError();
    return s;
  }
  fs.SyncDir(DirName(out)).IgnoreError();  // the file is whole either way
  return Status::Ok();
}

Status ConvertFromForeign(FileSystem& fs, const ConvertFromOptions& options) {
  const std::string& image_path = options.image_path;
  const std::string dir = DirName(image_path);
  const std::string dd_path = JoinPath(dir, std::string(kDescriptorFileName));
  if (options.create.kind == ImageKind::kRaw) {
    return Status::InvalidArgument("convert makes ploop images: use expanded or preallocated");
  }
  ASSIGN_OR_RETURN(bool dd_exists, fs.Exists(dd_path));
  if (dd_exists) return Status::AlreadyExists(dd_path + " already exists");
  ASSIGN_OR_RETURN(bool image_exists, fs.Exists(image_path));
  if (image_exists) return Status::AlreadyExists(image_path + " already exists");
  TRY(CheckFolderOf(fs, image_path));
  ASSIGN_OR_RETURN(bool in_exists, fs.Exists(options.in_path));
  if (!in_exists) return Status::NotFound(options.in_path + " does not exist");

  if (options.format == ForeignFormat::kRaw) {
    // Built under its own temporary name and renamed when complete.
    TRY(ImportRaw(fs, options.in_path, image_path, options.create));
  } else {
    ASSIGN_OR_RETURN(uint64_t size,
                     ForeignVirtualSize(options.in_path, options.format, options.cancel_fd));
    const std::string tmp = image_path + std::string(kTmpSuffix);
    TRY(RemoveIfExists(fs, tmp));
    CreateOptions create = options.create;
    create.size_bytes = size;
    ASSIGN_OR_RETURN(auto image, CreateImage(fs, tmp, create));
    Status s = image->Close();
    image.reset();
    if (s.ok()) {
      NbdServeOptions serve;
      serve.disk_path = tmp;
      serve.writable = true;
      s = RunQemuImgAgainst(
          serve,
          {"convert", "-q", "-n", "--target-is-zero", "-f",
           std::string(ForeignFormatName(options.format)), "-O", "raw", options.in_path, "{uri}"},
          options.cancel_fd, "qemu-img convert");
    }
    if (s.ok() && Cancelled(options.cancel_fd)) s = Interrupted();
    if (s.ok()) s = fs.Rename(tmp, image_path);
    if (!s.ok()) {
      RemoveIfExists(fs, tmp).IgnoreError();
      return s;
    }
  }
  // The descriptor last: a disk is complete once it exists.
  Status s = RestoreDescriptor(fs, dir, image_path, /*raw=*/false);
  if (!s.ok()) {
    fs.Remove(image_path).IgnoreError();
    return s.WithContext("write " + dd_path);
  }
  fs.SyncDir(dir).IgnoreError();
  return Status::Ok();
}

}  // namespace ploop::mount
