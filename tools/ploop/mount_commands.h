// `ploop mount`, `ploop umount`, `ploop list`: disks as block devices and
// mounted file systems (mount-helper/mounts.h does the work).
#pragma once

#include <CLI/CLI.hpp>

namespace ploop::cli {

// Adds the mount commands to `app`; their exit code goes to `rc`. Also
// makes Busy errors of every command name the device that holds the image.
void RegisterMountCommands(CLI::App& app, int& rc);

}  // namespace ploop::cli
