// libext2fs io_manager over ploop::Image.
//
// Goal: libext2fs sees an image (or a delta chain) as a block device. Each
// channel is a small struct pointing at its ImageBinding; every callback
// turns block numbers into byte ranges and calls Image::Read/Write/Flush/
// Discard.
//
// Single-block reads and writes go through a small write-back cache of
// kCacheBlocks blocks (LRU), like unix_io's: libext2fs rewrites the block
// holding an inode on every ext2fs_write_inode and a directory block on
// every link, so without it populating a tree costs ~5x the pwrite calls of
// `mke2fs -d` (910,000 against 176,000 for 30,000 files). Crash ordering is
// unchanged: Flush() first writes every dirty block to the image, then
// flushes the image, so what it makes durable is exactly what libext2fs
// wrote before calling flush. Multi-block and byte writes, discards and
// multi-block reads write the dirty blocks they overlap back first and then
// bypass the cache (dropping the blocks they overlap). Close writes back
// what is left (libext2fs flushes before closing a changed file system).
//
// Errors cross the callback boundary once, in ToErrcode(); the full Status
// is parked in the binding so FromErrcode() can hand the caller the
// original context chain instead of a bare errcode.
//
//   ext2fs_*()  ->  io_channel (ImageChannel) -> ImageBinding -> Image
//                   read_blk64/write_blk64/...      last_error
#include "fsimage/io_manager.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace ploop::fsimage {
namespace {

std::mutex g_registry_mu;
std::map<std::string, ImageBinding*>& Registry() {
  static auto* registry = new std::map<std::string, ImageBinding*>();
  return *registry;
}
uint64_t g_next_id = 0;

constexpr size_t kCacheBlocks = 32;

struct CacheEntry {
  uint64_t block = 0;
  uint64_t last_use = 0;  // 0: empty
  bool dirty = false;
  std::unique_ptr<std::byte[]> data;
};

struct ImageChannel {
  ImageBinding* binding;
  struct struct_io_stats stats;
  CacheEntry cache[kCacheBlocks];
  uint64_t clock = 0;
};

ImageChannel* Private(io_channel channel) {
  return static_cast<ImageChannel*>(channel->private_data);
}

// Byte length of `count` blocks (negative: bytes).
uint64_t Bytes(io_channel channel, int count) {
  return count < 0 ? static_cast<uint64_t>(-static_cast<int64_t>(count))
                   : static_cast<uint64_t>(count) * static_cast<uint64_t>(channel->block_size);
}

// Records a failed Status on the binding and converts it.
errcode_t Failed(io_channel channel, Status status, bool write) {
  errcode_t err = ToErrcode(status, write);
  Private(channel)->binding->set_error(std::move(status));
  return err;
}

// Writes one dirty cache entry to the image.
errcode_t WriteBack(io_channel channel, CacheEntry& e) {
  if (e.last_use == 0 || !e.dirty) return 0;
  uint64_t bs = static_cast<uint64_t>(channel->block_size);
  Status s = Private(channel)->binding->image().Write(e.block * bs,
                                                      std::span<const std::byte>(e.data.get(), bs));
  if (!s.ok()) {
    return Failed(channel,
                  std::move(s).WithContext("write of " + std::to_string(bs) + " bytes at " +
                                           std::to_string(e.block * bs)),
                  /*write=*/true);
  }
  e.dirty = false;
  return 0;
}

// Writes back every dirty entry, in block order.
errcode_t WriteBackAll(io_channel channel) {
  ImageChannel* data = Private(channel);
  std::vector<CacheEntry*> dirty;
  for (CacheEntry& e : data->cache) {
    if (e.last_use != 0 && e.dirty) dirty.push_back(&e);
  }
  std::sort(dirty.begin(), dirty.end(),
            [](const CacheEntry* a, const CacheEntry* b) { return a->block < b->block; });
  for (CacheEntry* e : dirty) {
    if (errcode_t err = WriteBack(channel, *e)) return err;
  }
  return 0;
}

// Before an uncached access to bytes [offset, offset + length): writes back
// the dirty entries it overlaps and drops every entry it overlaps.
errcode_t WriteBackRange(io_channel channel, uint64_t offset, uint64_t length) {
  uint64_t bs = static_cast<uint64_t>(channel->block_size);
  for (CacheEntry& e : Private(channel)->cache) {
    if (e.last_use == 0) continue;
    uint64_t start = e.block * bs;
    if (start >= offset + length || start + bs <= offset) continue;
    if (errcode_t err = WriteBack(channel, e)) return err;
    e.last_use = 0;
  }
  return 0;
}

// Drops the whole cache (its block size changed); dirty entries first go
// to the image.
errcode_t WriteBackAndDrop(io_channel channel) {
  if (errcode_t err = WriteBackAll(channel)) return err;
  for (CacheEntry& e : Private(channel)->cache) {
    e.last_use = 0;
    e.data.reset();
  }
  return 0;
}

CacheEntry* Lookup(io_channel channel, uint64_t block) {
  ImageChannel* data = Private(channel);
  for (CacheEntry& e : data->cache) {
    if (e.last_use != 0 && e.block == block) {
      e.last_use = ++data->clock;
      return &e;
    }
  }
  return nullptr;
}

// An entry for `block` (not cached): an empty one or the least recently
// used, written back first. Null with *err set when the write-back failed.
CacheEntry* Victim(io_channel channel, uint64_t block, errcode_t* err) {
  ImageChannel* data = Private(channel);
  CacheEntry* victim = &data->cache[0];
  for (CacheEntry& e : data->cache) {
    if (e.last_use < victim->last_use) victim = &e;
  }
  if ((*err = WriteBack(channel, *victim)) != 0) return nullptr;
  if (!victim->data) {
    victim->data.reset(new (std::nothrow) std::byte[static_cast<size_t>(channel->block_size)]);
    if (!victim->data) {
      *err = EXT2_ET_NO_MEMORY;
      return nullptr;
    }
  }
  victim->block = block;
  victim->dirty = false;
  victim->last_use = ++data->clock;
  return victim;
}

errcode_t Open(const char* name, int flags, io_channel* channel_out) {
  if (name == nullptr) return EXT2_ET_BAD_DEVICE_NAME;
  ImageBinding* binding = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    auto it = Registry().find(name);
    if (it == Registry().end()) return EXT2_ET_BAD_DEVICE_NAME;
    binding = it->second;
  }
  if ((flags & IO_FLAG_RW) && !binding->image().writable()) return EROFS;

