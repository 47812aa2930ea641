#include "ploop/descriptor.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "ploop/io/fault_file_system.h"
#include "ploop/io/memory_file_system.h"
#include "ploop/io/posix_file_system.h"
#include "test_support.h"

namespace ploop {
namespace {

constexpr char kPath[] = "/vz/root.hdd/DiskDescriptor.xml";
constexpr char kBase[] = "{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}";
const std::string kTop(kTopGuid);
const std::string kNull(kNullGuid);

std::string Golden(const std::string& name) {
  std::ifstream in(std::string(PLOOP_TEST_DATA_DIR) + "/descriptors/" + name, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "missing golden file " << name);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void Put(FileSystem& fs, const std::string& path, const std::string& text) {
  REQUIRE_ASSIGN(auto file, fs.Create(path, /*exclusive=*/false));
  REQUIRE_OK(file->WriteAt(0, std::as_bytes(std::span(text))));
  REQUIRE_OK(file->Sync());
}

std::string Get(const MemoryFileSystem& fs, const std::string& path) {
  std::vector<std::byte> bytes = fs.Contents(path);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// `text` with the first `from` replaced by `to`; `from` must occur.
std::string Replace(std::string text, std::string_view from, std::string_view to) {
  size_t at = text.find(from);
  REQUIRE_MESSAGE(at != std::string::npos, "no '" << from << "' in the text");
  text.replace(at, from.size(), to);
  return text;
}

bool Contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

std::vector<std::string> Guids(const std::vector<DescriptorImage>& images) {
  std::vector<std::string> out;
  for (const auto& image : images) out.push_back(image.guid);
  return out;
}

Descriptor LoadGolden(MemoryFileSystem& fs, const std::string& name) {
  Put(fs, kPath, Golden(name));
  REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, kPath));
  return d;
}

Descriptor SaveAndReload(MemoryFileSystem& fs, const Descriptor& d) {
  REQUIRE_OK(d.Save(fs));
  CHECK_FALSE(*fs.Exists(std::string(kPath) + ".tmp"));
  REQUIRE_ASSIGN(Descriptor back, Descriptor::Load(fs, kPath));
  return back;
}

TEST_SUITE_BEGIN("unit");
TEST_CASE("ParseGuid normalises braces and case and rejects malformed GUIDs") {
  REQUIRE_ASSIGN(std::string a, ParseGuid("{5FBAABE3-6958-40FF-92A7-860E329AAB41}"));
  CHECK(a == kTopGuid);
  REQUIRE_ASSIGN(std::string b, ParseGuid("5fbaabe3-6958-40ff-92a7-860e329aab41"));
  CHECK(b == kTopGuid);
  for (const char* bad :
       {"", "{}", "5fbaabe3-6958-40ff-92a7-860e329aab4", "{5fbaabe3-6958-40ff-92a7-860e329aab41",
        "5fbaabe3-6958-40ff-92a7-860e329aab41}", "5fbaabe3_6958-40ff-92a7-860e329aab41",
        "5fbaabe3-6958-40ff-92a7-860e329aab4g", "{5fbaabe3-6958-40ff-92a7-860e329aab41}x"}) {
    CAPTURE(bad);
    CHECK(ParseGuid(bad).error().code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("NewRandomGuid gives distinct - normalised version-4 GUIDs") {
  std::set<std::string> seen;
  for (int i = 0; i < 100; ++i) {
    REQUIRE_ASSIGN(std::string g, NewRandomGuid());
    REQUIRE_ASSIGN(std::string parsed, ParseGuid(g));
    CHECK(parsed == g);
    CHECK(g[15] == '4');                                          // version nibble
    CHECK(std::string("89ab").find(g[20]) != std::string::npos);  // variant
    seen.insert(g);
  }
  CHECK(seen.size() == 100);
}

TEST_CASE("Descriptor golden: a single image as ploop init writes it") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "single.xml");
  CHECK(d.path() == kPath);
  CHECK(d.folder() == "/vz/root.hdd");
  CHECK(d.disk_size_sectors() == 20971520);
  CHECK(d.disk_size_bytes() == 10ull << 30);
  CHECK(d.cluster_sectors() == 2048);
  CHECK(d.cluster_bytes() == 1 << 20);
  CHECK_FALSE(d.preallocated());
  CHECK(d.cylinders() == 40960);
  CHECK(d.heads() == 16);
  CHECK(d.chs_sectors() == 32);
  CHECK_FALSE(d.max_delta_size_sectors().has_value());
  CHECK_FALSE(d.encryption_key_id().has_value());
  REQUIRE(d.images().size() == 1);
  CHECK(d.images()[0] ==
        DescriptorImage{kTop, ImageKind::kExpanded, "root.hds", "/vz/root.hdd/root.hds"});
  REQUIRE(d.shots().size() == 1);
  CHECK(d.shots()[0] == DescriptorShot{kTop, kNull, false, ""});
  CHECK(d.top_guid() == kTopGuid);
  CHECK(d.top().file == "root.hds");
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kTop});
  CHECK(d.Children(kNullGuid) == std::vector<std::string>{kTop});
  CHECK(d.Children(kTopGuid).empty());
}

TEST_CASE("Descriptor golden: one snapshot - as in the format reference") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "snapshot.xml");
  REQUIRE(d.images().size() == 2);
  CHECK(d.images()[0].guid == kBase);
  CHECK(d.images()[0].path == "/vz/root.hdd/root.hds");
  CHECK(d.images()[1].file == "root.hds.{7c1e4b1a-3f0e-4c59-a2d4-51a9b0c6e2f7}");
  CHECK(d.FindShot(kTopGuid)->parent_guid == kBase);
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kBase, kTop});
  CHECK(d.Children(kBase) == std::vector<std::string>{kTop});
  REQUIRE_ASSIGN(auto to_base, d.ChainTo("0D2A2A38-6D6B-4F2B-9B8E-6F0C2B1D0E11"));
  CHECK(Guids(to_base) == std::vector<std::string>{kBase});
  CHECK(d.ChainTo("{11111111-2222-4333-8444-555555555555}").error().code() ==
        StatusCode::kNotFound);
  CHECK(d.ChainTo("nonsense").error().code() == StatusCode::kInvalidArgument);
  CHECK(d.FindImage("nonsense") == nullptr);
}

