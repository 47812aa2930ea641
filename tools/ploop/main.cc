// ploop: the command-line tool. Parses arguments with CLI11 and hands each
// subcommand to commands.cc.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"

#include "commands.h"

namespace {

using namespace ploop::cli;

constexpr const char* kFormatHelp = "image kind: expanded (default), preallocated or raw";

}  // namespace

int main(int argc, char** argv) {
  // PLOOP_FAULT (fault injection for tests) is parsed lazily by the library;
  // check it here so a typo is a clear error instead of an abort.
  if (const char* spec = std::getenv("PLOOP_FAULT"); spec != nullptr && *spec != '\0') {
    ploop::MemoryFileSystem scratch;
    ploop::FaultFileSystem probe(scratch);
    if (ploop::Status s = probe.Configure(spec); !s.ok()) {
      std::cerr << "ploop: PLOOP_FAULT: " << s.message() << "\n";
      return kExitUsage;
    }
  }
  CLI::App app{"ploop: container disk images in the OpenVZ ploop / Parallels format"};
  app.name("ploop");
  app.require_subcommand(1);
  app.set_version_flag("--version", "ploop 0.1.0");
  app.footer(ExitCodeTable());
  int rc = kExitOk;

  InitArgs init;
  auto* c_init = app.add_subcommand("init", "create a new empty image");
  c_init->add_option("-s,--size", init.size, "virtual disk size, e.g. 10G")->required();
  c_init->add_option("-f,--format", init.format, kFormatHelp);
  c_init->add_option("-b,--cluster", init.cluster, "cluster size, 32K..64M (default 1M)");
  c_init->add_option("FILE", init.file, "image file to create")->required();
  c_init->callback([&] { rc = RunInit(init); });

  InfoArgs info;
  auto* c_info = app.add_subcommand("info", "show an image's format, sizes and state");
  c_info->add_flag("--json", info.json, "print JSON");
  c_info->add_option("-f,--format", info.format, "raw: treat FILE as a raw image");
  c_info->add_option("FILE", info.file, "image file")->required();
  c_info->callback([&] { rc = RunInfo(info); });

  CheckArgs check;
  auto* c_check = app.add_subcommand("check", "check an image for consistency (and repair it)");
  c_check->add_flag("--repair,-r", check.repair, "repair what can be repaired safely");
  c_check->add_flag("--json", check.json, "print JSON");
  c_check->add_option("FILE", check.file, "image file")->required();
  c_check->callback([&] { rc = RunCheck(check); });

  ImportArgs import;
  auto* c_import = app.add_subcommand("import", "create an image from a raw disk file");
  c_import->add_option("-f,--format", import.format, "expanded (default) or preallocated");
  c_import->add_option("-b,--cluster", import.cluster, "cluster size, 32K..64M (default 1M)");
  c_import->add_option("SRC", import.src, "raw file to read")->required();
  c_import->add_option("DST", import.dst, "image file to create")->required();
  c_import->callback([&] { rc = RunImport(import); });

  ExportArgs exp;
  auto* c_export = app.add_subcommand("export", "write an image's disk to a raw file");
  c_export->add_option("-f,--format", exp.format, "raw: treat SRC as a raw image");
  c_export->add_option("SRC", exp.src, "image file")->required();
  c_export->add_option("DST", exp.dst, "raw file to create")->required();
  c_export->callback([&] { rc = RunExport(exp); });

  IoArgs io;
  auto* c_io = app.add_subcommand(
      "io", "run I/O commands on an image, in order (like qemu-io)");
  c_io->add_flag("-r,--read-only", io.read_only, "open read-only");
  c_io->add_option("-f,--format", io.format, "raw: treat FILE as a raw image");
  c_io->add_option("FILE", io.file, "image file")->required();
  c_io->add_option("CMD", io.commands,
                   "each one argument: 'write -P BYTE OFF LEN', 'write -f FILE OFF', "
                   "'write -z OFF LEN', 'read [-P BYTE] OFF LEN', 'discard OFF LEN', 'flush', "
                   "'sleep MS' (keep the image open MS milliseconds)")
      ->required();
  c_io->positionals_at_end(true);
  c_io->callback([&] { rc = RunIo(io); });

  ResizeArgs resize;
  auto* c_resize = app.add_subcommand("resize", "grow an image's virtual size (offline)");
  c_resize->add_option("-s,--size", resize.size, "new virtual size")->required();
  c_resize->add_option("-f,--format", resize.format, "raw: treat FILE as a raw image");
  c_resize->add_option("FILE", resize.file, "image file")->required();
  c_resize->callback([&] { rc = RunResize(resize); });

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "ploop: " << e.what() << " (see ploop --help)\n";
    return kExitUsage;
  }
  return rc;
}
