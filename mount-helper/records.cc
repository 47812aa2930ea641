#include "mount-helper/records.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mount-helper/loop_device.h"

namespace ploop::mount {

namespace {

using nlohmann::json;

Status MakeDir(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::FromErrno(errno, "create " + path);
  }
  return Status::Ok();
}

std::string RecordPath(const std::string& device) {
  auto name = LoopName(device);
  return RunDir() + "/devices/" + (name ? *name : std::string("invalid")) + ".json";
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (size_t k = 1; k <= 3; ++k) {
        char c = s[i + k];
        if (c < '0' || c > '7') ok = false;
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out += static_cast<char>(v);
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

// Holds <run dir>/devices/.lock (flock) while it lives: writers and
// removers of records take it, so that "read the record, compare, unlink"
// cannot remove a record another process wrote in between (a device freed
// by one mount is soon taken by the next).
class RecordsLock {
 public:
  RecordsLock() {
    const std::string path = RunDir() + "/devices/.lock";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) return;  // then unlocked: the rename still keeps records whole
    while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
    }
  }
  ~RecordsLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  RecordsLock(const RecordsLock&) = delete;
  RecordsLock& operator=(const RecordsLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace

std::string RunDir() {
  const char* dir = std::getenv("PLOOP_RUN_DIR");
  return dir != nullptr && *dir != '\0' ? dir : "/run/ploop";
}

Status EnsureRunDir() {
  TRY(MakeDir(RunDir()));
  TRY(MakeDir(RunDir() + "/devices"));
  TRY(MakeDir(RunDir() + "/daemons"));
  return Status::Ok();
}

std::string RecordToJson(const MountRecord& r) {
  json j = {{"device", r.device},
            {"descriptor", r.descriptor},
            {"guid", r.guid},
            {"images", r.images},
            {"read_only", r.read_only},
            {"kind", r.kind},
            {"pid", r.pid},
            {"pid_start", r.pid_start},
            {"socket", r.socket},
            {"fuse_file", r.fuse_file},
            {"work_dir", r.work_dir},
            {"offset_bytes", r.offset_bytes},
            {"created", r.created}};
  return j.dump(2) + "\n";
}

Result<MountRecord> RecordFromJson(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return Status::Corruption("mount record is not a JSON object");
  MountRecord r;
  auto str = [&](const char* key, std::string* out) {
    if (j.contains(key) && j[key].is_string()) *out = j[key].get<std::string>();
  };
  str("device", &r.device);
  str("descriptor", &r.descriptor);
  str("guid", &r.guid);
  str("kind", &r.kind);
  str("socket", &r.socket);
  str("fuse_file", &r.fuse_file);
  str("work_dir", &r.work_dir);
  if (j.contains("images") && j["images"].is_array()) {
    for (const auto& image : j["images"]) {
      if (image.is_string()) r.images.push_back(image.get<std::string>());
    }
  }
  if (j.contains("read_only") && j["read_only"].is_boolean())
    r.read_only = j["read_only"].get<bool>();
  if (j.contains("pid") && j["pid"].is_number_integer()) r.pid = j["pid"].get<int>();
  if (j.contains("pid_start") && j["pid_start"].is_number_unsigned()) {
    r.pid_start = j["pid_start"].get<uint64_t>();
  }
  if (j.contains("offset_bytes") && j["offset_bytes"].is_number_unsigned()) {
    r.offset_bytes = j["offset_bytes"].get<uint64_t>();
  }
  if (j.contains("created") && j["created"].is_number_unsigned()) {
    r.created = j["created"].get<uint64_t>();
  }
  if (!LoopName(r.device) || r.images.empty() || (r.kind != "fuse" && r.kind != "direct")) {
    return Status::Corruption("mount record lacks a device, images or kind");
  }
  return r;
}

Status WriteRecord(const MountRecord& record) {
  TRY(EnsureRunDir());
  const std::string path = RecordPath(record.device);
  const std::string tmp = path + ".tmp";
  RecordsLock lock;
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << RecordToJson(record);
    out.close();
    if (!out) return Status::FromErrno(EIO, "write " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::FromErrno(errno, "rename " + tmp);
  return Status::Ok();
}

Status RemoveRecord(const MountRecord& record) {
  const std::string path = RecordPath(record.device);
  RecordsLock lock;
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  auto current = RecordFromJson(text.str());
  if (!current.ok() || !(*current == record)) {
    return Status::NotFound("no mount record of " + record.device + " for this mount");
  }
  if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, "remove " + path);
  return Status::Ok();
}

std::vector<MountRecord> ReadRecords() {
  std::vector<MountRecord> out;
  const std::string dir = RunDir() + "/devices";
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.size() < 6 || name.compare(name.size() - 5, 5, ".json") != 0) continue;
    std::ifstream in(dir + "/" + name);
    std::stringstream text;
    text << in.rdbuf();
    auto record = RecordFromJson(text.str());
    if (record.ok()) out.push_back(std::move(*record));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const MountRecord& a, const MountRecord& b) {
    return a.device.size() != b.device.size() ? a.device.size() < b.device.size()
                                              : a.device < b.device;
  });
  return out;
}