TEST_CASE("Descriptor golden: Parallels_disk_image Version 1.0 with Parallels extras") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "parallels.xml");
  const std::string base = "{a6e1b1c2-8f3d-4c55-b0e7-1d2c3b4a5f60}";
  CHECK(d.disk_size_sectors() == 134217728);
  CHECK(d.cylinders() == 133152);
  CHECK(d.heads() == 16);
  CHECK(d.cluster_sectors() == 2048);
  // Upper-case and brace-less GUIDs are normalised.
  REQUIRE(d.images().size() == 2);
  CHECK(d.images()[0].guid == base);
  CHECK(d.shots()[0].guid == base);
  CHECK(d.shots()[1].parent_guid == base);
  // No <TopGUID>: the shot with the well-known top GUID is the top.
  CHECK(d.top_guid() == kTopGuid);
  CHECK(Guids(d.Chain()) == std::vector<std::string>{base, kTop});
  // <Encryption> without <KeyId> (Parallels' Engine/Data) is not a key.
  CHECK_FALSE(d.encryption_key_id().has_value());
}

TEST_CASE("Descriptor golden: a Temporary shot") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "temporary.xml");
  const std::string snap = "{b3c0a9e2-51f4-4c1d-8e6a-0f9d2c7b4a13}";
  REQUIRE(d.shots().size() == 3);
  CHECK_FALSE(d.FindShot(kBase)->temporary);
  CHECK(d.FindShot(snap)->temporary);
  CHECK_FALSE(d.FindShot(kTopGuid)->temporary);
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kBase, snap, kTop});
}

TEST_CASE("Descriptor golden: a tree - two snapshots of one base - preallocated") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "tree.xml");
  const std::string left = "{1f0e2d3c-4b5a-4697-8877-665544332211}";
  const std::string right = "{2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d}";
  CHECK(d.preallocated());
  CHECK(d.images()[0].kind == ImageKind::kExpanded);
  CHECK(d.Children(kBase) == std::vector<std::string>{left, right});
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kBase, right, kTop});
  REQUIRE_ASSIGN(auto to_left, d.ChainTo(left));
  CHECK(Guids(to_left) == std::vector<std::string>{kBase, left});
  CHECK(d.Children(left).empty());
}

TEST_CASE("Descriptor: rewriting a descriptor we wrote changes no byte") {
  for (std::string name : {"single.xml", "snapshot.xml", "temporary.xml", "tree.xml"}) {
    CAPTURE(name);
    MemoryFileSystem fs;
    Descriptor d = LoadGolden(fs, name);
    REQUIRE_ASSIGN(std::string xml, d.ToXml());
    CHECK(xml == Golden(name));
  }
}

TEST_CASE("Descriptor: NewSingle writes exactly what OpenVZ ploop init writes") {
  REQUIRE_ASSIGN(Descriptor d, Descriptor::NewSingle(kPath, 10ull << 30, 1 << 20,
                                                     ImageKind::kExpanded, "root.hds", kTopGuid,
                                                     /*preallocated=*/false, 40960, 16));
  REQUIRE_ASSIGN(std::string xml, d.ToXml());
  CHECK(xml == Golden("single.xml"));
}

TEST_CASE("Descriptor round trip: NewSingle -> Save -> Load gives the same model") {
  struct Case {
    ImageKind kind;
    bool preallocated;
    uint64_t cluster_bytes;
  };
  for (Case c :
       {Case{ImageKind::kExpanded, false, 1 << 20}, Case{ImageKind::kPreallocated, false, 64 << 10},
        Case{ImageKind::kExpanded, true, 32 << 10}, Case{ImageKind::kRaw, false, 1 << 20}}) {
    CAPTURE(ImageKindName(c.kind));
    MemoryFileSystem fs;
    REQUIRE_ASSIGN(
        Descriptor d,
        Descriptor::NewSingle(kPath, 3ull << 30, c.cluster_bytes, c.kind, "root.hds",
                              "{11111111-2222-4333-8444-555555555555}", c.preallocated, 6241, 16));
    CHECK(d.preallocated() == (c.preallocated || c.kind == ImageKind::kPreallocated));
    CHECK(d.top_guid() == "{11111111-2222-4333-8444-555555555555}");
    Descriptor back = SaveAndReload(fs, d);
    CHECK(back == d);
    CHECK(back.images()[0].kind ==
          (c.kind == ImageKind::kRaw ? ImageKind::kRaw : ImageKind::kExpanded));
    CHECK(Contains(Get(fs, kPath), "<Preallocated>1</Preallocated>") == back.preallocated());
  }
}

TEST_CASE("Descriptor: NewSingle refuses what could never be a disk") {
  auto make = [](uint64_t size, uint64_t cluster, ImageKind kind, std::string file,
                 std::string_view guid, bool prealloc) {
    return Descriptor::NewSingle(kPath, size, cluster, kind, file, guid, prealloc, 1, 16);
  };
  auto code = [](const Result<Descriptor>& r) { return r.error().code(); };
  const auto kBad = StatusCode::kInvalidArgument;
  CHECK(code(make(0, 1 << 20, ImageKind::kExpanded, "a", kTopGuid, false)) == kBad);
  CHECK(code(make(1000, 1 << 20, ImageKind::kExpanded, "a", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 3 << 20, ImageKind::kExpanded, "a", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kRaw, "a", kTopGuid, true)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "/abs", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "../a", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "a\nb", kTopGuid, false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "a", "xyz", false)) == kBad);
  CHECK(code(make(1 << 30, 1 << 20, ImageKind::kExpanded, "a", kNullGuid, false)) == kBad);
}

