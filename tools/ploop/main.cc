// ploop: the command-line tool. Parses arguments with CLI11 and hands each
// subcommand to commands.cc.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "commands.h"
#include "convert_commands.h"
#include "mount_commands.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "serve_commands.h"
#include "stream_commands.h"

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
  c_init->add_flag("--no-descriptor", init.no_descriptor,
                   "create only the image, without DiskDescriptor.xml beside it");
  c_init->add_option("-t,--type", init.fs_type,
                     "file system to make: ext4 (default for a disk) or none (default with "
                     "--no-descriptor)");
  c_init->add_option("-L,--label", init.label, "ext4 volume label (up to 16 bytes)");
  c_init->add_option("--inodes", init.inodes, "number of ext4 inodes (default: one per 16K)");
  c_init->add_option("-B,--block-size", init.block_size,
                     "ext4 block size: 1K, 2K or 4K (default 4K)");
  c_init->add_option("--from-dir", init.from_dir, "copy this directory tree into the new ext4");
  c_init->add_option("--from-tar", init.from_tar,
                     "copy this tarball (.tar, .gz, .xz, .zst, ...) into the new ext4");
  c_init->add_option("--uid-shift", init.uid_shift, "add N to every uid copied in");
  c_init->add_option("--gid-shift", init.gid_shift, "add N to every gid copied in");
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
  c_export->add_option("-u,--uuid", exp.guid, "export this snapshot (SRC is a DiskDescriptor.xml)");
  c_export->add_option("SRC", exp.src, "image file")->required();
  c_export->add_option("DST", exp.dst, "raw file to create")->required();
  c_export->callback([&] { rc = RunExport(exp); });

  IoArgs io;
  auto* c_io = app.add_subcommand("io", "run I/O commands on an image, in order (like qemu-io)");
  c_io->add_flag("-r,--read-only", io.read_only, "open read-only");
  c_io->add_option("-f,--format", io.format, "raw: treat FILE as a raw image");
  c_io->add_option("-u,--uuid", io.guid, "work on this snapshot (read-only unless it is the top)");
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

  SnapshotArgs snap;
  auto* c_snap = app.add_subcommand("snapshot", "take a snapshot; prints its GUID");
  c_snap->add_option("-u,--uuid", snap.guid, "GUID for the snapshot (default: random)");
  c_snap->add_flag("--json", snap.json,
                   "print JSON: the GUID and, for a mounted disk, how long writes paused");
  c_snap->add_option("DD", snap.dd, "DiskDescriptor.xml")->required();
  c_snap->callback([&] { rc = RunSnapshot(snap); });

  SnapshotArgs list;
  auto* c_list = app.add_subcommand("snapshot-list", "show the snapshot tree");
  c_list->add_flag("--json", list.json, "print JSON");
  c_list->add_option("DD", list.dd, "DiskDescriptor.xml")->required();
  c_list->callback([&] { rc = RunSnapshotList(list); });

  SnapshotArgs del;
  auto* c_del = app.add_subcommand("snapshot-delete",
                                   "delete a snapshot (one with a single child is merged with it)");
  c_del->add_option("-u,--uuid", del.guid, "snapshot GUID")->required();
  c_del->add_option("DD", del.dd, "DiskDescriptor.xml")->required();
  c_del->callback([&] { rc = RunSnapshotDelete(del); });

  SnapshotArgs merge;
  auto* c_merge =
      app.add_subcommand("snapshot-merge", "merge a delta (default: the top) into its parent");
  c_merge->add_option("-u,--uuid", merge.guid, "the delta to merge down");
  c_merge->add_flag("-A,--all", merge.all, "merge the whole chain into the base");
  c_merge->add_option("DD", merge.dd, "DiskDescriptor.xml")->required();
  c_merge->callback([&] { rc = RunSnapshotMerge(merge); });

  SnapshotArgs sw;
  auto* c_switch = app.add_subcommand(
      "snapshot-switch", "roll back: drop the top and start a new empty top over a snapshot");
  c_switch->add_option("-u,--uuid", sw.guid, "snapshot GUID")->required();
  c_switch->add_option("DD", sw.dd, "DiskDescriptor.xml")->required();
  c_switch->callback([&] { rc = RunSnapshotSwitch(sw); });

  RestoreArgs restore;
  auto* c_restore =
      app.add_subcommand("restore-descriptor", "rebuild a lost DiskDescriptor.xml from an image");
  c_restore->add_option("-f,--format", restore.format, "raw: the image is a raw file");
  c_restore->add_option("DIR", restore.dir, "folder to write DiskDescriptor.xml into")->required();
  c_restore->add_option("IMAGE", restore.image, "the image, inside DIR")->required();
  c_restore->callback([&] { rc = RunRestoreDescriptor(restore); });

  FsArgs ls;
  auto* c_ls = app.add_subcommand("ls", "list a directory of the disk's ext4 (no root needed)");
  c_ls->add_option("-u,--uuid", ls.guid, "read this snapshot");
  c_ls->add_option("DD", ls.dd, "DiskDescriptor.xml")->required();
  c_ls->add_option("PATH", ls.path, "directory or file in the file system (default /)");
  c_ls->callback([&] { rc = RunLs(ls); });

  FsArgs cat;
  auto* c_cat = app.add_subcommand("cat", "print a file of the disk's ext4 (no root needed)");
  c_cat->add_option("-u,--uuid", cat.guid, "read this snapshot");
  c_cat->add_option("DD", cat.dd, "DiskDescriptor.xml")->required();
  c_cat->add_option("PATH", cat.path, "file in the file system")->required();
  c_cat->callback([&] { rc = RunCat(cat); });

  FsArgs fs_add;
  auto* c_fs_add = app.add_subcommand(
      "fs-add",
      "add a directory tree or tarball to the disk's ext4 (files replaced, directories merged)");
  c_fs_add->add_option("DD", fs_add.dd, "DiskDescriptor.xml")->required();
  c_fs_add->add_option("--from-dir", fs_add.from_dir, "host directory to copy in");
  c_fs_add->add_option("--from-tar", fs_add.from_tar, "tarball to copy in (.tar, .gz, .xz, .zst)");
  c_fs_add->add_option("--at", fs_add.at, "directory of the file system to copy into");
  c_fs_add->add_option("--uid-shift", fs_add.uid_shift, "add N to every uid copied in");
  c_fs_add->add_option("--gid-shift", fs_add.gid_shift, "add N to every gid copied in");
  c_fs_add->callback([&] { rc = RunFsAdd(fs_add); });

  SnapshotArgs compact;
  auto* c_compact = app.add_subcommand(
      "compact",
      "give back the space a fragmented disk keeps: move clusters into holes, cut files");
  c_compact->add_option("DD", compact.dd, "DiskDescriptor.xml")->required();
  c_compact->add_flag("--json", compact.json, "print the result as JSON");
  c_compact->callback([&] { rc = RunCompact(compact); });

  RegisterServeCommands(app, rc);
  RegisterConvertCommands(app, rc);
  RegisterStreamCommands(app, rc);
  RegisterMountCommands(app, rc);

  bool allow_outside = false;
  app.add_flag("--allow-outside-files", allow_outside,
               "accept descriptors that name files outside their folder");
  app.parse_complete_callback([&] { SetAllowOutsideFiles(allow_outside); });

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
