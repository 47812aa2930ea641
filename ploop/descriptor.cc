// Design: DiskDescriptor.xml as a validated model plus the document it came
// from.
//
// Goal. Read every descriptor OpenVZ ploop, Virtuozzo and Parallels software
// write, refuse anything inconsistent or hostile with a one-line reason, let
// the snapshot code edit the model, and write the file back atomically
// without losing what other software put in it (prl-xml.rst asks writers to
// keep unknown nodes; OpenVZ ploop does not, we do).
//
// Two representations:
//
//   Load:  bytes --libxml2--> xmlDoc (kept, never modified) --Parser--> model
//   Save:  copy of xmlDoc --ApplyTo(model)--> bytes --> .tmp, sync, rename
//
// The model (sizes, images_, shots_, top_guid_) is the truth; the document is
// only a template for the bytes. ApplyTo() rewrites the elements this module
// owns in place and leaves every other node, attribute and comment alone:
//
//   Disk_Parameters/{Disk_size, Cylinders, Heads, Sectors} set; Padding added
//       as 0 when missing; Max_delta_size and Encryption kept as they are.
//   StorageData/Storage/{Start (added as 0 when missing), End, Blocksize,
//       Preallocated (only when 1)}; one Image{GUID, Type, File} per image.
//   Snapshots/{TopGUID, Shot{GUID, ParentGUID, Temporary marker,
//       ContentDigest (only when known)}} likewise.
//
// Image and Shot nodes are matched to the model through source_guid_ (the
// GUID a node carried when loaded), so a renamed image keeps its node and the
// unknown children in it; nodes of removed images are dropped; nodes for new
// images are created after the last existing one. A missing known element is
// inserted next to its known neighbours in OpenVZ's order, so a descriptor
// built from scratch (an empty Virtuozzo_disk_image root run through the
// same ApplyTo()) comes out in exactly the layout OpenVZ writes.
//
// Invariants (see descriptor.h) are established by the Parser and kept by the
// mutation helpers, each of which checks before it changes anything; the
// shots form a forest, so chain walks terminate.
//
// Hostile input. The file is bounded (kMaxDescriptorBytes) before it is read.
// libxml2 parses with XML_PARSE_NONET and without NOENT/DTDLOAD/DTDATTR, and
// a SAX hook stops the parser at any <!DOCTYPE>: descriptors never have one,
// and refusing it removes entity expansion (billion laughs) and external
// entities (XXE) as a class. Parse errors are collected from the context,
// never printed. <File> entries must stay inside the descriptor's folder
// (no absolute path, no "..", and FileSystem::RealPath() must not leave the
// folder through a symlink) unless the caller allows it.
//
// Crash ordering of Save(): write <path>.tmp, fsync it, rename over <path>,
// fsync the folder. A crash at any point leaves either the old or the new
// descriptor at <path>, never a mix; a stale .tmp is overwritten next time.
#include "ploop/descriptor.h"

#include <libxml/parser.h>
#include <libxml/parserInternals.h>
#include <libxml/tree.h>
#include <libxml/xmlstring.h>
#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <mutex>
#include <set>
#include <span>
#include <unordered_map>

#include "ploop/path.h"

namespace ploop {

namespace {

constexpr char kVirtuozzoRoot[] = "Virtuozzo_disk_image";
constexpr char kParallelsRoot[] = "Parallels_disk_image";
constexpr char kTypeCompressed[] = "Compressed";
constexpr char kTypePlain[] = "Plain";
constexpr size_t kMaxFileNameBytes = 4096;

// OpenVZ's element order inside each container we write to.
constexpr const char* kRootOrder[] = {"Disk_Parameters", "StorageData", "Snapshots"};
constexpr const char* kDiskParamsOrder[] = {"Disk_size", "Max_delta_size", "Cylinders", "Heads",
                                            "Sectors",   "Padding",        "Encryption"};
constexpr const char* kStorageDataOrder[] = {"Volume", "Storage"};
constexpr const char* kStorageOrder[] = {"Start", "End", "Blocksize", "Preallocated", "Image"};
constexpr const char* kImageOrder[] = {"GUID", "Type", "File"};
constexpr const char* kSnapshotsOrder[] = {"TopGUID", "Shot"};
constexpr const char* kShotOrder[] = {"GUID", "ParentGUID", "Temporary", "ContentDigest"};

using Order = std::span<const char* const>;

const xmlChar* X(const char* s) { return reinterpret_cast<const xmlChar*>(s); }

std::string Name(const xmlNode* node) { return reinterpret_cast<const char*>(node->name); }

bool IsElement(const xmlNode* node, const char* name) {
  return node->type == XML_ELEMENT_NODE && xmlStrcmp(node->name, X(name)) == 0;
}

std::vector<xmlNode*> Elements(xmlNode* parent, const char* name) {
  std::vector<xmlNode*> out;
  for (xmlNode* c = parent->children; c != nullptr; c = c->next) {
    if (IsElement(c, name)) out.push_back(c);
  }
  return out;
}

// The character data directly inside `node`. Deliberately not
// xmlNodeGetContent(), which would follow entity references.
std::string Text(const xmlNode* node) {
  std::string out;
  for (const xmlNode* c = node->children; c != nullptr; c = c->next) {
    if ((c->type == XML_TEXT_NODE || c->type == XML_CDATA_SECTION_NODE) && c->content != nullptr) {
      out += reinterpret_cast<const char*>(c->content);
    }
  }
  return out;
}

std::string_view Trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n";
  size_t b = s.find_first_not_of(kSpace);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(kSpace) - b + 1);
}

// `s` in quotes for a message, cut short so hostile input cannot flood it.
std::string Quote(std::string_view s) {
  constexpr size_t kMax = 60;
  if (s.size() <= kMax) return "'" + std::string(s) + "'";
  return "'" + std::string(s.substr(0, kMax)) + "...'";
}