TEST_CASE("Descriptor: file names with XML metacharacters and UTF-8 survive a round trip") {
  MemoryFileSystem fs;
  const std::string file = "disk <&> \"quoted\" 'x' \xc3\xa9t\xc3\xa9.hds";
  REQUIRE_ASSIGN(Descriptor d, Descriptor::NewSingle(kPath, 1 << 30, 1 << 20, ImageKind::kExpanded,
                                                     file, kTopGuid, false, 2080, 16));
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back.images()[0].file == file);
  CHECK(back == d);
}

TEST_CASE("Descriptor: snapshot create on a Parallels descriptor keeps every unknown node") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "parallels.xml");
  const std::string base = "{a6e1b1c2-8f3d-4c55-b0e7-1d2c3b4a5f60}";
  const std::string snap = "{6c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5}";
  // What `ploop snapshot` does to the descriptor: the old top becomes the
  // snapshot, a new empty top goes on it.
  REQUIRE_OK(d.RenameGuid(kTopGuid, snap));
  REQUIRE_OK(d.AddImage(kTopGuid, ImageKind::kExpanded, "harddisk.hdd.0.{new}.hds", snap));
  REQUIRE_OK(d.SetTop(kTopGuid));
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back == d);
  CHECK(Guids(back.Chain()) == std::vector<std::string>{base, snap, kTop});
  CHECK(back.FindImage(snap)->file == "harddisk.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds");

  const std::string xml = Get(fs, kPath);
  // The root is written as Virtuozzo's; its attribute is kept.
  CHECK(Contains(xml, "<Virtuozzo_disk_image Version=\"1.0\">"));
  CHECK_FALSE(Contains(xml, "Parallels_disk_image>"));
  CHECK(Contains(xml, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
  CHECK(Contains(xml, "Written by Parallels Desktop"));
  for (const char* kept : {
           "<PhysicalSectorSize>4096</PhysicalSectorSize>",
           "<LogicSectorSize>512</LogicSectorSize>",
           "<Engine>{00000000-0000-0000-0000-000000000000}</Engine>",
           "<UID>{3b4d5f47-5c4b-4d4e-9a0e-2f1c7d9e8a61}</UID>",
           "<Name>Ubuntu 22.04-0.hdd</Name>",
           "<CompatLevel>level2</CompatLevel>",
           "<Bootcamp>0</Bootcamp>",
           "<SuspendState>0</SuspendState>",
           "<CreationTime Zone=\"UTC\">2023-03-14 09:26:53</CreationTime>",
           "<Description>before upgrade</Description>",
           "<Padding>0</Padding>",
       }) {
    CAPTURE(kept);
    CHECK(Contains(xml, kept));
  }
  // Known elements are rewritten: normalised GUIDs, a TopGUID, Sectors as
  // Disk_size / (Cylinders * Heads).
  CHECK(Contains(xml, "<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>"));
  CHECK(Contains(xml, "<GUID>" + base + "</GUID>"));
  CHECK_FALSE(Contains(xml, "A6E1B1C2"));
  CHECK(Contains(xml, "<Sectors>63</Sectors>"));
  // Unknown children stay inside their own Image/Shot.
  size_t base_image = xml.find("<GUID>" + base + "</GUID>");
  size_t creation = xml.find("<CreationTime");
  CHECK(base_image < creation);
  CHECK(creation < xml.find("</Image>", base_image));
  // The new Image comes after the existing ones, the new Shot likewise.
  CHECK(xml.find("harddisk.hdd.0.{new}.hds") > xml.find(snap));
  CHECK(xml.rfind("<Shot>") > xml.find("<Description>"));
}

TEST_CASE("Descriptor: a renamed image keeps its unknown children - a removed one loses them") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "parallels.xml");
  const std::string base = "{a6e1b1c2-8f3d-4c55-b0e7-1d2c3b4a5f60}";
  const std::string renamed = "{0a0b0c0d-0e0f-4a1b-8c2d-3e4f5a6b7c8d}";
  REQUIRE_OK(d.RenameGuid(base, renamed));
  REQUIRE_ASSIGN(std::string xml, d.ToXml());
  size_t image = xml.find("<GUID>" + renamed + "</GUID>");
  REQUIRE(image != std::string::npos);
  CHECK(image < xml.find("<CreationTime"));
  CHECK(xml.find("<CreationTime") < xml.find("</Image>", image));
  CHECK(Contains(xml, "<ParentGUID>" + renamed + "</ParentGUID>"));
  CHECK(xml.find("<Description>") > xml.find("<Shot>"));

  // Merge the top into the base the way ploop does ("child into parent,
  // child GUID survives"): the top takes the base's file, the base goes.
  REQUIRE_OK(d.SetFile(kTopGuid, d.FindImage(renamed)->file));
  REQUIRE_OK(d.SetParent(kTopGuid, kNullGuid));
  REQUIRE_OK(d.RemoveImage(renamed));
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back == d);
  CHECK(Guids(back.Chain()) == std::vector<std::string>{kTop});
  const std::string saved = Get(fs, kPath);
  CHECK_FALSE(Contains(saved, "CreationTime"));
  CHECK_FALSE(Contains(saved, "<Description>"));
  CHECK_FALSE(Contains(saved, renamed));
  CHECK(Contains(saved, "<UID>"));  // unknown nodes outside images stay
}

