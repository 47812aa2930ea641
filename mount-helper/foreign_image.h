// Converting between a ploop disk and other image formats (`ploop convert`).
//
// raw is done in-process with our own sparse export and import
// (ploop/convert.h). qcow2 and vmdk are done by qemu-img, which reads or
// writes the ploop disk through our NBD export (NbdServer on a private Unix
// socket): out of a disk, `qemu-img convert -f raw nbd+unix://... -O FMT`
// copies only what block status reports as data; into a new disk,
// `qemu-img convert -n --target-is-zero ... -O raw nbd+unix://...` writes
// only the source's data, and all-zero writes allocate no cluster.
//
// Nothing half-made is ever left at the destination: the result is built
// under a temporary name beside it ("<dst>.convert-tmp", replaced if a
// crash left one) and renamed into place when complete and durable; a new
// disk gets its DiskDescriptor.xml last. On failure the temporary file is
// removed.
//
// Thread-safety: functions; they start helper processes and wait for them.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "ploop/descriptor.h"
#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

namespace ploop::mount {

enum class ForeignFormat { kRaw, kQcow2, kVmdk };

// "raw", "qcow2", "vmdk"; nullopt otherwise.
std::optional<ForeignFormat> ParseForeignFormat(std::string_view name);
std::string_view ForeignFormatName(ForeignFormat format);
// Whether converting to or from `format` runs qemu-img and nbdkit (and so
// can be interrupted cleanly through a cancel descriptor).
bool UsesHelpers(ForeignFormat format);

struct ConvertToOptions {
  // A DiskDescriptor.xml (or its folder) or one ploop image, and optionally
  // the snapshot to convert.
  std::string disk_path;
  std::string snapshot_guid;
  DescriptorLoadOptions load;
  ForeignFormat format = ForeignFormat::kRaw;
  std::string out_path;  // must not exist
  // When >= 0 and readable, the helpers are stopped and Cancelled returned.
  int cancel_fd = -1;
};

// Writes the disk (or snapshot) to a new file `out_path` in `format`,
// sparse. Errors: AlreadyExists (out_path exists), the disk's open errors,
// NotSupported (qemu-img, nbdkit or the plugin missing), IOError with
// qemu-img's message when it fails, IOError (EINTR) when cancelled.
Status ConvertToForeign(FileSystem& fs, const ConvertToOptions& options);

struct ConvertFromOptions {
  std::string in_path;
  ForeignFormat format = ForeignFormat::kRaw;
  // The new disk's image, DIR/root.hds; DIR/DiskDescriptor.xml is written
  // beside it. Neither may exist; DIR must.
  std::string image_path;
  // Kind (expanded or preallocated) and cluster size; the size is the
  // source's virtual size rounded up to the cluster.
  CreateOptions create;
  int cancel_fd = -1;
};

// Creates a new disk from `in_path`. Errors: AlreadyExists, NotFound (no
// input), Corruption (the input is not a valid image of that format, as
// qemu-img says), NotSupported, NoSpace, IOError.
Status ConvertFromForeign(FileSystem& fs, const ConvertFromOptions& options);

}  // namespace ploop::mount