Result<xmlNode*> OptionalChild(xmlNode* parent, const char* name) {
  std::vector<xmlNode*> found = Elements(parent, name);
  if (found.size() > 1) {
    return Status::Corruption("more than one <" + std::string(name) + "> in <" + Name(parent) +
                              ">");
  }
  return found.empty() ? nullptr : found[0];
}

Result<xmlNode*> RequiredChild(xmlNode* parent, const char* name) {
  ASSIGN_OR_RETURN(xmlNode * child, OptionalChild(parent, name));
  if (child == nullptr) {
    return Status::Corruption("missing <" + std::string(name) + "> in <" + Name(parent) + ">");
  }
  return child;
}

Result<uint64_t> ParseNumber(const xmlNode* node, uint64_t max = UINT64_MAX) {
  std::string text = Text(node);
  std::string_view t = Trim(text);
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  if (t.empty() || ec != std::errc() || end != t.data() + t.size() || value > max) {
    return Status::Corruption("<" + Name(node) + "> is not a valid number: " + Quote(text));
  }
  return value;
}

Result<uint64_t> RequiredNumber(xmlNode* parent, const char* name, uint64_t max = UINT64_MAX) {
  ASSIGN_OR_RETURN(xmlNode * node, RequiredChild(parent, name));
  return ParseNumber(node, max);
}

Result<std::optional<uint64_t>> OptionalNumber(xmlNode* parent, const char* name,
                                               uint64_t max = UINT64_MAX) {
  ASSIGN_OR_RETURN(xmlNode * node, OptionalChild(parent, name));
  if (node == nullptr) return std::optional<uint64_t>();
  ASSIGN_OR_RETURN(uint64_t value, ParseNumber(node, max));
  return std::optional<uint64_t>(value);
}

Result<std::string> RequiredGuid(xmlNode* parent, const char* name) {
  ASSIGN_OR_RETURN(xmlNode * node, RequiredChild(parent, name));
  std::string text = Text(node);
  Result<std::string> guid = ParseGuid(Trim(text));
  if (!guid) {
    return Status::Corruption("<" + std::string(name) + "> is not a GUID: " + Quote(text));
  }
  return guid;
}

// Why `file` can never name an image, or nullopt. Says nothing about where
// it points (LeavesFolder()).
std::optional<std::string> BadFileName(const std::string& file) {
  if (file.empty()) return "empty file name";
  if (file.size() > kMaxFileNameBytes) return "file name longer than 4096 bytes";
  if (file.back() == '/') return "file name " + Quote(file) + " names a folder";
  for (char c : file) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return "file name " + Quote(file) + " has control characters";
    }
  }
  if (xmlCheckUTF8(X(file.c_str())) == 0) return "file name is not valid UTF-8";
  return std::nullopt;
}

// An absolute path or one with a ".." component.
bool LeavesFolder(std::string_view file) {
  if (!file.empty() && file[0] == '/') return true;
  while (!file.empty()) {
    size_t slash = file.find('/');
    if (file.substr(0, slash) == "..") return true;
    if (slash == std::string_view::npos) break;
    file.remove_prefix(slash + 1);
  }
  return false;
}

bool IsUnder(const std::string& path, const std::string& folder) {
  if (folder == "/") return path.size() > 1 && path[0] == '/';
  return path.size() > folder.size() + 1 && path.compare(0, folder.size(), folder) == 0 &&
         path[folder.size()] == '/';
}

std::string_view TypeName(ImageKind kind) {
  return kind == ImageKind::kRaw ? kTypePlain : kTypeCompressed;
}

// --- libxml2 plumbing ------------------------------------------------------

void InitLibxml() {
  static std::once_flag once;
  std::call_once(once, [] { xmlInitParser(); });
}

struct ParserCtxtDeleter {
  void operator()(xmlParserCtxt* ctxt) const { xmlFreeParserCtxt(ctxt); }
};

Status OutOfMemory(std::string_view what) { return Status::FromErrno(ENOMEM, what); }

// SAX hook: called when the parser meets <!DOCTYPE name ...>, before any
// declaration in it is read. Stops the parse.
void RefuseDoctype(void* ctx, const xmlChar*, const xmlChar*, const xmlChar*) {
  auto* ctxt = static_cast<xmlParserCtxt*>(ctx);
  *static_cast<bool*>(ctxt->_private) = true;
  xmlStopParser(ctxt);
}