TEST_CASE("Descriptor: the Temporary marker follows the model") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "temporary.xml");
  const std::string snap = "{b3c0a9e2-51f4-4c1d-8e6a-0f9d2c7b4a13}";
  REQUIRE_OK(d.SetTemporary(snap, false));
  REQUIRE_OK(d.SetTemporary(kBase, true));
  CHECK(d.SetTemporary(kTopGuid, true).code() == StatusCode::kFailedPrecondition);
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back.FindShot(kBase)->temporary);
  CHECK_FALSE(back.FindShot(snap)->temporary);
  const std::string xml = Get(fs, kPath);
  size_t marker = xml.find("<Temporary/>");
  REQUIRE(marker != std::string::npos);
  CHECK(marker == xml.rfind("<Temporary/>"));
  CHECK(marker > xml.find("<GUID>" + std::string(kBase) + "</GUID>", xml.find("<Shot>")));
  CHECK(marker < xml.find("</Shot>"));
}

TEST_CASE("Descriptor: a shot's content digest round-trips and a renamed image loses it") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "temporary.xml");
  const std::string digest = std::string(kContentDigestPrefix) + std::string(63, 'a') + "b";
  REQUIRE_OK(d.SetContentDigest(kBase, digest));
  CHECK(d.SetContentDigest(kBase, "sha256:abc").code() == StatusCode::kInvalidArgument);
  CHECK(d.SetContentDigest(kTopGuid, digest).code() == StatusCode::kInvalidArgument);
  CHECK(d.SetContentDigest("{44444444-4444-4444-8444-444444444444}", digest).code() ==
        StatusCode::kNotFound);
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back.FindShot(kBase)->content_digest == digest);
  CHECK(Contains(Get(fs, kPath), "<ContentDigest>" + digest + "</ContentDigest>"));
  // A malformed one in the file is dropped, never trusted.
  Put(fs, kPath, Replace(Get(fs, kPath), digest, std::string(kContentDigestPrefix) + "XYZ"));
  REQUIRE_ASSIGN(Descriptor junk, Descriptor::Load(fs, kPath));
  CHECK(junk.FindShot(kBase)->content_digest.empty());
  // So is an older kind of digest (an earlier ploop's SHA-256 per cluster):
  // absent, so that a receiver computes the digest instead of trusting it.
  const std::string old_kind = "view-sha256-v1:" + std::string(64, 'c');
  CHECK_FALSE(IsContentDigest(old_kind));
  Put(fs, kPath, Replace(Get(fs, kPath), std::string(kContentDigestPrefix) + "XYZ", old_kind));
  REQUIRE(Contains(Get(fs, kPath), old_kind));
  REQUIRE_ASSIGN(Descriptor older, Descriptor::Load(fs, kPath));
  CHECK(older.FindShot(kBase)->content_digest.empty());
  // Renaming the image (what snapshot create does to the top) clears it,
  // and the element goes from the file.
  REQUIRE_OK(back.RenameGuid(kBase, "{55555555-5555-4555-8555-555555555555}"));
  CHECK(back.FindShot("{55555555-5555-4555-8555-555555555555}")->content_digest.empty());
  Descriptor renamed = SaveAndReload(fs, back);
  CHECK_FALSE(Contains(Get(fs, kPath), "ContentDigest"));
  (void)renamed;
}
TEST_CASE("Descriptor mutations check first and keep the model consistent") {
  MemoryFileSystem fs;
  Descriptor d = LoadGolden(fs, "snapshot.xml");
  const std::string other = "{11111111-2222-4333-8444-555555555555}";
  const std::string missing = "{99999999-2222-4333-8444-555555555555}";

  CHECK(d.AddImage(kBase, ImageKind::kExpanded, "x", kNullGuid).code() ==
        StatusCode::kAlreadyExists);
  CHECK(d.AddImage(other, ImageKind::kExpanded, "x", missing).code() == StatusCode::kNotFound);
  CHECK(d.AddImage(other, ImageKind::kExpanded, "../x", kBase).code() ==
        StatusCode::kInvalidArgument);
  CHECK(d.AddImage(other, ImageKind::kExpanded, "/x", kBase).code() ==
        StatusCode::kInvalidArgument);
  CHECK(d.AddImage(other, ImageKind::kPreallocated, "x", kBase).code() ==
        StatusCode::kInvalidArgument);
  CHECK(d.AddImage(kNullGuid, ImageKind::kExpanded, "x", kBase).code() ==
        StatusCode::kInvalidArgument);
  CHECK(d.AddImage("junk", ImageKind::kExpanded, "x", kBase).code() ==
        StatusCode::kInvalidArgument);
  CHECK(d.RemoveImage(kTopGuid).code() == StatusCode::kFailedPrecondition);
  CHECK(d.RemoveImage(kBase).code() == StatusCode::kFailedPrecondition);  // has a child
  CHECK(d.RemoveImage(missing).code() == StatusCode::kNotFound);
  CHECK(d.SetParent(kBase, kTopGuid).code() == StatusCode::kInvalidArgument);  // cycle
  CHECK(d.SetParent(kBase, kBase).code() == StatusCode::kInvalidArgument);
  CHECK(d.SetParent(kBase, missing).code() == StatusCode::kNotFound);
  CHECK(d.RenameGuid(kBase, kTopGuid).code() == StatusCode::kAlreadyExists);
  CHECK(d.RenameGuid(kBase, kNullGuid).code() == StatusCode::kInvalidArgument);
  CHECK(d.RenameGuid(missing, other).code() == StatusCode::kNotFound);
  CHECK(d.SetTop(missing).code() == StatusCode::kNotFound);
  CHECK(d.SetFile(kBase, "a/../../b").code() == StatusCode::kInvalidArgument);
  CHECK(d.SetDiskSize(0, 1, 1).code() == StatusCode::kInvalidArgument);
  // Nothing changed.
  MemoryFileSystem fs2;
  CHECK(d == LoadGolden(fs2, "snapshot.xml"));

  // A second snapshot, the ploop way.
  REQUIRE_OK(d.RenameGuid(kTopGuid, other));
  REQUIRE_OK(d.AddImage(kTopGuid, ImageKind::kExpanded, "root.hds.{f}", other));
  CHECK(d.top_guid() == other);  // the rename carried TopGUID along
  REQUIRE_OK(d.SetTop(kTopGuid));
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kBase, other, kTop});
  CHECK(d.FindImage(kTopGuid)->path == "/vz/root.hdd/root.hds.{f}");
  // Switch back to the base: a second child of the base becomes the top.
  const std::string top2 = "{22222222-2222-4333-8444-555555555555}";
  REQUIRE_OK(d.AddImage(top2, ImageKind::kExpanded, "root.hds.{g}", kBase));
  REQUIRE_OK(d.SetTop(top2));
  CHECK(d.Children(kBase) == std::vector<std::string>{other, top2});
  REQUIRE_OK(d.SetTemporary(other, true));
  CHECK(d.SetTop(other).code() == StatusCode::kFailedPrecondition);
  // Drop the old branch, leaf first.
  REQUIRE_OK(d.RemoveImage(kTopGuid));
  REQUIRE_OK(d.RemoveImage(other));
  CHECK(Guids(d.Chain()) == std::vector<std::string>{kBase, top2});
  REQUIRE_OK(d.SetDiskSize(20ull << 30, 81920, 16));
  Descriptor back = SaveAndReload(fs, d);
  CHECK(back == d);
  CHECK(back.chs_sectors() == 32);
  CHECK(Contains(Get(fs, kPath), "<End>41943040</End>"));
}

