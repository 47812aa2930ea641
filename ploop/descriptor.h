// DiskDescriptor.xml: the file that turns a set of delta files into one ploop
// disk. It records the disk's size and geometry, the cluster size, every
// delta (GUID, type, file name) and the snapshot tree (each delta's parent),
// with the writable top delta named by TopGUID. The element layout is listed
// at the top of descriptor.cc; the formats it follows are OpenVZ ploop's
// lib/xml.c and QEMU's docs/interop/prl-xml.rst.
//
// A Descriptor is the validated model of one such file. Load() parses and
// validates it (a Descriptor that exists always satisfies the invariants
// below); the mutation helpers keep it valid; Save() writes it back
// atomically. Descriptors we did not write ourselves (Parallels Desktop / PCS,
// hand-edited ones) may carry nodes we do not know, such as
// PhysicalSectorSize, UID or Miscellaneous/...; Save() keeps them, updating
// only the elements this module owns.
//
// Invariants of every Descriptor:
//   - at least one image; image GUIDs are unique and never the null GUID;
//   - images and shots correspond one to one (same GUIDs);
//   - every ParentGUID is kNullGuid or the GUID of another shot, and
//     following parents from any shot reaches kNullGuid (a forest, no
//     cycles; several shots may share a parent);
//   - top_guid() names an image whose shot is not temporary;
//   - cluster_sectors() is a power of two from 64 to 131072 (32 KiB..64 MiB);
//     disk_size_sectors() > 0;
//   - a preallocated disk has no raw (Plain) images.
//
// All file access goes through FileSystem, so the in-memory and the
// fault-injecting file systems work here.
//
// Thread-safety: a Descriptor is a value. Const methods (including ToXml())
// may run concurrently; a mutation needs exclusive access. Two Save()s of
// one path at once (threads or processes) share "<path>.tmp" and need the
// caller's lock.
// Ownership: a Descriptor owns the parsed XML document it was loaded from
// (hence move-only). Pointers returned by FindImage()/FindShot() stay valid
// until the next mutation.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ploop/image.h"
#include "ploop/io/file_system.h"
#include "ploop/status.h"

struct _xmlDoc;  // libxml2's xmlDoc; kept out of this header.

namespace ploop {

// The GUID of the writable top delta of every ploop disk.
inline constexpr std::string_view kTopGuid = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
// The ParentGUID of a root (base) image.
inline constexpr std::string_view kNullGuid = "{00000000-0000-0000-0000-000000000000}";
inline constexpr std::string_view kDescriptorFileName = "DiskDescriptor.xml";
// Load() refuses larger files; real descriptors are a few KiB.
inline constexpr uint64_t kMaxDescriptorBytes = 16ull << 20;

// Parses a GUID written with or without braces, in any case
// ("5FBAABE3-6958-40ff-92a7-860e329aab41"), and returns the form this module
// stores and writes: braces, lower-case hex. InvalidArgument otherwise.
Result<std::string> ParseGuid(std::string_view text);

// A fresh random (version 4) GUID in the normalised form, from the kernel's
// random source (getrandom(2)). IOError when that fails.
Result<std::string> NewRandomGuid();

// One delta of the disk (a StorageData/Storage/Image element).
struct DescriptorImage {
  std::string guid;  // normalised, see ParseGuid()
  // kExpanded for a ploop image (Type "Compressed"), kRaw for a plain file
  // (Type "Plain"). Never kPreallocated: preallocation is a property of the
  // whole disk, see Descriptor::preallocated().
  ImageKind kind = ImageKind::kExpanded;
  std::string file;  // as written in <File>: relative to the descriptor's folder
  std::string path;  // `file` joined to the descriptor's folder (or `file` if absolute)

  bool operator==(const DescriptorImage&) const = default;
};

// One node of the snapshot tree (a Snapshots/Shot element).
struct DescriptorShot {
  std::string guid;         // the image this shot describes
  std::string parent_guid;  // kNullGuid for a root
  // Marked <Temporary/>: a snapshot taken for a backup or fsck, to be merged
  // away automatically. Other markers (TemporaryZero, ...) are kept as
  // unknown nodes.
  bool temporary = false;
  // The snapshot's content digest (<ContentDigest>), recorded when it was
  // received from a stream (snapshot/STREAM.md: kContentDigestPrefix and 64
  // hex digits); empty when none is known, or when the element holds
  // anything else (an older ploop's kind of digest is dropped on load). It
  // binds the GUID to what the snapshot reads as, so a later incremental
  // stream can check its base in O(1). Every operation here keeps a
  // shot's content while its GUID lives (a merge moves a GUID to another
  // file, never changes what it reads); RenameGuid() clears it, since the
  // renamed image is another snapshot.
  std::string content_digest;