// Parses `xml` into a document. Corruption with the parser's first error
// (and its line) for anything not well-formed, and for any DOCTYPE.
Result<xmlDoc*> ParseXml(std::string_view xml) {
  InitLibxml();
  std::unique_ptr<xmlParserCtxt, ParserCtxtDeleter> ctxt(
      xmlCreateMemoryParserCtxt(xml.data(), static_cast<int>(xml.size())));
  if (ctxt == nullptr) return OutOfMemory("create XML parser");
  xmlCtxtUseOptions(ctxt.get(), XML_PARSE_NONET | XML_PARSE_NOBLANKS | XML_PARSE_NOCDATA |
                                    XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
  bool saw_doctype = false;
  ctxt->_private = &saw_doctype;
  ctxt->sax->internalSubset = &RefuseDoctype;
  xmlParseDocument(ctxt.get());
  xmlDoc* doc = ctxt->myDoc;
  ctxt->myDoc = nullptr;
  if (saw_doctype || !ctxt->wellFormed || doc == nullptr) {
    if (doc != nullptr) xmlFreeDoc(doc);
    if (saw_doctype) return Status::Corruption("a DOCTYPE is not allowed in a disk descriptor");
    const xmlError* err = xmlCtxtGetLastError(ctxt.get());
    std::string msg = err != nullptr && err->message != nullptr ? err->message : "parse error";
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    int line = err != nullptr ? err->line : 0;
    return Status::Corruption("malformed XML at line " + std::to_string(line) + ": " + msg);
  }
  return doc;
}

int Rank(const xmlNode* node, Order order) {
  for (size_t i = 0; i < order.size(); ++i) {
    if (IsElement(node, order[i])) return static_cast<int>(i);
  }
  return -1;
}

Result<xmlNode*> NewElement(xmlDoc* doc, const char* name) {
  xmlNode* node = xmlNewDocNode(doc, nullptr, X(name), nullptr);
  if (node == nullptr) return OutOfMemory("create XML element");
  return node;
}

// Puts `child` after the last sibling that comes no later in `order`, else
// before the first known sibling, else at the end.
void InsertOrdered(xmlNode* parent, xmlNode* child, Order order) {
  int rank = Rank(child, order);
  xmlNode* after = nullptr;
  xmlNode* before = nullptr;
  for (xmlNode* c = parent->children; c != nullptr; c = c->next) {
    int r = Rank(c, order);
    if (r < 0) continue;
    if (r <= rank) {
      after = c;
    } else if (before == nullptr) {
      before = c;
    }
  }
  if (after != nullptr) {
    xmlAddNextSibling(after, child);
  } else if (before != nullptr) {
    xmlAddPrevSibling(before, child);
  } else {
    xmlAddChild(parent, child);
  }
}

// The first child element `name` of `parent`, created in order if missing.
Result<xmlNode*> EnsureChild(xmlNode* parent, const char* name, Order order) {
  for (xmlNode* c = parent->children; c != nullptr; c = c->next) {
    if (IsElement(c, name)) return c;
  }
  ASSIGN_OR_RETURN(xmlNode * node, NewElement(parent->doc, name));
  InsertOrdered(parent, node, order);
  return node;
}

void FreeNode(xmlNode* node) {
  xmlUnlinkNode(node);
  xmlFreeNode(node);
}

void RemoveChildren(xmlNode* parent, const char* name) {
  for (xmlNode* c : Elements(parent, name)) FreeNode(c);
}

bool HasChild(xmlNode* parent, const char* name) { return !Elements(parent, name).empty(); }

Status SetText(xmlNode* node, const std::string& text) {
  while (node->children != nullptr) FreeNode(node->children);
  // A text node holds raw characters; the serialiser escapes them.
  xmlNode* t = xmlNewDocTextLen(node->doc, X(text.c_str()), static_cast<int>(text.size()));
  if (t == nullptr) return OutOfMemory("create XML text");
  xmlAddChild(node, t);
  return Status::Ok();
}

Status SetChildText(xmlNode* parent, const char* name, const std::string& text, Order order) {
  ASSIGN_OR_RETURN(xmlNode * node, EnsureChild(parent, name, order));
  return SetText(node, text);
}

Status EnsureChildText(xmlNode* parent, const char* name, const std::string& text, Order order) {
  if (HasChild(parent, name)) return Status::Ok();
  return SetChildText(parent, name, text, order);
}

// The GUID an Image or Shot node of a loaded (hence validated) document
// carries; "" when it has none.
std::string NodeGuid(xmlNode* node) {
  for (xmlNode* c = node->children; c != nullptr; c = c->next) {
    if (!IsElement(c, "GUID")) continue;
    std::string text = Text(c);
    Result<std::string> guid = ParseGuid(Trim(text));
    return guid ? *guid : "";
  }
  return "";
}

}  // namespace

// --- GUIDs -----------------------------------------------------------------

bool IsContentDigest(std::string_view text) {
  if (text.size() != kContentDigestPrefix.size() + 64 || !text.starts_with(kContentDigestPrefix)) {
    return false;
  }
  for (char c : text.substr(kContentDigestPrefix.size())) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

Result<std::string> ParseGuid(std::string_view text) {
  std::string_view body = text;
  if (body.size() == 38 && body.front() == '{' && body.back() == '}') {
    body = body.substr(1, 36);
  }
  auto bad = [&] { return Status::InvalidArgument("not a GUID: " + Quote(text)); };
  if (body.size() != 36) return bad();
  std::string out = "{";
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return bad();
    } else if (c >= '0' && c <= '9') {
    } else if (c >= 'a' && c <= 'f') {
    } else if (c >= 'A' && c <= 'F') {
      c = static_cast<char>(c - 'A' + 'a');
    } else {
      return bad();
    }
    out += c;
  }
  out += '}';
  return out;
}

Result<std::string> NewRandomGuid() {
  uint8_t b[16];
  size_t done = 0;
  while (done < sizeof(b)) {
    ssize_t n = ::getrandom(b + done, sizeof(b) - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "getrandom");
    }
    done += static_cast<size_t>(n);
  }
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "{";
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += kHex[b[i] >> 4];
    out += kHex[b[i] & 0xf];
  }
  out += '}';
  return out;
}

// --- Parser ----------------------------------------------------------------

// Fills a Descriptor from a parsed document and checks every invariant.
class Descriptor::Parser {
 public:
  Parser(Descriptor& d, FileSystem& fs, const DescriptorLoadOptions& options)
      : d_(d), fs_(fs), options_(options) {}

  Status Parse(xmlDoc* doc) {
    xmlNode* root = xmlDocGetRootElement(doc);
    if (root == nullptr) return Status::Corruption("no root element");
    TRY(CheckRoot(root));
    TRY(ParseDiskParameters(root));
    TRY(ParseStorage(root));
    TRY(ParseSnapshots(root));
    TRY(CheckTree());
    TRY(CheckFilesStayInside());
    return Status::Ok();
  }

