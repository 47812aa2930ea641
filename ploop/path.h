// Path helpers on plain strings ('/'-separated), shared by the format
// library: the folder of a file (to sync it after a create or rename), the
// last component, joining.
//
// Thread-safety: pure functions.
#pragma once

#include <string>

namespace ploop {

// The folder part of `path` ("" for a bare name, "/" for a file in the
// root) and the last component.
std::string DirName(const std::string& path);
std::string BaseName(const std::string& path);
// `dir`/`name`; `name` itself when `dir` is empty or `name` is absolute.
std::string JoinPath(const std::string& dir, const std::string& name);

}  // namespace ploop
