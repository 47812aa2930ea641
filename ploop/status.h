// Status and Result<T>: errors as values for every ploop library.
//
// A Status is a code from a small set plus a message that accumulates context
// on the way up ("merge: delta 3: read BAT: Input/output error"). Result<T>
// holds either a T or a non-OK Status, in the spirit of C++23
// std::expected. No library function throws; callback boundaries (FUSE, NBD,
// libext2fs) convert with ToErrno().
//
// Thread-safety: values; safe to copy and move between threads.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace ploop {

enum class StatusCode {
  kOk = 0,
  // A named file, image, snapshot or key does not exist.
  kNotFound,
  // Creating something that is already there (an image file, a GUID).
  kAlreadyExists,
  // The caller passed a value that can never work: a bad size, a range past
  // the end of the disk, an unknown option. Retrying the same call fails.
  kInvalidArgument,
  // On-disk data breaks the format's rules: bad signature, a BAT entry past
  // EOF, a truncated file. The image needs `check --repair` or is lost.
  kCorruption,
  // A well-formed thing we do not handle (a feature flag, v1 write-back).
  kNotSupported,
  // The operating system failed an I/O call; errno() says which.
  kIOError,
  // The host file system is full (ENOSPC, EDQUOT).
  kNoSpace,
  // Someone else holds the image (a lock, a running device).
  kBusy,
  // The object is in the wrong state for the call: writing to a read-only
  // image, resizing to a smaller size, an image that must be repaired first.
  kFailedPrecondition,
};

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK

  static Status Ok() { return Status(); }
  static Status NotFound(std::string msg) { return Status(StatusCode::kNotFound, std::move(msg)); }
  static Status AlreadyExists(std::string msg) {
    return Status(StatusCode::kAlreadyExists, std::move(msg));
  }
  static Status InvalidArgument(std::string msg) {
    return Status(StatusCode::kInvalidArgument, std::move(msg));
  }
  static Status Corruption(std::string msg) {
    return Status(StatusCode::kCorruption, std::move(msg));
  }
  static Status NotSupported(std::string msg) {
    return Status(StatusCode::kNotSupported, std::move(msg));
  }
  static Status NoSpace(std::string msg) { return Status(StatusCode::kNoSpace, std::move(msg)); }
  static Status Busy(std::string msg) { return Status(StatusCode::kBusy, std::move(msg)); }
  static Status FailedPrecondition(std::string msg) {
    return Status(StatusCode::kFailedPrecondition, std::move(msg));
  }
  // Maps an errno to the matching code (ENOENT -> kNotFound, ENOSPC ->
  // kNoSpace, EEXIST -> kAlreadyExists, ...) and appends strerror(err) to
  // `context`.
  static Status FromErrno(int err, std::string_view context);

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  // The errno behind an I/O error, or 0 when none is known.
  int error_number() const { return errno_; }
  const std::string& message() const { return message_; }

  // Returns this status with "context: " put in front of the message. OK
  // stays OK.
  Status WithContext(std::string_view context) const&;
  Status WithContext(std::string_view context) &&;

  // "Corruption: read BAT: ..." for logs; the CLI prints message() alone.
  std::string ToString() const;

  // A negative errno for FUSE/NBD style boundaries.
  int ToErrno() const;

  // Marks a status as deliberately ignored (best-effort cleanup paths).
  void IgnoreError() const {}

 private:
  Status(StatusCode code, std::string msg, int err = 0)
      : code_(code), errno_(err), message_(std::move(msg)) {}

  StatusCode code_ = StatusCode::kOk;
  int errno_ = 0;
  std::string message_;
};

std::string_view StatusCodeName(StatusCode code);

// Result<T>: a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: must not be OK

  bool has_value() const { return v_.index() == 0; }
  bool ok() const { return has_value(); }
  explicit operator bool() const { return has_value(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  // The error; Status::Ok() when a value is held.
  Status error() const& { return has_value() ? Status::Ok() : std::get<1>(v_); }
  Status error() && { return has_value() ? Status::Ok() : std::get<1>(std::move(v_)); }
  Status status() const& { return error(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace ploop

#define PLOOP_CONCAT_INNER_(a, b) a##b
#define PLOOP_CONCAT_(a, b) PLOOP_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define TRY(expr)                                          \
  do {                                                     \
    ::ploop::Status ploop_try_status_ = (expr);            \
    if (!ploop_try_status_.ok()) return ploop_try_status_; \
  } while (0)

// As TRY, adding "context: " in front of the error's message.
#define TRY_CTX(expr, context)                                                             \
  do {                                                                                     \
    ::ploop::Status ploop_try_status_ = (expr);                                            \
    if (!ploop_try_status_.ok()) return std::move(ploop_try_status_).WithContext(context); \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr, ctx_expr)        \
  auto tmp = (expr);                                            \
  if (!tmp.has_value()) return std::move(tmp).error() ctx_expr; \
  lhs = std::move(tmp).value()

// `ASSIGN_OR_RETURN(auto x, f())`: binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(PLOOP_CONCAT_(ploop_result_, __LINE__), lhs, expr, )

// As ASSIGN_OR_RETURN, adding context to the error.
#define ASSIGN_OR_RETURN_CTX(lhs, expr, context) \
  ASSIGN_OR_RETURN_IMPL_(PLOOP_CONCAT_(ploop_result_, __LINE__), lhs, expr, .WithContext(context))
