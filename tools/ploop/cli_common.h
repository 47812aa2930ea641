// Helpers shared by the command implementations (commands.cc,
// disk_commands.cc): error printing and exit codes, argument parsing.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "ploop/descriptor.h"
#include "ploop/status.h"

namespace ploop::cli {

// Prints "ploop COMMAND: message" (one line) and returns the exit code.
int Fail(std::string_view command, const Status& status);
// For Busy errors: given the message, who holds the image ("/dev/loop3
// (mounted at /mnt)"), or "" when unknown; Fail() then says so.
void SetBusyExplainer(std::function<std::string(const std::string&)> explainer);
// Prints a usage error and returns kExitUsage.
int Usage(std::string_view command, const std::string& message);
// Parses a size argument; on failure prints a usage error into *rc.
std::optional<uint64_t> SizeArg(const std::string& text, const char* what, std::string_view cmd,
                                int* rc);
// Descriptor load options from the global flags.
DescriptorLoadOptions LoadOptions();

}  // namespace ploop::cli