  bool operator==(const DescriptorShot&) const = default;
};

// The tag of the content digests this ploop computes and trusts
// (snapshot/STREAM.md, "Content digest"). A new kind of digest gets a new
// tag, so records of the old kind read as absent, never as wrong.
inline constexpr std::string_view kContentDigestPrefix = "view-xxh3-v2:";

// True for a well-formed DescriptorShot::content_digest value: the tag and
// 64 lower-case hex digits.
bool IsContentDigest(std::string_view text);

struct DescriptorLoadOptions {
  // Accept <File> entries that leave the descriptor's folder: absolute
  // paths, ".." components, symlinks leading out. Off by default because a
  // hostile descriptor could otherwise make us write to any file.
  bool allow_outside_files = false;
};

class Descriptor {
 public:
  // A descriptor for a new disk with one image, as `ploop init` writes it:
  // the image `guid` (normally kTopGuid) is the top and a root. `path` is
  // where the descriptor will live (image paths are resolved against its
  // folder); nothing is written until Save(). `cylinders`/`heads` come from
  // the image header (format.h MakeHeader). kind kPreallocated means a
  // kExpanded image on a preallocated disk. InvalidArgument for a size of 0
  // or not a multiple of 512, a cluster size IsValidClusterBytes() refuses,
  // a bad GUID or file name (empty, absolute, with ".."), or a preallocated
  // raw disk.
  static Result<Descriptor> NewSingle(const std::string& path, uint64_t size_bytes,
                                      uint64_t cluster_bytes, ImageKind kind,
                                      const std::string& file_name, std::string_view guid,
                                      bool preallocated, uint32_t cylinders, uint32_t heads);

  // Reads and validates the descriptor at `path`. Accepts the root elements
  // Virtuozzo_disk_image and Parallels_disk_image (Version "1.0" or none).
  // Errors, each a one-line message prefixed with `path`:
  //   NotFound        the file does not exist;
  //   Corruption      empty, over kMaxDescriptorBytes, malformed XML, a
  //                   DOCTYPE (refused outright: no DTDs, no entities, no
  //                   network), a missing or duplicated required element, a
  //                   bad number, GUID or Type, a broken invariant (see the
  //                   top of this file: duplicate GUIDs, an image without a
  //                   shot, a ParentGUID cycle or dangling parent, TopGUID
  //                   naming nothing or a temporary shot, bad Blocksize);
  //   NotSupported    several <Storage> elements (a split disk), another
  //                   Parallels Version;
  //   InvalidArgument a <File> outside the descriptor's folder without
  //                   options.allow_outside_files;
  //   IOError         reading failed.
  static Result<Descriptor> Load(FileSystem& fs, const std::string& path,
                                 const DescriptorLoadOptions& options = {});

  Descriptor(Descriptor&&) noexcept;
  Descriptor& operator=(Descriptor&&) noexcept;
  ~Descriptor();

  // Writes the descriptor to path() atomically: the XML goes to
  // "<path>.tmp", is synced, renamed over path() and the folder is synced.
  // A failure before the rename leaves the old file untouched (and removes
  // the .tmp on a best-effort basis); a failure of the final folder sync
  // leaves the new file in place but perhaps not durable. Errors are the
  // file system's (IOError, NoSpace, ...).
  Status Save(FileSystem& fs) const;

  // The XML Save() writes. A loaded descriptor keeps every node it does not
  // own (unknown elements, attributes, comments) where they were; the root
  // element is always written as Virtuozzo_disk_image (a Parallels root's
  // attributes, such as Version, are kept). Image/Shot nodes follow their
  // GUID through RenameGuid(); removed images lose their nodes; added ones
  // get new nodes after the existing ones.
  Result<std::string> ToXml() const;

  // --- The model ---------------------------------------------------------

  // Where the descriptor lives, and its folder ("" for the current one).
  const std::string& path() const { return path_; }
  const std::string& folder() const { return folder_; }

  uint64_t disk_size_sectors() const { return disk_size_sectors_; }
  uint64_t disk_size_bytes() const { return disk_size_sectors_ * kSectorBytes; }
  // The cluster size (<Blocksize>).
  uint32_t cluster_sectors() const { return cluster_sectors_; }
  uint64_t cluster_bytes() const { return uint64_t{cluster_sectors_} * kSectorBytes; }
  bool preallocated() const { return preallocated_; }
  // CHS geometry as in the image header; 0 when the descriptor has none.
  uint32_t cylinders() const { return cylinders_; }
  uint32_t heads() const { return heads_; }
  // Written as <Sectors>: disk_size / (cylinders * heads), as OpenVZ does.
  uint64_t chs_sectors() const;
  // Optional fields we read and keep but never change.
  const std::optional<uint64_t>& max_delta_size_sectors() const { return max_delta_size_sectors_; }
  const std::optional<std::string>& encryption_key_id() const { return encryption_key_id_; }

  // In document order.
  const std::vector<DescriptorImage>& images() const { return images_; }
  const std::vector<DescriptorShot>& shots() const { return shots_; }
  const std::string& top_guid() const { return top_guid_; }
  const DescriptorImage& top() const { return *FindImage(top_guid_); }

