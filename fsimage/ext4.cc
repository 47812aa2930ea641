// Ext4: open/close of a libext2fs file system over the image io_manager.
// A failed operation frees the in-memory file system without flushing, so
// an error never writes half-updated bitmaps or counters.
#include "fsimage/ext4.h"

namespace ploop::fsimage {

Result<std::unique_ptr<Ext4>> Ext4::Open(Image& image, bool writable) {
  if (writable && !image.writable()) {
    return Status::FailedPrecondition("the disk is open read-only");
  }
  std::unique_ptr<Ext4> ext4(new Ext4(image));
  int flags = EXT2_FLAG_64BITS | (writable ? EXT2_FLAG_RW : 0);
  errcode_t err =
      ext2fs_open2(ext4->binding_.name(), nullptr, flags, 0, 0, ImageIoManager(), &ext4->fs_);
  if (err == EXT2_ET_BAD_MAGIC || err == EXT2_ET_SB_CSUM_INVALID) {
    ext4->fs_ = nullptr;
    return Status::Corruption("no ext4 file system on the disk (" +
                              std::string(error_message(err)) + ")");
  }
  if (err) {
    ext4->fs_ = nullptr;
    return ext4->Check(err, "open ext4");
  }
  TRY(ext4->Check(ext2fs_read_bitmaps(ext4->fs_), "read ext4 bitmaps"));
  return ext4;
}

Ext4::~Ext4() {
  if (fs_ != nullptr) ext2fs_free(fs_);
}

Status Ext4::Close() {
  errcode_t err = ext2fs_close_free(&fs_);
  fs_ = nullptr;
  TRY(Check(err, "write ext4 metadata"));
  if (binding_.image().writable()) TRY_CTX(binding_.image().Flush(), "flush");
  return Status::Ok();
}

}  // namespace ploop::fsimage
