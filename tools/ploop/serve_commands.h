// `ploop serve`: the NBD export of a disk (mount-helper/nbd_server.h).
#pragma once

#include <CLI/CLI.hpp>

namespace ploop::cli {

void RegisterServeCommands(CLI::App& app, int& rc);

}  // namespace ploop::cli
