// Ext4: an open libext2fs file system on an Image, with the binding that
// routes its I/O (io_manager.h). Internal to fsimage/.
//
// Thread-safety: one thread at a time. Ownership: borrows the Image, which
// must outlive it.
#pragma once

#include <ext2fs/ext2fs.h>

#include <memory>
#include <string_view>

#include "fsimage/io_manager.h"
#include "ploop/image.h"
#include "ploop/status.h"

namespace ploop::fsimage {

class Ext4 {
 public:
  // Opens the file system on `image` (bitmaps loaded). Corruption when the
  // image holds no ext2/3/4 file system ("no ext4 file system on the disk");
  // FailedPrecondition for `writable` on a read-only image.
  static Result<std::unique_ptr<Ext4>> Open(Image& image, bool writable);
  // Frees the file system without writing anything not yet written.
  ~Ext4();
  Ext4(const Ext4&) = delete;
  Ext4& operator=(const Ext4&) = delete;

  ext2_filsys fs() const { return fs_; }
  // FromErrcode() with this file system's binding.
  Status Check(errcode_t err, std::string_view context) {
    return FromErrcode(err, context, &binding_);
  }
  // Writes superblock, descriptors and bitmaps, then flushes the image.
  Status Close();

 private:
  Ext4(Image& image) : binding_(image) {}

  ImageBinding binding_;
  ext2_filsys fs_ = nullptr;
};

}  // namespace ploop::fsimage