 private:
  Status CheckRoot(xmlNode* root) {
    if (IsElement(root, kVirtuozzoRoot)) return Status::Ok();
    if (!IsElement(root, kParallelsRoot)) {
      return Status::Corruption("root element is <" + Name(root) + ">, expected <" +
                                kVirtuozzoRoot + "> or <" + kParallelsRoot + ">");
    }
    xmlChar* version = xmlGetNoNsProp(root, X("Version"));
    if (version == nullptr) return Status::Ok();
    std::string v = reinterpret_cast<const char*>(version);
    xmlFree(version);
    if (Trim(v) != "1.0") {
      return Status::NotSupported(std::string(kParallelsRoot) + " Version " + Quote(v) +
                                  " is not supported (only 1.0)");
    }
    return Status::Ok();
  }

  Status ParseDiskParameters(xmlNode* root) {
    ASSIGN_OR_RETURN(xmlNode * params, RequiredChild(root, "Disk_Parameters"));
    ASSIGN_OR_RETURN(d_.disk_size_sectors_,
                     RequiredNumber(params, "Disk_size", UINT64_MAX / kSectorBytes));
    if (d_.disk_size_sectors_ == 0) return Status::Corruption("<Disk_size> is 0");
    ASSIGN_OR_RETURN(auto cylinders, OptionalNumber(params, "Cylinders", UINT32_MAX));
    ASSIGN_OR_RETURN(auto heads, OptionalNumber(params, "Heads", UINT32_MAX));
    d_.cylinders_ = static_cast<uint32_t>(cylinders.value_or(0));
    d_.heads_ = static_cast<uint32_t>(heads.value_or(0));
    ASSIGN_OR_RETURN(d_.max_delta_size_sectors_, OptionalNumber(params, "Max_delta_size"));
    ASSIGN_OR_RETURN(xmlNode * encryption, OptionalChild(params, "Encryption"));
    if (encryption != nullptr) {
      ASSIGN_OR_RETURN(xmlNode * key_id, OptionalChild(encryption, "KeyId"));
      if (key_id != nullptr) d_.encryption_key_id_ = std::string(Trim(Text(key_id)));
    }
    return Status::Ok();
  }

  Status ParseStorage(xmlNode* root) {
    ASSIGN_OR_RETURN(xmlNode * data, RequiredChild(root, "StorageData"));
    std::vector<xmlNode*> storages = Elements(data, "Storage");
    if (storages.empty()) return Status::Corruption("missing <Storage> in <StorageData>");
    if (storages.size() > 1) {
      return Status::NotSupported("split disks (" + std::to_string(storages.size()) +
                                  " <Storage> elements) are not supported");
    }
    xmlNode* storage = storages[0];
    ASSIGN_OR_RETURN(xmlNode * blocksize, RequiredChild(storage, "Blocksize"));
    ASSIGN_OR_RETURN(uint64_t cluster_sectors, ParseNumber(blocksize, UINT32_MAX));
    if (!IsValidClusterBytes(cluster_sectors * kSectorBytes)) {
      return Status::Corruption("invalid <Blocksize> " + std::to_string(cluster_sectors) +
                                " (a power of two from 64 to 131072 sectors)");
    }
    d_.cluster_sectors_ = static_cast<uint32_t>(cluster_sectors);
    ASSIGN_OR_RETURN(auto preallocated, OptionalNumber(storage, "Preallocated"));
    if (preallocated.value_or(0) > 1) {
      return Status::Corruption("<Preallocated> must be 0 or 1, not " +
                                std::to_string(*preallocated));
    }
    d_.preallocated_ = preallocated.value_or(0) == 1;

    std::vector<xmlNode*> images = Elements(storage, "Image");
    if (images.empty()) return Status::Corruption("no <Image> in <Storage>");
    std::set<std::string> seen;
    for (xmlNode* node : images) {
      DescriptorImage image;
      ASSIGN_OR_RETURN(image.guid, RequiredGuid(node, "GUID"));
      auto ctx = "image " + image.guid;
      if (image.guid == kNullGuid) return Status::Corruption(ctx + ": the null GUID");
      if (!seen.insert(image.guid).second) {
        return Status::Corruption("duplicate image GUID " + image.guid);
      }
      ASSIGN_OR_RETURN_CTX(xmlNode * type, RequiredChild(node, "Type"), ctx);
      std::string type_text(Trim(Text(type)));
      if (type_text == kTypeCompressed) {
        image.kind = ImageKind::kExpanded;
      } else if (type_text == kTypePlain) {
        image.kind = ImageKind::kRaw;
      } else {
        return Status::Corruption(ctx + ": unknown <Type> " + Quote(type_text) +
                                  " (expected Compressed or Plain)");
      }
      if (image.kind == ImageKind::kRaw && d_.preallocated_) {
        return Status::Corruption(ctx + ": a Plain image on a preallocated disk");
      }
      ASSIGN_OR_RETURN_CTX(xmlNode * file, RequiredChild(node, "File"), ctx);
      image.file = Text(file);
      if (auto why = BadFileName(image.file)) return Status::Corruption(ctx + ": " + *why);
      if (!options_.allow_outside_files && LeavesFolder(image.file)) {
        return Status::InvalidArgument(ctx + ": file " + Quote(image.file) +
                                       " is outside the descriptor's folder");
      }
      image.path = d_.ResolvePath(image.file);
      d_.source_guid_[image.guid] = image.guid;
      d_.images_.push_back(std::move(image));
    }
    return Status::Ok();
  }

