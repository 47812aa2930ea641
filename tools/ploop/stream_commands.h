// `ploop send` and `ploop receive`: snapshots as byte streams through
// pipes and ssh (snapshot/stream.h, snapshot/STREAM.md).
#pragma once

#include <CLI/CLI.hpp>

namespace ploop::cli {

void RegisterStreamCommands(CLI::App& app, int& rc);

}  // namespace ploop::cli
