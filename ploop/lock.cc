#include "ploop/lock.h"

namespace ploop {

LockRequest WriterLockRequest() {
  return LockRequest{{100, 101, 102, 103, 104, 200, 201, 202, 203, 204},
                     {100, 101, 103, 200, 201, 202, 203, 204}};
}

LockRequest ReaderLockRequest() { return LockRequest{{101, 103, 200}, {100, 201, 203}}; }

Status LockImage(BlockFile& file, bool writable) {
  Status s = file.Lock(writable ? WriterLockRequest() : ReaderLockRequest());
  if (s.code() == StatusCode::kBusy) {
    return Status::Busy(file.path() + " is in use by another program (it holds the image lock" +
                        std::string(writable ? "" : " for writing") + ")");
  }
  return s;
}

}  // namespace ploop