  Status ParseSnapshots(xmlNode* root) {
    ASSIGN_OR_RETURN(xmlNode * snapshots, RequiredChild(root, "Snapshots"));
    ASSIGN_OR_RETURN(xmlNode * top, OptionalChild(snapshots, "TopGUID"));
    if (top != nullptr) {
      ASSIGN_OR_RETURN(d_.top_guid_, RequiredGuid(snapshots, "TopGUID"));
    }
    std::set<std::string> seen;
    for (xmlNode* node : Elements(snapshots, "Shot")) {
      DescriptorShot shot;
      ASSIGN_OR_RETURN_CTX(shot.guid, RequiredGuid(node, "GUID"), "<Shot>");
      auto ctx = "shot " + shot.guid;
      if (!seen.insert(shot.guid).second) {
        return Status::Corruption("duplicate shot GUID " + shot.guid);
      }
      ASSIGN_OR_RETURN_CTX(shot.parent_guid, RequiredGuid(node, "ParentGUID"), ctx);
      shot.temporary = HasChild(node, "Temporary");
      // A digest we cannot read is dropped (treated as unknown): it only
      // ever saves work, and a wrong one must never be trusted.
      ASSIGN_OR_RETURN(xmlNode * digest, OptionalChild(node, "ContentDigest"));
      if (digest != nullptr) {
        std::string text(Trim(Text(digest)));
        if (IsContentDigest(text)) shot.content_digest = std::move(text);
      }
      d_.shots_.push_back(std::move(shot));
    }
    return Status::Ok();
  }

  Status CheckTree() {
    std::unordered_map<std::string, size_t> shot_index;
    for (size_t i = 0; i < d_.shots_.size(); ++i) shot_index[d_.shots_[i].guid] = i;
    std::set<std::string> image_guids;
    for (const DescriptorImage& image : d_.images_) {
      image_guids.insert(image.guid);
      if (!shot_index.count(image.guid)) {
        return Status::Corruption("image " + image.guid + " has no <Shot>");
      }
    }
    for (const DescriptorShot& shot : d_.shots_) {
      if (!image_guids.count(shot.guid)) {
        return Status::Corruption("shot " + shot.guid + " has no <Image>");
      }
      if (shot.parent_guid != kNullGuid && !shot_index.count(shot.parent_guid)) {
        return Status::Corruption("shot " + shot.guid + ": parent " + shot.parent_guid +
                                  " does not exist");
      }
    }
    // Every shot must reach the null GUID. Walk up from each, colouring
    // shots on the current walk (1) and shots known to reach a root (2);
    // meeting a 1 is a cycle. Linear in the number of shots.
    std::vector<int> colour(d_.shots_.size(), 0);
    for (size_t start = 0; start < d_.shots_.size(); ++start) {
      std::vector<size_t> walk;
      size_t i = start;
      while (colour[i] == 0) {
        colour[i] = 1;
        walk.push_back(i);
        const std::string& parent = d_.shots_[i].parent_guid;
        if (parent == kNullGuid) break;
        i = shot_index[parent];
        if (colour[i] == 1) {
          return Status::Corruption("shot " + d_.shots_[i].guid +
                                    ": the ParentGUID chain has a cycle");
        }
      }
      for (size_t w : walk) colour[w] = 2;
    }

    if (d_.top_guid_.empty()) {
      // Parallels VM compatibility, as OpenVZ: without TopGUID, the shot with
      // the well-known top GUID is the top.
      if (!shot_index.count(std::string(kTopGuid))) {
        return Status::Corruption("no <TopGUID> and no shot " + std::string(kTopGuid));
      }
      d_.top_guid_ = kTopGuid;
    }
    auto top = shot_index.find(d_.top_guid_);
    if (top == shot_index.end()) {
      return Status::Corruption("<TopGUID> " + d_.top_guid_ + " names no image");
    }
    if (d_.shots_[top->second].temporary) {
      return Status::Corruption("top " + d_.top_guid_ + " is a temporary snapshot");
    }
    return Status::Ok();
  }

  // Symlinks: compare where the folder and each image really are.
  Status CheckFilesStayInside() {
    if (options_.allow_outside_files) return Status::Ok();
    std::string folder = d_.folder_.empty() ? "." : d_.folder_;
    ASSIGN_OR_RETURN(std::string real_folder, fs_.RealPath(folder));
    for (const DescriptorImage& image : d_.images_) {
      ASSIGN_OR_RETURN(std::string real, fs_.RealPath(JoinPath(folder, image.file)));
      if (!IsUnder(real, real_folder)) {
        return Status::InvalidArgument("image " + image.guid + ": file " + Quote(image.file) +
                                       " leads outside the descriptor's folder (to " + Quote(real) +
                                       ")");
      }
    }
    return Status::Ok();
  }

  Descriptor& d_;
  FileSystem& fs_;
  const DescriptorLoadOptions& options_;
};

// --- Descriptor ------------------------------------------------------------

void Descriptor::XmlDocDeleter::operator()(_xmlDoc* doc) const { xmlFreeDoc(doc); }

Descriptor::Descriptor(std::string path) : path_(std::move(path)), folder_(DirName(path_)) {}
Descriptor::Descriptor(Descriptor&&) noexcept = default;
Descriptor& Descriptor::operator=(Descriptor&&) noexcept = default;
Descriptor::~Descriptor() = default;

Result<Descriptor> Descriptor::NewSingle(const std::string& path, uint64_t size_bytes,
                                         uint64_t cluster_bytes, ImageKind kind,
                                         const std::string& file_name, std::string_view guid,
                                         bool preallocated, uint32_t cylinders, uint32_t heads) {
  if (kind == ImageKind::kPreallocated) {
    kind = ImageKind::kExpanded;
    preallocated = true;
  }
  if (kind == ImageKind::kRaw && preallocated) {
    return Status::InvalidArgument("a raw image cannot be on a preallocated disk");
  }
  if (!IsValidClusterBytes(cluster_bytes)) {
    return Status::InvalidArgument("invalid cluster size " + std::to_string(cluster_bytes));
  }
  Descriptor d(path);
  TRY(d.SetDiskSize(size_bytes, cylinders, heads));
  d.cluster_sectors_ = static_cast<uint32_t>(cluster_bytes / kSectorBytes);
  d.preallocated_ = preallocated;
  TRY(d.AddImage(guid, kind, file_name, kNullGuid));
  d.top_guid_ = d.images_[0].guid;
  return d;
}