// Load must refuse each of these with `code` and a message containing
// `what`, writing nothing.
struct BadCase {
  const char* name;
  std::string xml;
  StatusCode code;
  const char* what;
};

std::vector<BadCase> BadDescriptors() {
  const std::string snap = Golden("snapshot.xml");
  const std::string base_shot_parent =
      "<GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n"
      "      <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>";
  const std::string top_image =
      "<GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>\n        <Type>Compressed</Type>";
  const std::string top_shot =
      "    <Shot>\n      <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>\n"
      "      <ParentGUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</ParentGUID>\n    </Shot>\n";
  const std::string base_image =
      "      <Image>\n        <GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n"
      "        <Type>Compressed</Type>\n        <File>root.hds</File>\n      </Image>\n";
  const auto kCorrupt = StatusCode::kCorruption;
  const auto kInvalid = StatusCode::kInvalidArgument;
  return {
      {"cycle in ParentGUID",
       Replace(snap, base_shot_parent,
               "<GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n"
               "      <ParentGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</ParentGUID>"),
       kCorrupt, "cycle"},
      {"missing parent",
       Replace(snap, base_shot_parent,
               "<GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n"
               "      <ParentGUID>{deadbeef-0000-4000-8000-000000000000}</ParentGUID>"),
       kCorrupt, "parent {deadbeef-0000-4000-8000-000000000000} does not exist"},
      {"duplicate image GUID",
       Replace(snap, top_image,
               "<GUID>{0D2A2A38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n<Type>Compressed</Type>"),
       kCorrupt, "duplicate image GUID"},
      {"duplicate shot GUID",
       Replace(snap, top_shot,
               Replace(top_shot, "{5fbaabe3-6958-40ff-92a7-860e329aab41}",
                       "{0D2A2A38-6d6b-4f2b-9b8e-6f0c2b1d0e11}")),
       kCorrupt, "duplicate shot GUID {0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}"},
      {"TopGUID names nothing", Replace(snap, "<TopGUID>{5fbaabe3", "<TopGUID>{6fbaabe3"), kCorrupt,
       "names no image"},
      {"no TopGUID and no top shot",
       Replace(
           Replace(Replace(snap, "<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>", ""),
                   "<GUID>{5fbaabe3", "<GUID>{6fbaabe3"),
           "<GUID>{5fbaabe3", "<GUID>{6fbaabe3"),
       kCorrupt, "no <TopGUID>"},
      {"top is temporary",
       Replace(snap, "<ParentGUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</ParentGUID>",
               "<ParentGUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</ParentGUID><Temporary/>"),
       kCorrupt, "temporary"},
      {"Blocksize not a power of two",
       Replace(snap, "<Blocksize>2048</Blocksize>", "<Blocksize>3000</Blocksize>"), kCorrupt,
       "invalid <Blocksize> 3000"},
      {"Blocksize too small",
       Replace(snap, "<Blocksize>2048</Blocksize>", "<Blocksize>32</Blocksize>"), kCorrupt,
       "invalid <Blocksize> 32"},
      {"Blocksize too large",
       Replace(snap, "<Blocksize>2048</Blocksize>", "<Blocksize>262144</Blocksize>"), kCorrupt,
       "invalid <Blocksize>"},
      {"Blocksize not a number",
       Replace(snap, "<Blocksize>2048</Blocksize>", "<Blocksize>2k</Blocksize>"), kCorrupt,
       "<Blocksize> is not a valid number"},
      {"Blocksize missing", Replace(snap, "<Blocksize>2048</Blocksize>", ""), kCorrupt,
       "missing <Blocksize>"},
      {"no images",
       Replace(Replace(Replace(snap, base_image, ""), "<Image>", "<Imagex>"), "</Image>",
               "</Imagex>"),
       kCorrupt, "no <Image>"},
      {"two Storage elements",
       Replace(snap, "  </StorageData>",
               "<Storage><Blocksize>2048</Blocksize></Storage></StorageData>"),
       StatusCode::kNotSupported, "split disks"},
      {"Disk_size 0", Replace(snap, "<Disk_size>20971520", "<Disk_size>0"), kCorrupt,
       "<Disk_size> is 0"},
      {"Disk_size missing", Replace(snap, "<Disk_size>20971520</Disk_size>", ""), kCorrupt,
       "missing <Disk_size>"},
      {"Disk_size negative", Replace(snap, "<Disk_size>20971520", "<Disk_size>-1"), kCorrupt,
       "not a valid number"},
      {"Disk_size overflows bytes",
       Replace(snap, "<Disk_size>20971520", "<Disk_size>36028797018963968"), kCorrupt,
       "not a valid number"},
      {"Cylinders over 32 bits", Replace(snap, "<Cylinders>40960", "<Cylinders>4294967296"),
       kCorrupt, "<Cylinders>"},
      {"Image without File", Replace(snap, "<File>root.hds</File>", ""), kCorrupt,
       "missing <File>"},
      {"Image with empty File", Replace(snap, "<File>root.hds</File>", "<File></File>"), kCorrupt,
       "empty file name"},
      {"Image without Type", Replace(snap, "<Type>Compressed</Type>", ""), kCorrupt,
       "missing <Type>"},
      {"Image with an unknown Type",
       Replace(snap, "<Type>Compressed</Type>", "<Type>Sparse</Type>"), kCorrupt,
       "unknown <Type> 'Sparse'"},
      {"Image without GUID",
       Replace(snap, "<GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID>\n        <Type>",
               "<Type>"),
       kCorrupt, "missing <GUID>"},
      {"Image with a bad GUID", Replace(snap, "<GUID>{0d2a2a38", "<GUID>{xd2a2a38"), kCorrupt,
       "<GUID> is not a GUID"},
      {"two GUIDs in an Image",
       Replace(snap, "<Type>Compressed</Type>",
               "<GUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</GUID><Type>Compressed</Type>"),
       kCorrupt, "more than one <GUID>"},
      {"image without a shot", Replace(snap, top_shot, ""), kCorrupt,
       "image {5fbaabe3-6958-40ff-92a7-860e329aab41} has no <Shot>"},
      {"shot without an image",
       Replace(
           snap, "</Snapshots>",
           "<Shot><GUID>{11111111-2222-4333-8444-555555555555}</GUID>"
           "<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot></Snapshots>"),
       kCorrupt, "has no <Image>"},
      {"Shot without ParentGUID",
       Replace(snap, "<ParentGUID>{0d2a2a38-6d6b-4f2b-9b8e-6f0c2b1d0e11}</ParentGUID>", ""),
       kCorrupt, "missing <ParentGUID>"},
      {"no Snapshots",
       Replace(Replace(snap, "<Snapshots>", "<Snapshotz>"), "</Snapshots>", "</Snapshotz>"),
       kCorrupt, "missing <Snapshots>"},
      {"no Disk_Parameters",
       Replace(Replace(snap, "<Disk_Parameters>", "<Disk_Parameterz>"), "</Disk_Parameters>",
               "</Disk_Parameterz>"),
       kCorrupt, "missing <Disk_Parameters>"},
      {"Preallocated 2",
       Replace(snap, "<Blocksize>2048</Blocksize>",
               "<Blocksize>2048</Blocksize><Preallocated>2</Preallocated>"),
       kCorrupt, "<Preallocated> must be 0 or 1"},
      {"Preallocated with a Plain image",
       Replace(Replace(snap, "<Blocksize>2048</Blocksize>",
                       "<Blocksize>2048</Blocksize><Preallocated>1</Preallocated>"),
               "<Type>Compressed</Type>", "<Type>Plain</Type>"),
       kCorrupt, "Plain image on a preallocated disk"},
      {"unknown root element",
       Replace(Replace(snap, "<Virtuozzo_disk_image>", "<Disk_image>"), "</Virtuozzo_disk_image>",
               "</Disk_image>"),
       kCorrupt, "root element is <Disk_image>"},
      {"Parallels Version 2.0",
       Replace(Replace(snap, "<Virtuozzo_disk_image>", "<Parallels_disk_image Version=\"2.0\">"),
               "</Virtuozzo_disk_image>", "</Parallels_disk_image>"),
       StatusCode::kNotSupported, "Version '2.0'"},
      {"absolute File", Replace(snap, "<File>root.hds</File>", "<File>/etc/shadow</File>"),
       kInvalid, "outside the descriptor's folder"},
      {"File with ..", Replace(snap, "<File>root.hds</File>", "<File>../other/root.hds</File>"),
       kInvalid, "outside the descriptor's folder"},
      {"File with .. inside",
       Replace(snap, "<File>root.hds</File>", "<File>a/../../root.hds</File>"), kInvalid,
       "outside the descriptor's folder"},
      {"malformed XML", Replace(snap, "</Heads>", "</Head>"), kCorrupt, "malformed XML at line 6"},
      {"truncated XML", snap.substr(0, snap.size() / 2), kCorrupt, "malformed XML"},
      {"not XML at all", "\x89PNG\r\n\x1a\n\xff\xfe", kCorrupt, "malformed XML"},
      {"empty file", "", kCorrupt, "empty file"},
      {"billion laughs",
       "<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [\n <!ENTITY lol \"lol\">\n"
       " <!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\n"
       " <!ENTITY lol2 \"&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;\">\n"
       " <!ENTITY lol3 \"&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;\">\n"
       " <!ENTITY lol4 \"&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;\">\n"
       " <!ENTITY lol5 \"&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;\">\n"
       " <!ENTITY lol6 \"&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;\">\n"
       " <!ENTITY lol7 \"&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;\">\n"
       " <!ENTITY lol8 \"&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;\">\n"
       " <!ENTITY lol9 \"&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;\">\n]>\n" +
           Replace(snap.substr(snap.find("<Virtuozzo")), "root.hds</File>", "&lol9;</File>"),
       kCorrupt, "DOCTYPE is not allowed"},
      {"external entity",
       "<?xml version=\"1.0\"?>\n<!DOCTYPE d [ <!ENTITY xxe SYSTEM \"file:///etc/passwd\"> ]>\n" +
           Replace(snap.substr(snap.find("<Virtuozzo")), "root.hds</File>", "&xxe;</File>"),
       kCorrupt, "DOCTYPE is not allowed"},
      {"undeclared entity", Replace(snap, "root.hds</File>", "&xxe;</File>"), kCorrupt,
       "malformed XML"},
  };
}

