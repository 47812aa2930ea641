// `ploop serve [-r] [-u GUID] DD {--socket PATH | --port N [--bind ADDR]}`:
// serves a disk, or one of its snapshots, over NBD until SIGINT, SIGTERM or
// SIGHUP, then closes it cleanly. Only this layer parses and prints; the
// server is mount-helper's NbdServer.
#include "serve_commands.h"

#include <charconv>
#include <cstdio>
#include <iostream>
#include <memory>
#include <mutex>

#include "cli_common.h"
#include "commands.h"
#include "mount-helper/nbd_server.h"
#include "ploop/descriptor.h"
#include "ploop/disk.h"
#include "snapshot/snapshot.h"
#include "stop_signals.h"

namespace ploop::cli {

namespace {

struct ServeArgs {
  std::string file;
  std::string guid;
  bool read_only = false;
  std::string socket;
  std::string port;
  std::string bind;
};

std::optional<uint16_t> ParsePort(const std::string& text) {
  unsigned value = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || p != text.data() + text.size() || value == 0 || value > 65535) {
    return std::nullopt;
  }
  return static_cast<uint16_t>(value);
}

int RunServe(const ServeArgs& args) {
  constexpr std::string_view kCmd = "serve";
  if (args.socket.empty() == args.port.empty()) {
    return Usage(kCmd, "give one of --socket PATH and --port N");
  }
  if (!args.bind.empty() && args.port.empty()) {
    return Usage(kCmd, "--bind goes with --port (a Unix socket has no address)");
  }
  mount::NbdServeOptions options;
  if (!args.port.empty()) {
    auto port = ParsePort(args.port);
    if (!port) return Usage(kCmd, "invalid port '" + args.port + "' (use 1..65535)");
    options.port = *port;
    if (!args.bind.empty()) options.bind_address = args.bind;
  }
  options.socket_path = args.socket;

  FileSystem& fs = DefaultFileSystem();
  std::string dd_path;
  const bool is_disk = IsDescriptorPath(fs, args.file, &dd_path);
  if (!args.guid.empty()) {
    if (!is_disk) {
      return Usage(kCmd, "-u selects a snapshot of a disk: give its DiskDescriptor.xml");
    }
    auto guid = ParseGuid(args.guid);
    if (!guid.ok()) return Fail(kCmd, guid.error());
    auto dd = ploop::Descriptor::Load(fs, dd_path, LoadOptions());
    if (!dd.ok()) return Fail(kCmd, dd.error());
    // -u naming the top serves the disk itself.
    if (*guid != dd->top_guid()) options.snapshot_guid = *guid;
  }
  options.writable = !args.read_only && options.snapshot_guid.empty();
  options.disk_path = is_disk ? dd_path : args.file;
  options.allow_outside_files = LoadOptions().allow_outside_files;
  if (options.writable && is_disk) {
    auto finished = FinishInterruptedMerges(fs, dd_path, LoadOptions());
    if (!finished.ok()) return Fail(kCmd, finished.error());
  }

  const int stop_fd = InstallStopSignals();
  auto log_mu = std::make_shared<std::mutex>();
  auto server = mount::NbdServer::Start(options, [log_mu](std::string_view line) {
    std::lock_guard lock(*log_mu);
    std::cerr << "ploop serve: " << line << "\n";
  });
  if (!server.ok()) return Fail(kCmd, server.error());
  std::cout << "Serving " << args.file
            << (options.snapshot_guid.empty() ? "" : " snapshot " + options.snapshot_guid)
            << (options.writable ? " read-write" : " read-only") << " at " << (*server)->uri()
            << " (stop with Ctrl-C or SIGTERM)" << std::endl;
  Status s = (*server)->Wait(stop_fd);
  if (!s.ok()) return Fail(kCmd, s);
  return kExitOk;
}

}  // namespace

void RegisterServeCommands(CLI::App& app, int& rc) {
  auto args = std::make_shared<ServeArgs>();
  auto* c = app.add_subcommand(
      "serve",
      "serve a disk over NBD (qemu-img, qemu-io, nbdcopy, nbd-client ...) until SIGINT/SIGTERM");
  c->add_flag("-r,--read-only", args->read_only, "refuse writes");
  c->add_option("-u,--uuid", args->guid, "serve this snapshot (read-only)");
  c->add_option("--socket", args->socket, "listen on this Unix socket (created; must not exist)");
  c->add_option("--port", args->port, "listen on this TCP port");
  c->add_option("--bind", args->bind, "address for --port (default 127.0.0.1, loopback only)");
  c->add_option("DD", args->file, "DiskDescriptor.xml (or its folder), or one ploop image")
      ->required();
  c->callback([args, &rc] { rc = RunServe(*args); });
}

}  // namespace ploop::cli
