// Turning SIGINT, SIGTERM and SIGHUP into a readable descriptor, so a
// long-running command (serve, convert) can stop its helper processes and
// close its image cleanly instead of dying mid-way.
#pragma once

namespace ploop::cli {

// Installs handlers for SIGINT, SIGTERM and SIGHUP (once per process) and
// returns a descriptor that becomes readable when one of them arrives; -1
// if that could not be set up (the signals then keep their default action).
int InstallStopSignals();

}  // namespace ploop::cli
