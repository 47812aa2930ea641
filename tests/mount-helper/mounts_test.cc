// MountChain (mounts.h) with a loop device straight on the image: needs
// root and loop devices.
#include "mount-helper/mounts.h"

#include <unistd.h>

#include "ploop/image.h"
#include "ploop/io/posix_file_system.h"
#include "ploop/lock.h"
#include "test_support.h"

namespace ploop::mount {
namespace {

using ploop::testing::Skip;
using ploop::testing::TempDir;

void NeedLoopDevices() {
  if (::geteuid() != 0) Skip("needs root (loop devices)");
  if (::access("/dev/loop-control", F_OK) != 0) Skip("no loop devices (/dev/loop-control)");
}

}  // namespace

TEST_SUITE_BEGIN("privileged");

TEST_CASE("direct mount: the image stays locked from the chain's open until the device holds it") {
  // Between closing the chain and attaching the loop device, another
  // program (`ploop snapshot`, QEMU) must not be able to take the image:
  // it would change the disk under a device about to use the old file.
  NeedLoopDevices();
  TempDir dir;
  PosixFileSystem fs;
  for (ImageKind kind : {ImageKind::kRaw, ImageKind::kPreallocated}) {
    for (bool read_only : {false, true}) {
      CAPTURE(ImageKindName(kind));
      CAPTURE(read_only);
      const std::string path = dir / ("root-" + std::string(ImageKindName(kind)) + ".hds");
      if (!read_only) {
        CreateOptions create;
        create.kind = kind;
        create.size_bytes = 16 << 20;
        REQUIRE_ASSIGN(auto made, CreateImage(fs, path, create));
        REQUIRE_OK(made->Close());
      }
      OpenOptions open;
      open.writable = !read_only;
      open.raw = kind == ImageKind::kRaw;
      open.lock = true;
      REQUIRE_ASSIGN(auto image, OpenImage(fs, path, open));
      std::vector<std::unique_ptr<Image>> layers;
      layers.push_back(std::move(image));
      REQUIRE_ASSIGN(auto chain, Chain::FromLayers(std::move(layers)));

      MountRequest request;
      request.descriptor = dir / "DiskDescriptor.xml";
      request.read_only = read_only;
      Status in_gap = Status::Ok();
      bool called = false;
      request.after_release = [&] {
        called = true;
        // What `ploop snapshot` does first: open the image for writing.
        auto other = fs.Open(path, OpenMode::kReadWrite);
        in_gap = other.ok() ? LockImage(**other, /*writable=*/true) : other.error();
      };
      REQUIRE_ASSIGN(Mounted mounted, MountChain(std::move(chain), request));
      CHECK_FALSE(mounted.daemon);
      CHECK(called);
      CHECK_MESSAGE(
          in_gap.code() == StatusCode::kBusy,
          "another program took the image before the device held it: " << in_gap.ToString());
      REQUIRE_ASSIGN(auto records, FindByDevice(mounted.device));
      REQUIRE_OK(Unmount(records.front()));
      // The device gone, the image is free.
      REQUIRE_ASSIGN(auto after, fs.Open(path, OpenMode::kReadWrite));
      CHECK_OK(LockImage(*after, /*writable=*/true));
    }
  }
}

TEST_SUITE_END();

}  // namespace ploop::mount