TEST_CASE("Descriptor Load refuses broken - inconsistent and hostile descriptors") {
  for (const BadCase& c : BadDescriptors()) {
    std::string name = c.name;
    CAPTURE(name);
    MemoryFileSystem fs;
    Put(fs, kPath, c.xml);
    auto r = Descriptor::Load(fs, kPath);
    REQUIRE_FALSE(r.ok());
    CAPTURE(r.error().message());
    CHECK(r.error().code() == c.code);
    CHECK(Contains(r.error().message(), c.what));
    // One line, naming the file.
    CHECK(r.error().message().rfind(kPath, 0) == 0);
    CHECK_FALSE(Contains(r.error().message(), "\n"));
    // Nothing written.
    CHECK(Get(fs, kPath) == c.xml);
    CHECK_FALSE(*fs.Exists(std::string(kPath) + ".tmp"));
  }
}

TEST_CASE("Descriptor Load refuses oversized input and reports a missing file") {
  MemoryFileSystem fs;
  std::string big = Golden("single.xml");
  big.insert(big.find("</Virtuozzo_disk_image>"),
             "<Pad>" + std::string(kMaxDescriptorBytes, 'x') + "</Pad>");
  Put(fs, kPath, big);
  auto r = Descriptor::Load(fs, kPath);
  CHECK(r.error().code() == StatusCode::kCorruption);
  CHECK(Contains(r.error().message(), "larger than any descriptor"));
  CHECK(Descriptor::Load(fs, "/nowhere/DiskDescriptor.xml").error().code() ==
        StatusCode::kNotFound);
}

