// Parsing and printing sizes for the CLI: "4096", "64K", "1M", "10G", "2T"
// (binary multiples, case-insensitive, optional trailing "B" or "iB").
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ploop::cli {

// nullopt for anything that is not a size, or that overflows 64 bits.
std::optional<uint64_t> ParseSize(std::string_view text);
// A byte value: decimal, or hex with 0x (0..255).
std::optional<uint8_t> ParseByte(std::string_view text);
// "10 GiB", "1.5 MiB", "512 B".
std::string HumanSize(uint64_t bytes);

}  // namespace ploop::cli