  // The image / shot with `guid` (any spelling ParseGuid() accepts), or
  // nullptr.
  const DescriptorImage* FindImage(std::string_view guid) const;
  const DescriptorShot* FindShot(std::string_view guid) const;

  // The active chain: images from the root to the top, following
  // ParentGUID down from TopGUID. Never empty.
  std::vector<DescriptorImage> Chain() const;
  // The chain from the root to `guid`. NotFound for an unknown GUID,
  // InvalidArgument for a malformed one.
  Result<std::vector<DescriptorImage>> ChainTo(std::string_view guid) const;
  // GUIDs of the shots whose parent is `guid`, in document order (the roots
  // for kNullGuid). Empty for an unknown GUID.
  std::vector<std::string> Children(std::string_view guid) const;

  // --- Mutations: each checks everything first and changes nothing on
  // error. GUID arguments accept any spelling ParseGuid() does; a malformed
  // one is InvalidArgument. ---------------------------------------------

  // Adds an image and its shot (the two always go together) at the end.
  // InvalidArgument for a bad GUID (or kNullGuid), a bad file name (empty,
  // absolute, "..", not UTF-8, control characters), kind kPreallocated, or
  // kRaw on a preallocated disk; AlreadyExists when `guid` is taken;
  // NotFound when `parent_guid` is neither kNullGuid nor a shot.
  Status AddImage(std::string_view guid, ImageKind kind, const std::string& file,
                  std::string_view parent_guid, bool temporary = false);
  // Removes an image and its shot. NotFound when unknown;
  // FailedPrecondition for the top or an image that still has children.
  Status RemoveImage(std::string_view guid);
  // Renames image + shot `old_guid` to `new_guid`, updating children's
  // ParentGUID and TopGUID, and clearing its content digest. This is step one of a snapshot: the
  // old top becomes the snapshot, then AddImage(kTopGuid, ...) adds the new top and
  // SetTop(kTopGuid) keeps it on top. NotFound for `old_guid`;
  // AlreadyExists for `new_guid`; InvalidArgument for kNullGuid.
  Status RenameGuid(std::string_view old_guid, std::string_view new_guid);
  // Makes `parent_guid` (kNullGuid: none) the parent of `guid`. NotFound
  // for either; InvalidArgument when that would create a cycle.
  Status SetParent(std::string_view guid, std::string_view parent_guid);
  // NotFound when unknown; FailedPrecondition when its shot is temporary.
  Status SetTop(std::string_view guid);
  // NotFound when unknown; FailedPrecondition when marking the top.
  Status SetTemporary(std::string_view guid, bool temporary);
  // Records (or with "" clears) the content digest of shot `guid`.
  // NotFound when unknown; InvalidArgument for a malformed digest or for
  // the top (whose content changes with every write).
  Status SetContentDigest(std::string_view guid, const std::string& digest);
  // Points image `guid` at another file (a merge keeps the child's GUID on
  // the parent's file), and with `kind` changes its Type too (the parent's
  // file may be raw). NotFound; InvalidArgument for a bad file name (one
  // another image already names is taken as it is: it passed Load()), kind
  // kPreallocated, or kRaw on a preallocated disk.
  Status SetFile(std::string_view guid, const std::string& file,
                 std::optional<ImageKind> kind = std::nullopt);
  // After a resize. InvalidArgument for 0 or a size not a multiple of 512.
  Status SetDiskSize(uint64_t size_bytes, uint32_t cylinders, uint32_t heads);

  // Compares the model (path, sizes, geometry, images, shots, top), not the
  // preserved XML.
  bool operator==(const Descriptor& other) const;

 private:
  struct XmlDocDeleter {
    void operator()(_xmlDoc* doc) const;
  };
  using XmlDoc = std::unique_ptr<_xmlDoc, XmlDocDeleter>;
  class Parser;

  explicit Descriptor(std::string path);

  Status CheckNewFile(const std::string& file) const;
  std::string ResolvePath(const std::string& file) const;
  int ImageIndex(const std::string& guid) const;
  int ShotIndex(const std::string& guid) const;
  bool IsAncestorOrSelf(const std::string& ancestor, const std::string& guid) const;
  Status ApplyTo(_xmlDoc* doc) const;

  std::string path_;
  std::string folder_;
  uint64_t disk_size_sectors_ = 0;
  uint32_t cluster_sectors_ = 0;
  bool preallocated_ = false;
  uint32_t cylinders_ = 0;
  uint32_t heads_ = 0;
  std::optional<uint64_t> max_delta_size_sectors_;
  std::optional<std::string> encryption_key_id_;
  std::vector<DescriptorImage> images_;
  std::vector<DescriptorShot> shots_;
  std::string top_guid_;

  // The document as loaded, never modified (null for NewSingle()); ToXml()
  // applies the model to a copy of it.
  XmlDoc doc_;
  // Current GUID -> the GUID its Image/Shot nodes carry in doc_. Images
  // added since the load have no entry.
  std::map<std::string, std::string> source_guid_;
};

}  // namespace ploop