  io_channel channel = nullptr;
  errcode_t err = ext2fs_get_memzero(sizeof(struct struct_io_channel), &channel);
  if (err) return err;
  ImageChannel* data = new (std::nothrow) ImageChannel{};
  if (data == nullptr) {
    ext2fs_free_mem(&channel);
    return EXT2_ET_NO_MEMORY;
  }
  char* channel_name = nullptr;
  err = ext2fs_get_mem(std::strlen(name) + 1, &channel_name);
  if (err) {
    delete data;
    ext2fs_free_mem(&channel);
    return err;
  }
  std::strcpy(channel_name, name);
  data->binding = binding;
  data->stats.num_fields = 2;
  channel->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  channel->manager = ImageIoManager();
  channel->name = channel_name;
  channel->block_size = 1024;
  channel->refcount = 1;
  channel->flags = CHANNEL_FLAGS_DISCARD_ZEROES;
  channel->private_data = data;
  *channel_out = channel;
  return 0;
}

errcode_t Close(io_channel channel) {
  if (--channel->refcount > 0) return 0;
  ImageChannel* data = Private(channel);
  // libext2fs flushes a changed file system before closing it; what is
  // still cached (ext2fs_free after an error) goes to the image as it would
  // have without the cache. A failure is parked in the binding.
  errcode_t err = WriteBackAll(channel);
  delete data;
  ext2fs_free_mem(&channel->name);
  ext2fs_free_mem(&channel);
  return err;
}

errcode_t SetBlockSize(io_channel channel, int block_bytes) {
  if (block_bytes <= 0) return EXT2_ET_INVALID_ARGUMENT;
  if (block_bytes == channel->block_size) return 0;
  if (errcode_t err = WriteBackAndDrop(channel)) return err;
  channel->block_size = block_bytes;
  return 0;
}

