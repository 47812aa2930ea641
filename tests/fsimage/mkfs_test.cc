// mkfs: ext4 made through the image io_manager on in-memory and real
// images, its superblock as asked, e2fsck -fn clean, and I/O faults from
// the image library reaching the caller with their context.
#include "fsimage/mkfs.h"

#include <sys/stat.h>

#include <cstring>

#include "fs_test_support.h"
#include "fsimage/io_manager.h"
#include "ploop/disk.h"
#include "ploop/io/fault_file_system.h"
#include "ploop/io/file_system.h"
#include "ploop/io/memory_file_system.h"
#include "test_support.h"

namespace ploop::fsimage {
namespace {

using ::ploop::testing::TempDir;

constexpr uint64_t kMiB = 1024 * 1024;

std::unique_ptr<Image> NewImage(FileSystem& fs, const std::string& path, uint64_t size,
                                uint64_t cluster = kMiB) {
  CreateOptions o;
  o.size_bytes = size;
  o.cluster_bytes = cluster;
  auto image = CreateImage(fs, path, o);
  REQUIRE_OK(image);
  return std::move(image).value();
}

// The superblock as libext2fs reads it back through the io_manager.
struct ext2_super_block ReadSuper(Image& image) {
  ImageBinding binding(image);
  ext2_filsys fs = nullptr;
  errcode_t err =
      ext2fs_open2(binding.name(), nullptr, EXT2_FLAG_64BITS, 0, 0, ImageIoManager(), &fs);
  REQUIRE(err == 0);
  struct ext2_super_block sb = *fs->super;
  ext2fs_close_free(&fs);
  return sb;
}

TEST_SUITE_BEGIN("unit");

TEST_CASE("mkfs on an in-memory image sets the ext4 features - label - uuid and counts") {
  MemoryFileSystem mfs;
  auto image = NewImage(mfs, "img", 256 * kMiB);
  MkfsOptions o;
  o.label = "rootfs";
  o.uuid = ParseUuid("0b5e1d2c-3f4a-4b5c-8d6e-7f8091a2b3c4");
  REQUIRE(o.uuid.has_value());
  REQUIRE_ASSIGN(MkfsResult r, MakeExt4(*image, o));
  CHECK(FormatUuid(r.uuid) == "0b5e1d2c-3f4a-4b5c-8d6e-7f8091a2b3c4");
  CHECK(r.block_bytes == 4096);
  CHECK(r.blocks == 256 * kMiB / 4096);
  CHECK(r.journal_blocks > 0);

  struct ext2_super_block sb = ReadSuper(*image);
  CHECK(std::string(reinterpret_cast<const char*>(sb.s_volume_name)) == "rootfs");
  CHECK(std::memcmp(sb.s_uuid, o.uuid->data(), 16) == 0);
  CHECK(ext2fs_has_feature_journal(&sb));
  CHECK(ext2fs_has_feature_extents(&sb));
  CHECK(ext2fs_has_feature_64bit(&sb));
  CHECK(ext2fs_has_feature_flex_bg(&sb));
  CHECK(ext2fs_has_feature_dir_index(&sb));
  CHECK(ext2fs_has_feature_huge_file(&sb));
  CHECK(ext2fs_has_feature_dir_nlink(&sb));
  CHECK(ext2fs_has_feature_extra_isize(&sb));
  CHECK(ext2fs_has_feature_metadata_csum(&sb));
  CHECK(ext2fs_has_feature_sparse_super(&sb));
  CHECK(sb.s_inode_size == 256);
  // 256M: mke2fs' "small" ratio, one inode per 4K.
  CHECK(sb.s_inodes_count == 256 * kMiB / 4096);
  CHECK(ext2fs_r_blocks_count(&sb) == r.blocks * 5 / 100);
  CHECK(r.inodes == sb.s_inodes_count);
}

TEST_CASE("mkfs honours an inode count and a block size") {
  MemoryFileSystem mfs;
  auto image = NewImage(mfs, "img", 64 * kMiB);
  MkfsOptions o;
  o.inodes = 1000;
  o.block_bytes = 1024;
  REQUIRE_ASSIGN(MkfsResult r, MakeExt4(*image, o));
  struct ext2_super_block sb = ReadSuper(*image);
  CHECK(EXT2_BLOCK_SIZE(&sb) == 1024);
  // libext2fs rounds up to fill whole inode-table blocks in every group.
  CHECK(sb.s_inodes_count >= 1000);
  CHECK(sb.s_inodes_count < 2000);
  CHECK(r.block_bytes == 1024);
}

TEST_CASE("mkfs refuses bad options and read-only images") {
  MemoryFileSystem mfs;
  auto image = NewImage(mfs, "img", 16 * kMiB);
  MkfsOptions o;
  o.block_bytes = 3000;
  CHECK(MakeExt4(*image, o).error().code() == StatusCode::kInvalidArgument);
  o = {};
  o.label = "a-label-longer-than-16";
  CHECK(MakeExt4(*image, o).error().code() == StatusCode::kInvalidArgument);
  o = {};
  o.inodes = 100'000'000;
  CHECK(MakeExt4(*image, o).error().code() == StatusCode::kInvalidArgument);
  REQUIRE_OK(image->Close());
  OpenOptions ro;
  REQUIRE_ASSIGN(auto reader, OpenImage(mfs, "img", ro));
  CHECK(MakeExt4(*reader, {}).error().code() == StatusCode::kFailedPrecondition);
  auto tiny = NewImage(mfs, "tiny", 64 * 1024, 32 * 1024);
  CHECK(MakeExt4(*tiny, {}).error().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("an injected write error reaches the mkfs caller with its errno and context") {
  MemoryFileSystem mem;
  FaultFileSystem faults(mem);
  auto image = NewImage(faults, "img", 64 * kMiB);
  faults.FailNth(FaultOp::kWrite, 3, EIO);
  auto r = MakeExt4(*image, {});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == StatusCode::kIOError);
  CHECK(r.error().error_number() == EIO);
  CHECK(r.error().message().find("mkfs") != std::string::npos);
  CHECK(r.error().message().find("write") != std::string::npos);

  faults.Reset();
  auto image2 = NewImage(faults, "img2", 64 * kMiB);
  faults.FailFrom(FaultOp::kWrite, 1, ENOSPC);
  auto r2 = MakeExt4(*image2, {});
  REQUIRE_FALSE(r2.ok());
  CHECK(r2.error().code() == StatusCode::kNoSpace);
}

TEST_CASE("the io_manager refuses unknown names and read-write opens of read-only images") {
  MemoryFileSystem mfs;
  auto image = NewImage(mfs, "img", 16 * kMiB);
  REQUIRE_OK(MakeExt4(*image, {}).status());
  REQUIRE_OK(image->Close());
  io_channel channel = nullptr;
  CHECK(ImageIoManager()->open("no-such-binding", 0, &channel) == EXT2_ET_BAD_DEVICE_NAME);
  REQUIRE_ASSIGN(auto reader, OpenImage(mfs, "img", OpenOptions{}));
  ImageBinding binding(*reader);
  CHECK(ImageIoManager()->open(binding.name(), IO_FLAG_RW, &channel) == EROFS);
  REQUIRE(ImageIoManager()->open(binding.name(), 0, &channel) == 0);
  // A read past the end of the disk is a short read, not a crash.
  std::vector<char> buf(4096);
  REQUIRE(io_channel_set_blksize(channel, 4096) == 0);
  CHECK(io_channel_read_blk64(channel, 16 * kMiB / 4096, 1, buf.data()) == EXT2_ET_SHORT_READ);
  CHECK(binding.last_error().code() == StatusCode::kInvalidArgument);
  // A byte-count read (negative count) of the superblock at byte 1024.
  REQUIRE(io_channel_set_blksize(channel, 1024) == 0);
  REQUIRE(io_channel_read_blk64(channel, 1, -1024, buf.data()) == 0);
  uint16_t magic;
  std::memcpy(&magic, buf.data() + 56, 2);
  CHECK(magic == EXT2_SUPER_MAGIC);
  io_channel_close(channel);
}

TEST_SUITE_END();

TEST_SUITE_BEGIN("posix");

TEST_CASE("mkfs on a real disk passes e2fsck -fn for several sizes and block sizes") {
  TempDir dir;
  FileSystem& fs = DefaultFileSystem();
  struct Case {
    uint64_t size;
    uint32_t block;
    uint64_t cluster;
  };
  for (Case c : {Case{8 * kMiB, 4096, 1 * kMiB}, Case{300 * kMiB, 4096, 1 * kMiB},
                 Case{1100 * kMiB, 4096, 64 * 1024}, Case{64 * kMiB, 1024, 32 * 1024}}) {
    CAPTURE(c.size);
    CAPTURE(c.block);
    std::string sub = dir / ("d" + std::to_string(c.size) + "-" + std::to_string(c.block));
    REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
    CreateOptions co;
    co.size_bytes = c.size;
    co.cluster_bytes = c.cluster;
    REQUIRE_OK(CreateDisk(fs, sub + "/root.hds", co));
    OpenOptions oo;
    oo.writable = true;
    REQUIRE_ASSIGN(auto chain, OpenDisk(fs, sub + "/DiskDescriptor.xml", "", oo));
    MkfsOptions mo;
    mo.block_bytes = c.block;
    mo.label = "test";
    REQUIRE_OK(MakeExt4(*chain, mo).status());
    testing::RequireFsckClean(*chain, dir / "raw");
    // A fresh image stays sparse: far less than the disk is allocated.
    REQUIRE_ASSIGN(ImageStats st, chain->Stats());
    CHECK(st.allocated_clusters * chain->cluster_bytes() < c.size / 2 + 2 * kMiB);
    REQUIRE_OK(chain->Close());
  }
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop::fsimage