Result<Descriptor> Descriptor::Load(FileSystem& fs, const std::string& path,
                                    const DescriptorLoadOptions& options) {
  auto fail = [&](Status s) { return std::move(s).WithContext(path); };
  std::string bytes;
  {
    auto file = fs.Open(path, OpenMode::kReadOnly);
    if (!file) return fail(file.error());
    auto size = (*file)->Size();
    if (!size) return fail(size.error());
    if (*size == 0) return fail(Status::Corruption("empty file"));
    if (*size > kMaxDescriptorBytes) {
      return fail(Status::Corruption("file is " + std::to_string(*size) +
                                     " bytes, larger than any descriptor (limit " +
                                     std::to_string(kMaxDescriptorBytes) + ")"));
    }
    bytes.resize(*size);
    Status read = (*file)->ReadAt(0, std::as_writable_bytes(std::span(bytes)));
    if (!read.ok()) return fail(read);
  }
  auto doc = ParseXml(bytes);
  if (!doc) return fail(doc.error());
  Descriptor d(path);
  d.doc_.reset(*doc);
  Status parsed = Parser(d, fs, options).Parse(d.doc_.get());
  if (!parsed.ok()) return fail(parsed);
  return d;
}

Status Descriptor::Save(FileSystem& fs) const {
  ASSIGN_OR_RETURN_CTX(std::string xml, ToXml(), "save " + path_);
  const std::string tmp = path_ + ".tmp";
  Status written = [&]() -> Status {
    ASSIGN_OR_RETURN(std::unique_ptr<BlockFile> file, fs.Create(tmp, /*exclusive=*/false));
    TRY(file->WriteAt(0, std::as_bytes(std::span(xml))));
    return file->Sync();
  }();
  if (written.ok()) written = fs.Rename(tmp, path_);
  if (!written.ok()) {
    fs.Remove(tmp).IgnoreError();
    return std::move(written).WithContext("save " + path_);
  }
  TRY_CTX(fs.SyncDir(folder_.empty() ? "." : folder_), "save " + path_);
  return Status::Ok();
}

Result<std::string> Descriptor::ToXml() const {
  InitLibxml();
  XmlDoc doc;
  if (doc_ != nullptr) {
    doc.reset(xmlCopyDoc(doc_.get(), /*recursive=*/1));
    if (doc == nullptr) return OutOfMemory("copy XML document");
  } else {
    doc.reset(xmlNewDoc(X("1.0")));
    if (doc == nullptr) return OutOfMemory("create XML document");
    ASSIGN_OR_RETURN(xmlNode * root, NewElement(doc.get(), kVirtuozzoRoot));
    xmlDocSetRootElement(doc.get(), root);
  }
  TRY(ApplyTo(doc.get()));
  xmlChar* mem = nullptr;
  int size = 0;
  // No encoding argument: a fresh document gets OpenVZ's plain
  // `<?xml version="1.0"?>`, a loaded one keeps its declared encoding.
  xmlDocDumpFormatMemoryEnc(doc.get(), &mem, &size, nullptr, /*format=*/1);
  if (mem == nullptr) return OutOfMemory("serialise XML document");
  std::string out(reinterpret_cast<const char*>(mem), static_cast<size_t>(size));
  xmlFree(mem);
  return out;
}

Status Descriptor::ApplyTo(_xmlDoc* doc) const {
  xmlNode* root = xmlDocGetRootElement(doc);
  xmlNodeSetName(root, X(kVirtuozzoRoot));

  ASSIGN_OR_RETURN(xmlNode * params, EnsureChild(root, "Disk_Parameters", kRootOrder));
  TRY(SetChildText(params, "Disk_size", std::to_string(disk_size_sectors_), kDiskParamsOrder));
  TRY(SetChildText(params, "Cylinders", std::to_string(cylinders_), kDiskParamsOrder));
  TRY(SetChildText(params, "Heads", std::to_string(heads_), kDiskParamsOrder));
  TRY(SetChildText(params, "Sectors", std::to_string(chs_sectors()), kDiskParamsOrder));
  TRY(EnsureChildText(params, "Padding", "0", kDiskParamsOrder));

  ASSIGN_OR_RETURN(xmlNode * data, EnsureChild(root, "StorageData", kRootOrder));
  ASSIGN_OR_RETURN(xmlNode * storage, EnsureChild(data, "Storage", kStorageDataOrder));
  TRY(EnsureChildText(storage, "Start", "0", kStorageOrder));
  TRY(SetChildText(storage, "End", std::to_string(disk_size_sectors_), kStorageOrder));
  TRY(SetChildText(storage, "Blocksize", std::to_string(cluster_sectors_), kStorageOrder));
  if (preallocated_) {
    TRY(SetChildText(storage, "Preallocated", "1", kStorageOrder));
  } else {
    RemoveChildren(storage, "Preallocated");
  }

  // Existing Image/Shot nodes by the GUID they were loaded with.
  std::map<std::string, std::string> current_by_source;
  for (const auto& [current, source] : source_guid_) current_by_source[source] = current;
  auto claim = [&](xmlNode* parent, const char* name) {
    std::map<std::string, xmlNode*> nodes;  // current GUID -> node
    for (xmlNode* node : Elements(parent, name)) {
      auto it = current_by_source.find(NodeGuid(node));
      if (it == current_by_source.end() || nodes.count(it->second)) {
        FreeNode(node);  // its image was removed
      } else {
        nodes[it->second] = node;
      }
    }
    return nodes;
  };

  std::map<std::string, xmlNode*> image_nodes = claim(storage, "Image");
  for (const DescriptorImage& image : images_) {
    xmlNode* node = image_nodes[image.guid];
    if (node == nullptr) {
      ASSIGN_OR_RETURN(node, NewElement(doc, "Image"));
      InsertOrdered(storage, node, kStorageOrder);
    }
    TRY(SetChildText(node, "GUID", image.guid, kImageOrder));
    TRY(SetChildText(node, "Type", std::string(TypeName(image.kind)), kImageOrder));
    TRY(SetChildText(node, "File", image.file, kImageOrder));
  }

  ASSIGN_OR_RETURN(xmlNode * snapshots, EnsureChild(root, "Snapshots", kRootOrder));
  TRY(SetChildText(snapshots, "TopGUID", top_guid_, kSnapshotsOrder));
  std::map<std::string, xmlNode*> shot_nodes = claim(snapshots, "Shot");
  for (const DescriptorShot& shot : shots_) {
    xmlNode* node = shot_nodes[shot.guid];
    if (node == nullptr) {
      ASSIGN_OR_RETURN(node, NewElement(doc, "Shot"));
      InsertOrdered(snapshots, node, kSnapshotsOrder);
    }
    TRY(SetChildText(node, "GUID", shot.guid, kShotOrder));
    TRY(SetChildText(node, "ParentGUID", shot.parent_guid, kShotOrder));
    if (!shot.temporary) {
      RemoveChildren(node, "Temporary");
    } else if (!HasChild(node, "Temporary")) {
      ASSIGN_OR_RETURN(xmlNode * marker, NewElement(doc, "Temporary"));
      InsertOrdered(node, marker, kShotOrder);
    }
    if (shot.content_digest.empty()) {
      RemoveChildren(node, "ContentDigest");
    } else {
      TRY(SetChildText(node, "ContentDigest", shot.content_digest, kShotOrder));
    }
  }
  return Status::Ok();
}