errcode_t ReadBlocks64(io_channel channel, unsigned long long block, int count, void* buf) {
  uint64_t length = Bytes(channel, count);
  uint64_t offset = block * static_cast<uint64_t>(channel->block_size);
  if (count == 1) {
    if (CacheEntry* e = Lookup(channel, block)) {
      std::memcpy(buf, e->data.get(), length);
      Private(channel)->stats.bytes_read += length;
      return 0;
    }
  } else if (errcode_t err = WriteBackRange(channel, offset, length)) {
    return err;
  }
  std::span<std::byte> out(static_cast<std::byte*>(buf), length);
  Status s = Private(channel)->binding->image().Read(offset, out);
  if (!s.ok()) {
    s = std::move(s).WithContext("read of " + std::to_string(length) + " bytes at " +
                                 std::to_string(offset));
    errcode_t err = Failed(channel, std::move(s), /*write=*/false);
    if (channel->read_error) {
      return channel->read_error(channel, block, count, buf, length, 0, err);
    }
    return err;
  }
  if (count == 1) {
    errcode_t err = 0;
    if (CacheEntry* e = Victim(channel, block, &err)) {
      std::memcpy(e->data.get(), buf, length);
    } else {
      return err;
    }
  }
  Private(channel)->stats.bytes_read += length;
  return 0;
}

errcode_t WriteBlocks64(io_channel channel, unsigned long long block, int count, const void* buf) {
  uint64_t length = Bytes(channel, count);
  uint64_t offset = block * static_cast<uint64_t>(channel->block_size);
  if (count == 1 && Private(channel)->binding->image().writable()) {
    CacheEntry* e = Lookup(channel, block);
    errcode_t err = 0;
    if (e == nullptr && (e = Victim(channel, block, &err)) == nullptr) return err;
    std::memcpy(e->data.get(), buf, length);
    e->dirty = true;
    Private(channel)->stats.bytes_written += length;
    return 0;
  }
  if (errcode_t err = WriteBackRange(channel, offset, length)) return err;
  std::span<const std::byte> data(static_cast<const std::byte*>(buf), length);
  Status s = Private(channel)->binding->image().Write(offset, data);
  if (!s.ok()) {
    s = std::move(s).WithContext("write of " + std::to_string(length) + " bytes at " +
                                 std::to_string(offset));
    errcode_t err = Failed(channel, std::move(s), /*write=*/true);
    if (channel->write_error) {
      return channel->write_error(channel, block, count, buf, length, 0, err);
    }
    return err;
  }
  Private(channel)->stats.bytes_written += length;
  return 0;
}

errcode_t ReadBlocks(io_channel channel, unsigned long block, int count, void* buf) {
  return ReadBlocks64(channel, block, count, buf);
}

errcode_t WriteBlocks(io_channel channel, unsigned long block, int count, const void* buf) {
  return WriteBlocks64(channel, block, count, buf);
}

errcode_t WriteBytes(io_channel channel, unsigned long offset, int count, const void* buf) {
  if (count < 0) return EXT2_ET_INVALID_ARGUMENT;
  if (errcode_t err = WriteBackRange(channel, offset, static_cast<uint64_t>(count))) return err;
  std::span<const std::byte> data(static_cast<const std::byte*>(buf), static_cast<size_t>(count));
  Status s = Private(channel)->binding->image().Write(offset, data);
  if (!s.ok()) return Failed(channel, std::move(s).WithContext("write"), /*write=*/true);
  Private(channel)->stats.bytes_written += static_cast<uint64_t>(count);
  return 0;
}

errcode_t Flush(io_channel channel) {
  Image& image = Private(channel)->binding->image();
  if (!image.writable()) return 0;
  if (errcode_t err = WriteBackAll(channel)) return err;
  Status s = image.Flush();
  if (!s.ok()) return Failed(channel, std::move(s).WithContext("flush"), /*write=*/true);
  return 0;
}

