# ploop_dependency(PREFIX module...): finds pkg-config modules and makes an
# interface target ploop_dep_<PREFIX> to link against.
#
# Why static: `ploop` is a short-lived command, started cold by scripts, by
# mount(8) at boot and once on each side of `ploop send | ploop receive`.
# Each shared object costs a cold start an open, a mapping and, for the
# pages the loader touches, a read of the file around them (the device's
# read-ahead, 8 MiB on the VM we measure on). Linking OpenSSL's libcrypto,
# lz4, libext2fs and libarchive with its compressors statically took a cold
# `ploop --version` from 45-51 to 28-33 ms, and cold send|receive of the
# benchmark disk from 1360 to 1337 ms (medians of 10 rounds alternated;
# 1428 to 1388 ms in 12 rounds for a variant that also took libstdc++
# static; tools/bench/README.md, session 12).
#
# With PLOOP_STATIC_DEPS on, each library a module needs when linked
# statically (pkg-config --static) is taken from its archive when it is in
# PLOOP_STATIC_LIBS and the system has lib<name>.a, else as a shared
# library. The rest stay shared: libxml2 (whose static form drags in ICU's
# 30 MB of data), FUSE and liburing (also linked into the nbdkit plugin, a
# shared object), libxxhash (Debian's archive lacks the CPU dispatch),
# libstdc++ (ICU, under libxml2, loads it anyway) and glibc. Distribution packages that want every library shared, for
# security updates without a rebuild, configure with
# -DPLOOP_STATIC_DEPS=OFF.
include_guard(GLOBAL)
find_package(PkgConfig REQUIRED)

option(PLOOP_STATIC_DEPS "Link libcrypto, lz4, libext2fs and libarchive statically" ON)
set(PLOOP_STATIC_LIBS crypto lz4 ext2fs com_err archive nettle bz2 lzma z
    CACHE STRING "Libraries taken from their static archives when PLOOP_STATIC_DEPS is on")

function(ploop_dependency prefix)
  pkg_check_modules(${prefix} REQUIRED IMPORTED_TARGET ${ARGN})
  set(target ploop_dep_${prefix})
  add_library(${target} INTERFACE)
  if(NOT PLOOP_STATIC_DEPS)
    target_link_libraries(${target} INTERFACE PkgConfig::${prefix})
    return()
  endif()
  set(libs "")
  foreach(name IN LISTS ${prefix}_STATIC_LIBRARIES)
    if(name IN_LIST PLOOP_STATIC_LIBS)
      find_library(PLOOP_STATIC_LIB_${name} NAMES lib${name}.a
                   HINTS ${${prefix}_STATIC_LIBRARY_DIRS})
      if(PLOOP_STATIC_LIB_${name})
        list(APPEND libs ${PLOOP_STATIC_LIB_${name}})
        continue()
      endif()
    endif()
    # Linked shared: the system libraries (dl, m) link by name; another
    # needs its development link (libfoo.so), or the module stays shared.
    if(name MATCHES "^(dl|m|pthread|rt)$")
      list(APPEND libs ${name})
      continue()
    endif()
    find_library(PLOOP_SHARED_LIB_${name} NAMES ${name} HINTS ${${prefix}_STATIC_LIBRARY_DIRS})
    if(NOT PLOOP_SHARED_LIB_${name})
      message(STATUS "${ARGN}: lib${name}.so missing, linked shared")
      target_link_libraries(${target} INTERFACE PkgConfig::${prefix})
      return()
    endif()
    list(APPEND libs ${PLOOP_SHARED_LIB_${name}})
  endforeach()
  target_include_directories(${target} INTERFACE ${${prefix}_STATIC_INCLUDE_DIRS})
  target_compile_options(${target} INTERFACE ${${prefix}_STATIC_CFLAGS_OTHER})
  target_link_libraries(${target} INTERFACE ${libs} ${${prefix}_STATIC_LDFLAGS_OTHER})
endfunction()
