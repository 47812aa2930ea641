// The bridge between libext2fs and the image library: an `io_manager` whose
// channels read and write a ploop::Image (a single image or a whole delta
// Chain, writes going to its top), so libext2fs builds and reads file
// systems inside images with no loop device, no mount and no root.
//
// libext2fs opens devices by name. ImageBinding gives an Image a name that
// ImageIoManager() resolves; pass binding.name() to ext2fs_open2() or
// ext2fs_initialize() together with ImageIoManager(). The binding also keeps
// the Status of the last failed I/O call, because an errcode_t loses the
// context chain ("delta 2: write cluster: Input/output error");
// FromErrcode() puts it back.
//
// Internal to fsimage/ (it includes <ext2fs/ext2fs.h>); the public fsimage
// headers do not.
//
// Thread-safety: one binding and its channels are used by one thread at a
// time (libext2fs is single-threaded here). The name registry is
// thread-safe. Ownership: the binding borrows the Image, which must outlive
// it; every channel opened on a binding must be closed before the binding is
// destroyed.
#pragma once

#include <ext2fs/ext2fs.h>

#include <string>
#include <string_view>

#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::fsimage {

// The io_manager for image channels. Its open() accepts only names of live
// ImageBindings and fails with EXT2_ET_BAD_DEVICE_NAME otherwise; a
// read-write open of a read-only image fails with EROFS.
//
// Mapping onto Image: block `b` with count `n` is bytes [b*bs, (b+n)*bs); a
// negative count is a byte count (libext2fs' convention). write_byte writes
// bytes, flush is Image::Flush, discard and zeroout are Image::Discard (the
// range reads as zeros afterwards, so channels advertise
// CHANNEL_FLAGS_DISCARD_ZEROES), readahead is a no-op.
io_manager ImageIoManager();

class ImageBinding {
 public:
  explicit ImageBinding(Image& image);
  ~ImageBinding();
  ImageBinding(const ImageBinding&) = delete;
  ImageBinding& operator=(const ImageBinding&) = delete;

  // The device name to give libext2fs.
  const char* name() const { return name_.c_str(); }
  Image& image() { return image_; }

  // The Status of the most recent failed I/O call on a channel of this
  // binding (OK when none failed). Cleared by clear_error().
  const Status& last_error() const { return last_error_; }
  void clear_error() { last_error_ = Status::Ok(); }
  void set_error(Status status) { last_error_ = std::move(status); }

 private:
  Image& image_;
  std::string name_;
  Status last_error_;
};

// The one Status -> errcode_t conversion for the callback boundary: an I/O
// error's errno (EIO when unknown), ENOSPC for NoSpace, EROFS for a
// read-only image, EXT2_ET_SHORT_READ / EXT2_ET_SHORT_WRITE (per `write`)
// for a range outside the image, EIO for anything else. 0 for OK.
errcode_t ToErrcode(const Status& status, bool write);

// The errcode_t -> Status conversion for libext2fs calls: when `binding`
// recorded an I/O failure, that Status (with `context`), because it is the
// root cause; otherwise a Status from error_message(err): errno values map
// as Status::FromErrno, allocation failures to NoSpace, lookups to
// NotFound, EXT2_ET_DIR_EXISTS/FILE_EXISTS to AlreadyExists, the rest to
// Corruption. OK for err == 0.
Status FromErrcode(errcode_t err, std::string_view context, ImageBinding* binding = nullptr);

}  // namespace ploop::fsimage