uint64_t Descriptor::chs_sectors() const {
  uint64_t per_cylinder = uint64_t{cylinders_} * heads_;
  return per_cylinder == 0 ? 0 : disk_size_sectors_ / per_cylinder;
}

// --- Queries ---------------------------------------------------------------

int Descriptor::ImageIndex(const std::string& guid) const {
  for (size_t i = 0; i < images_.size(); ++i) {
    if (images_[i].guid == guid) return static_cast<int>(i);
  }
  return -1;
}

int Descriptor::ShotIndex(const std::string& guid) const {
  for (size_t i = 0; i < shots_.size(); ++i) {
    if (shots_[i].guid == guid) return static_cast<int>(i);
  }
  return -1;
}

const DescriptorImage* Descriptor::FindImage(std::string_view guid) const {
  Result<std::string> g = ParseGuid(guid);
  if (!g) return nullptr;
  int i = ImageIndex(*g);
  return i < 0 ? nullptr : &images_[i];
}

const DescriptorShot* Descriptor::FindShot(std::string_view guid) const {
  Result<std::string> g = ParseGuid(guid);
  if (!g) return nullptr;
  int i = ShotIndex(*g);
  return i < 0 ? nullptr : &shots_[i];
}

std::vector<DescriptorImage> Descriptor::Chain() const {
  Result<std::vector<DescriptorImage>> chain = ChainTo(top_guid_);
  return chain ? std::move(chain).value() : std::vector<DescriptorImage>();
}

Result<std::vector<DescriptorImage>> Descriptor::ChainTo(std::string_view guid) const {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  if (ShotIndex(g) < 0) return Status::NotFound("no image " + g + " in " + path_);
  std::vector<DescriptorImage> chain;
  // The shots form a forest (an invariant), so this ends at a root.
  while (g != kNullGuid) {
    chain.push_back(images_[ImageIndex(g)]);
    g = shots_[ShotIndex(g)].parent_guid;
  }
  std::reverse(chain.begin(), chain.end());
  return chain;
}

std::vector<std::string> Descriptor::Children(std::string_view guid) const {
  std::vector<std::string> out;
  Result<std::string> g = ParseGuid(guid);
  if (!g) return out;
  for (const DescriptorShot& shot : shots_) {
    if (shot.parent_guid == *g) out.push_back(shot.guid);
  }
  return out;
}

bool Descriptor::IsAncestorOrSelf(const std::string& ancestor, const std::string& guid) const {
  for (std::string g = guid; g != kNullGuid; g = shots_[ShotIndex(g)].parent_guid) {
    if (g == ancestor) return true;
  }
  return false;
}

bool Descriptor::operator==(const Descriptor& o) const {
  return path_ == o.path_ && disk_size_sectors_ == o.disk_size_sectors_ &&
         cluster_sectors_ == o.cluster_sectors_ && preallocated_ == o.preallocated_ &&
         cylinders_ == o.cylinders_ && heads_ == o.heads_ &&
         max_delta_size_sectors_ == o.max_delta_size_sectors_ &&
         encryption_key_id_ == o.encryption_key_id_ && images_ == o.images_ && shots_ == o.shots_ &&
         top_guid_ == o.top_guid_;
}

// --- Mutations -------------------------------------------------------------

std::string Descriptor::ResolvePath(const std::string& file) const {
  return JoinPath(folder_, file);
}

Status Descriptor::CheckNewFile(const std::string& file) const {
  if (auto why = BadFileName(file)) return Status::InvalidArgument(*why);
  if (LeavesFolder(file)) {
    return Status::InvalidArgument("file " + Quote(file) +
                                   " must be relative to the descriptor's folder, without '..'");
  }
  return Status::Ok();
}

