// `ploop convert`: a disk to or from raw, qcow2 and vmdk
// (mount-helper/foreign_image.h).
#pragma once

#include <CLI/CLI.hpp>

namespace ploop::cli {

void RegisterConvertCommands(CLI::App& app, int& rc);

}  // namespace ploop::cli
