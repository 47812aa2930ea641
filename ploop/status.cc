#include "ploop/status.h"

#include <cstring>

namespace ploop {

Status Status::FromErrno(int err, std::string_view context) {
  StatusCode code;
  switch (err) {
    case ENOENT:
      code = StatusCode::kNotFound;
      break;
    case EEXIST:
      code = StatusCode::kAlreadyExists;
      break;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      code = StatusCode::kNoSpace;
      break;
    case EAGAIN:
    case EBUSY:
    case ETXTBSY:
      code = StatusCode::kBusy;
      break;
    case EINVAL:
      code = StatusCode::kInvalidArgument;
      break;
    case EOPNOTSUPP:
      code = StatusCode::kNotSupported;
      break;
    case EROFS:
    case EACCES:
    case EPERM:
      code = StatusCode::kFailedPrecondition;
      break;
    default:
      code = StatusCode::kIOError;
      break;
  }
  std::string msg(context);
  if (!msg.empty()) msg += ": ";
  msg += std::strerror(err);
  return Status(code, std::move(msg), err);
}

Status Status::WithContext(std::string_view context) const& {
  Status copy = *this;
  return std::move(copy).WithContext(context);
}

Status Status::WithContext(std::string_view context) && {
  if (ok() || context.empty()) return std::move(*this);
  std::string msg(context);
  msg += ": ";
  msg += message_;
  message_ = std::move(msg);
  return std::move(*this);
}

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kNotFound:
      return "NotFound";
    case StatusCode::kAlreadyExists:
      return "AlreadyExists";
    case StatusCode::kInvalidArgument:
      return "InvalidArgument";
    case StatusCode::kCorruption:
      return "Corruption";
    case StatusCode::kNotSupported:
      return "NotSupported";
    case StatusCode::kIOError:
      return "IOError";
    case StatusCode::kNoSpace:
      return "NoSpace";
    case StatusCode::kBusy:
      return "Busy";
    case StatusCode::kFailedPrecondition:
      return "FailedPrecondition";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(StatusCodeName(code_));
  s += ": ";
  s += message_;
  return s;
}

int Status::ToErrno() const {
  if (errno_ != 0) return -errno_;
  switch (code_) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kNotFound:
      return -ENOENT;
    case StatusCode::kAlreadyExists:
      return -EEXIST;
    case StatusCode::kInvalidArgument:
      return -EINVAL;
    case StatusCode::kCorruption:
      return -EUCLEAN;
    case StatusCode::kNotSupported:
      return -EOPNOTSUPP;
    case StatusCode::kIOError:
      return -EIO;
    case StatusCode::kNoSpace:
      return -ENOSPC;
    case StatusCode::kBusy:
      return -EBUSY;
    case StatusCode::kFailedPrecondition:
      return -EPERM;
  }
  return -EIO;
}

}  // namespace ploop