Status Descriptor::AddImage(std::string_view guid, ImageKind kind, const std::string& file,
                            std::string_view parent_guid, bool temporary) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  ASSIGN_OR_RETURN(std::string parent, ParseGuid(parent_guid));
  if (g == kNullGuid) return Status::InvalidArgument("an image cannot have the null GUID");
  if (kind == ImageKind::kPreallocated) {
    return Status::InvalidArgument("image kind must be expanded or raw");
  }
  if (kind == ImageKind::kRaw && preallocated_) {
    return Status::InvalidArgument("a raw image cannot be on a preallocated disk");
  }
  TRY(CheckNewFile(file));
  if (ImageIndex(g) >= 0) return Status::AlreadyExists("image " + g + " already exists");
  if (parent != kNullGuid && ShotIndex(parent) < 0) {
    return Status::NotFound("parent " + parent + " does not exist");
  }
  images_.push_back(DescriptorImage{g, kind, file, ResolvePath(file)});
  shots_.push_back(DescriptorShot{g, parent, temporary, ""});
  return Status::Ok();
}

Status Descriptor::RemoveImage(std::string_view guid) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  int i = ImageIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  if (g == top_guid_) return Status::FailedPrecondition("cannot remove the top image " + g);
  if (!Children(g).empty()) {
    return Status::FailedPrecondition("image " + g + " still has children");
  }
  images_.erase(images_.begin() + i);
  shots_.erase(shots_.begin() + ShotIndex(g));
  source_guid_.erase(g);
  return Status::Ok();
}

Status Descriptor::RenameGuid(std::string_view old_guid, std::string_view new_guid) {
  ASSIGN_OR_RETURN(std::string from, ParseGuid(old_guid));
  ASSIGN_OR_RETURN(std::string to, ParseGuid(new_guid));
  int i = ImageIndex(from);
  if (i < 0) return Status::NotFound("no image " + from);
  if (to == kNullGuid) return Status::InvalidArgument("an image cannot have the null GUID");
  if (from == to) return Status::Ok();
  if (ImageIndex(to) >= 0) return Status::AlreadyExists("image " + to + " already exists");
  images_[i].guid = to;
  shots_[ShotIndex(from)].guid = to;
  shots_[ShotIndex(to)].content_digest.clear();
  for (DescriptorShot& shot : shots_) {
    if (shot.parent_guid == from) shot.parent_guid = to;
  }
  if (top_guid_ == from) top_guid_ = to;
  auto source = source_guid_.find(from);
  if (source != source_guid_.end()) {
    std::string original = source->second;
    source_guid_.erase(source);
    source_guid_[to] = original;
  }
  return Status::Ok();
}

Status Descriptor::SetParent(std::string_view guid, std::string_view parent_guid) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  ASSIGN_OR_RETURN(std::string parent, ParseGuid(parent_guid));
  int i = ShotIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  if (parent != kNullGuid) {
    if (ShotIndex(parent) < 0) return Status::NotFound("parent " + parent + " does not exist");
    if (IsAncestorOrSelf(g, parent)) {
      return Status::InvalidArgument("making " + parent + " the parent of " + g +
                                     " would create a cycle");
    }
  }
  shots_[i].parent_guid = parent;
  return Status::Ok();
}

Status Descriptor::SetTop(std::string_view guid) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  int i = ShotIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  if (shots_[i].temporary) {
    return Status::FailedPrecondition("a temporary snapshot cannot be the top: " + g);
  }
  top_guid_ = g;
  return Status::Ok();
}

Status Descriptor::SetTemporary(std::string_view guid, bool temporary) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  int i = ShotIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  if (temporary && g == top_guid_) {
    return Status::FailedPrecondition("the top image cannot be temporary: " + g);
  }
  shots_[i].temporary = temporary;
  return Status::Ok();
}

Status Descriptor::SetContentDigest(std::string_view guid, const std::string& digest) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  int i = ShotIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  if (!digest.empty() && !IsContentDigest(digest)) {
    return Status::InvalidArgument("malformed content digest '" + digest.substr(0, 80) + "'");
  }
  if (!digest.empty() && g == top_guid_) {
    return Status::InvalidArgument("the top image changes with every write; it has no digest");
  }
  shots_[i].content_digest = digest;
  return Status::Ok();
}

Status Descriptor::SetFile(std::string_view guid, const std::string& file,
                           std::optional<ImageKind> kind) {
  ASSIGN_OR_RETURN(std::string g, ParseGuid(guid));
  int i = ImageIndex(g);
  if (i < 0) return Status::NotFound("no image " + g);
  // A file another image already names passed Load() (perhaps with
  // allow_outside_files): a merge moves the parent's file to the child,
  // and must not fail on it after the data is copied.
  bool named = false;
  for (const DescriptorImage& image : images_) named |= image.file == file;
  if (!named) TRY(CheckNewFile(file));
  if (kind) {
    if (*kind == ImageKind::kPreallocated) {
      return Status::InvalidArgument("an image is expanded or raw; preallocation is per disk");
    }
    if (*kind == ImageKind::kRaw && preallocated_) {
      return Status::InvalidArgument("a preallocated disk has no raw images");
    }
    images_[i].kind = *kind;
  }
  images_[i].file = file;
  images_[i].path = ResolvePath(file);
  return Status::Ok();
}

Status Descriptor::SetDiskSize(uint64_t size_bytes, uint32_t cylinders, uint32_t heads) {
  if (size_bytes == 0 || size_bytes % kSectorBytes != 0) {
    return Status::InvalidArgument("disk size " + std::to_string(size_bytes) +
                                   " is not a positive multiple of 512 bytes");
  }
  disk_size_sectors_ = size_bytes / kSectorBytes;
  cylinders_ = cylinders;
  heads_ = heads;
  return Status::Ok();
}

}  // namespace ploop