uint64_t ProcessStartTime(int pid) {
  if (pid <= 0) return 0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!in || !std::getline(in, line)) return 0;
  // "pid (comm) state ppid ..." -- comm may hold spaces and parentheses.
  size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  std::vector<std::string> fields;
  while (rest >> field) fields.push_back(field);
  // fields[0] is the state (field 3); the start time is field 22.
  if (fields.size() < 20 || fields[0] == "Z" || fields[0] == "X") return 0;
  return std::strtoull(fields[19].c_str(), nullptr, 10);
}

uint64_t ProcStatusBytes(int pid, const std::string& key) {
  std::ifstream in(pid == 0 ? std::string("/proc/self/status")
                            : "/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size() + 1, key + ":") == 0) {
      return std::strtoull(line.c_str() + key.size() + 1, nullptr, 10) * 1024;
    }
  }
  return 0;
}

bool ProcessAlive(int pid, uint64_t start_time) {
  uint64_t now = ProcessStartTime(pid);
  return now != 0 && (start_time == 0 || now == start_time);
}

MountHealth Health(const MountRecord& record) {
  auto state = QueryLoop(record.device);
  if (!state.ok() || !state->attached) return MountHealth::kStale;
  std::string backing = state->backing_file;
  const std::string deleted = " (deleted)";
  if (backing.size() > deleted.size() &&
      backing.compare(backing.size() - deleted.size(), deleted.size(), deleted) == 0) {
    backing.resize(backing.size() - deleted.size());
  }
  if (record.kind == "direct") {
    return backing == record.top() && state->offset_bytes == record.offset_bytes
               ? MountHealth::kActive
               : MountHealth::kStale;
  }
  if (backing != record.fuse_file) return MountHealth::kStale;
  return ProcessAlive(record.pid, record.pid_start) ? MountHealth::kActive
                                                    : MountHealth::kDaemonDead;
}

const char* HealthName(MountHealth health) {
  switch (health) {
    case MountHealth::kActive:
      return "active";
    case MountHealth::kDaemonDead:
      return "dead";
    case MountHealth::kStale:
      return "stale";
  }
  return "?";
}

std::vector<MountInfo> ReadMountInfo() {
  std::vector<MountInfo> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, majmin, root, mountpoint;
    if (!(fields >> id >> parent >> majmin >> root >> mountpoint)) continue;
    std::string field;
    while (fields >> field && field != "-") {
    }
    MountInfo info;
    fields >> info.fstype >> info.source;
    unsigned major = 0, minor = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &major, &minor) != 2) continue;
    info.device = makedev(major, minor);
    info.mountpoint = Unescape(mountpoint);
    info.source = Unescape(info.source);
    out.push_back(std::move(info));
  }
  return out;
}

std::vector<std::string> MountpointsOf(const std::string& device) {
  std::vector<std::string> out;
  auto dev = DeviceNumber(device);
  if (!dev.ok()) return out;
  auto mounts = ReadMountInfo();
  for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
    if (it->device == *dev) out.push_back(it->mountpoint);
  }
  return out;
}

}  // namespace ploop::mount