TEST_CASE("Descriptor Load accepts files outside the folder only when allowed") {
  MemoryFileSystem fs;
  std::string xml = Replace(
      Replace(Golden("snapshot.xml"), "<File>root.hds</File>", "<File>/images/base.hds</File>"),
      "<File>root.hds.{", "<File>../shared/root.hds.{");
  Put(fs, kPath, xml);
  CHECK(Descriptor::Load(fs, kPath).error().code() == StatusCode::kInvalidArgument);
  REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, kPath, {.allow_outside_files = true}));
  CHECK(d.images()[0].file == "/images/base.hds");
  CHECK(d.images()[0].path == "/images/base.hds");
  CHECK(d.images()[1].path ==
        "/vz/root.hdd/../shared/root.hds.{7c1e4b1a-3f0e-4c59-a2d4-51a9b0c6e2f7}");
  // Saved as written.
  REQUIRE_OK(d.Save(fs));
  CHECK(Contains(Get(fs, kPath), "<File>/images/base.hds</File>"));
  REQUIRE_ASSIGN(Descriptor back, Descriptor::Load(fs, kPath, {.allow_outside_files = true}));
  CHECK(back == d);
}

TEST_CASE("Descriptor: a descriptor in the current folder resolves image paths relative to it") {
  MemoryFileSystem fs;
  Put(fs, "DiskDescriptor.xml", Golden("single.xml"));
  REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, "DiskDescriptor.xml"));
  CHECK(d.folder().empty());
  CHECK(d.images()[0].path == "root.hds");
  REQUIRE_OK(d.Save(fs));
}

TEST_CASE("Descriptor Save is atomic: a failed write - sync or rename keeps the old file") {
  struct Fault {
    const char* name;
    FaultOp op;
  };
  for (Fault f : {Fault{"create", FaultOp::kCreate}, Fault{"write", FaultOp::kWrite},
                  Fault{"sync", FaultOp::kSync}, Fault{"rename", FaultOp::kRename}}) {
    std::string fault = f.name;
    CAPTURE(fault);
    MemoryFileSystem mem;
    FaultFileSystem fs(mem);
    const std::string old_xml = Golden("snapshot.xml");
    Put(mem, kPath, old_xml);
    REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, kPath));
    REQUIRE_ASSIGN(Descriptor old, Descriptor::Load(fs, kPath));
    REQUIRE_OK(d.RenameGuid(kTopGuid, "{11111111-2222-4333-8444-555555555555}"));
    REQUIRE_OK(d.AddImage(kTopGuid, ImageKind::kExpanded, "root.hds.{x}",
                          "{11111111-2222-4333-8444-555555555555}"));
    REQUIRE_OK(d.SetTop(kTopGuid));
    fs.FailNth(f.op, 1, EIO);
    Status st = d.Save(fs);
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == StatusCode::kIOError);
    CHECK(Contains(st.message(), "save " + std::string(kPath)));
    fs.Reset();
    CHECK(Get(mem, kPath) == old_xml);
    CHECK_FALSE(*mem.Exists(std::string(kPath) + ".tmp"));
    REQUIRE_ASSIGN(Descriptor reread, Descriptor::Load(mem, kPath));
    CHECK(reread == old);
    // The same Save works once the fault is gone.
    REQUIRE_OK(d.Save(fs));
    REQUIRE_ASSIGN(Descriptor now, Descriptor::Load(mem, kPath));
    CHECK(now == d);
  }
}