errcode_t SetOption(io_channel channel, const char* option, const char* arg) {
  return EXT2_ET_INVALID_ARGUMENT;
}

errcode_t GetStats(io_channel channel, io_stats* stats) {
  if (stats) *stats = &Private(channel)->stats;
  return 0;
}

errcode_t Discard(io_channel channel, unsigned long long block, unsigned long long count) {
  uint64_t bs = static_cast<uint64_t>(channel->block_size);
  if (errcode_t err = WriteBackRange(channel, block * bs, count * bs)) return err;
  Status s = Private(channel)->binding->image().Discard(block * bs, count * bs);
  if (!s.ok()) return Failed(channel, std::move(s).WithContext("discard"), /*write=*/true);
  return 0;
}

errcode_t Readahead(io_channel, unsigned long long, unsigned long long) { return 0; }

struct struct_io_manager MakeManager() {
  struct struct_io_manager m;
  std::memset(&m, 0, sizeof(m));
  m.magic = EXT2_ET_MAGIC_IO_MANAGER;
  m.name = "ploop image I/O manager";
  m.open = Open;
  m.close = Close;
  m.set_blksize = SetBlockSize;
  m.read_blk = ReadBlocks;
  m.write_blk = WriteBlocks;
  m.flush = Flush;
  m.write_byte = WriteBytes;
  m.set_option = SetOption;
  m.get_stats = GetStats;
  m.read_blk64 = ReadBlocks64;
  m.write_blk64 = WriteBlocks64;
  m.discard = Discard;
  m.cache_readahead = Readahead;
  m.zeroout = Discard;  // a discarded range reads as zeros
  return m;
}

}  // namespace

io_manager ImageIoManager() {
  static struct struct_io_manager manager = MakeManager();
  return &manager;
}

ImageBinding::ImageBinding(Image& image) : image_(image) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  name_ = "ploop-image:" + std::to_string(g_next_id++);
  Registry()[name_] = this;
}

ImageBinding::~ImageBinding() {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  Registry().erase(name_);
}

errcode_t ToErrcode(const Status& status, bool write) {
  switch (status.code()) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kIOError:
      return status.error_number() != 0 ? status.error_number() : EIO;
    case StatusCode::kNoSpace:
      return ENOSPC;
    case StatusCode::kFailedPrecondition:
      return EROFS;
    case StatusCode::kInvalidArgument:
      return write ? EXT2_ET_SHORT_WRITE : EXT2_ET_SHORT_READ;
    default:
      return EIO;
  }
}

Status FromErrcode(errcode_t err, std::string_view context, ImageBinding* binding) {
  if (err == 0) return Status::Ok();
  if (binding != nullptr && !binding->last_error().ok()) {
    Status root = binding->last_error();
    binding->clear_error();
    return std::move(root).WithContext(context);
  }
  std::string text = std::string(context) + ": " + error_message(err);
  // errno values are small positive numbers; com_err tables live far above.
  if (err > 0 && err < 4096) return Status::FromErrno(static_cast<int>(err), context);
  switch (err) {
    case EXT2_ET_BLOCK_ALLOC_FAIL:
    case EXT2_ET_INODE_ALLOC_FAIL:
    case EXT2_ET_DIR_NO_SPACE:
    case EXT2_ET_TOOSMALL:
    case EXT2_ET_RES_GDT_BLOCKS:
    case EXT2_ET_EA_NO_SPACE:
      return Status::NoSpace(text);
    case EXT2_ET_FILE_NOT_FOUND:
      return Status::NotFound(text);
    case EXT2_ET_DIR_EXISTS:
    case EXT2_ET_FILE_EXISTS:
      return Status::AlreadyExists(text);
    case EXT2_ET_RO_FILSYS:
      return Status::FailedPrecondition(text);
    case EXT2_ET_UNSUPP_FEATURE:
    case EXT2_ET_RO_UNSUPP_FEATURE:
      return Status::NotSupported(text);
    case EXT2_ET_INVALID_ARGUMENT:
      return Status::InvalidArgument(text);
    default:
      return Status::Corruption(text);
  }
}

}  // namespace ploop::fsimage