TEST_CASE("Descriptor Save: a crash at any point leaves the old or the new descriptor") {
  bool saw_old = false;
  bool saw_new = false;
  for (uint64_t cut = 0;; ++cut) {
    CAPTURE(cut);
    MemoryFileSystem mem;
    FaultFileSystem fs(mem);
    Put(mem, kPath, Golden("single.xml"));
    REQUIRE_ASSIGN(Descriptor old, Descriptor::Load(fs, kPath));
    REQUIRE_ASSIGN(Descriptor d, Descriptor::Load(fs, kPath));
    REQUIRE_OK(d.RenameGuid(kTopGuid, kBase));
    REQUIRE_OK(d.AddImage(kTopGuid, ImageKind::kExpanded, "root.hds.{x}", kBase));
    REQUIRE_OK(d.SetTop(kTopGuid));
    fs.CutAfter(cut);
    Status st = d.Save(fs);
    bool was_cut = fs.cut();
    REQUIRE_OK(fs.Crash(CrashMode::kDropAll));
    REQUIRE_ASSIGN(Descriptor after, Descriptor::Load(mem, kPath));
    if (after == old) {
      saw_old = true;
      CHECK_FALSE(st.ok());
    } else {
      CHECK(after == d);
      saw_new = true;
    }
    if (!was_cut) {
      CHECK(st.ok());
      CHECK(after == d);
      break;
    }
    REQUIRE(cut < 20);
  }
  CHECK(saw_old);
  CHECK(saw_new);
}

TEST_CASE("Descriptor Save reports a failed folder sync after the rename") {
  MemoryFileSystem mem;
  FaultFileSystem fs(mem);
  REQUIRE_ASSIGN(Descriptor d, Descriptor::NewSingle(kPath, 1 << 30, 1 << 20, ImageKind::kExpanded,
                                                     "root.hds", kTopGuid, false, 2080, 16));
  fs.FailNth(FaultOp::kSync, 2, EIO);  // the first sync is the file's
  CHECK(d.Save(fs).code() == StatusCode::kIOError);
  // The new descriptor is in place (not known to be durable).
  REQUIRE_ASSIGN(Descriptor back, Descriptor::Load(mem, kPath));
  CHECK(back == d);
}

TEST_SUITE_END();

TEST_SUITE_BEGIN("posix");
TEST_CASE("Descriptor refuses a File that leads out of its folder through a symlink") {
  testing::TempDir tmp;
  PosixFileSystem fs;
  namespace stdfs = std::filesystem;
  stdfs::create_directories(tmp / "disk");
  stdfs::create_directories(tmp / "outside/sub");
  Put(fs, tmp / "outside/x.hds", "secret");
  Put(fs, tmp / "disk/inside.hds", "data");
  const std::string path = tmp / "disk/DiskDescriptor.xml";
  auto with_file = [&](const std::string& file) {
    Put(fs, path,
        Replace(Golden("single.xml"), "<File>root.hds</File>", "<File>" + file + "</File>"));
  };

  // A symlinked file.
  stdfs::create_symlink("../outside/x.hds", tmp / "disk/root.hds");
  with_file("root.hds");
  auto r = Descriptor::Load(fs, path);
  CHECK(r.error().code() == StatusCode::kInvalidArgument);
  CHECK(Contains(r.error().message(), "leads outside the descriptor's folder"));
  REQUIRE_ASSIGN(Descriptor allowed, Descriptor::Load(fs, path, {.allow_outside_files = true}));
  CHECK(allowed.images()[0].path == tmp / "disk/root.hds");

  // A symlinked folder, with a file that does not exist yet.
  stdfs::create_symlink("../outside/sub", tmp / "disk/sub");
  with_file("sub/new.hds");
  CHECK(Descriptor::Load(fs, path).error().code() == StatusCode::kInvalidArgument);

  // A symlink that stays inside is fine, as is a missing file.
  stdfs::create_symlink("inside.hds", tmp / "disk/link.hds");
  with_file("link.hds");
  CHECK_OK(Descriptor::Load(fs, path));
  with_file("not-created-yet.hds");
  CHECK_OK(Descriptor::Load(fs, path));

  // The descriptor's own folder reached through a symlink.
  stdfs::create_symlink("disk", tmp / "alias");
  with_file("inside.hds");
  REQUIRE_ASSIGN(Descriptor via_alias, Descriptor::Load(fs, tmp / "alias/DiskDescriptor.xml"));
  CHECK(via_alias.images()[0].path == tmp / "alias/inside.hds");
}

TEST_CASE("Descriptor Save and Load on a real file system") {
  testing::TempDir tmp;
  PosixFileSystem fs;
  const std::string path = tmp / "DiskDescriptor.xml";
  REQUIRE_ASSIGN(Descriptor d,
                 Descriptor::NewSingle(path, 10ull << 30, 1 << 20, ImageKind::kExpanded, "root.hds",
                                       kTopGuid, false, 40960, 16));
  REQUIRE_OK(d.Save(fs));
  REQUIRE_OK(d.Save(fs));  // over an existing file
  CHECK_FALSE(*fs.Exists(path + ".tmp"));
  REQUIRE_ASSIGN(Descriptor back, Descriptor::Load(fs, path));
  CHECK(back == d);
  CHECK(back.images()[0].path == tmp / "root.hds");
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(ss.str() == Golden("single.xml"));
}

TEST_SUITE_END();

}  // namespace
}  // namespace ploop
