// The FUSE-over-io_uring kernel interface (FUSE protocol 7.42, Linux 6.14+),
// which Debian 12's <linux/fuse.h> (Linux 6.1) does not have. Mirrors
// include/uapi/linux/fuse.h of Linux 6.14..6.18: struct fuse_uring_ent_in_out,
// struct fuse_uring_req_header, enum fuse_uring_cmd, struct
// fuse_uring_cmd_req and the INIT flag FUSE_OVER_IO_URING. The kernel side is
// fs/fuse/dev_uring.c; Documentation/filesystems/fuse-io-uring.rst describes
// the protocol.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ploop::mount::fuse_uring {

// FUSE_OVER_IO_URING (1ULL << 41): a bit of the INIT flags' upper half,
// i.e. of fuse_init_in/fuse_init_out.flags2 (valid with FUSE_INIT_EXT).
constexpr uint32_t kInitFlags2OverIoUring = 1u << (41 - 32);

constexpr size_t kInOutHeaderBytes = 128;  // FUSE_URING_IN_OUT_HEADER_SZ
constexpr size_t kOpInOutBytes = 128;      // FUSE_URING_OP_IN_OUT_SZ

// struct fuse_uring_ent_in_out.
struct EntInOut {
  uint64_t flags;
  uint64_t commit_id;   // the request's unique, echoed in CmdReq::commit_id
  uint32_t payload_sz;  // bytes valid in the payload buffer, either way
  uint32_t padding;
  uint64_t reserved;
};
static_assert(sizeof(EntInOut) == 32);

// struct fuse_uring_req_header: an entry's header buffer (iov[0] of the
// REGISTER command). The kernel writes the fuse_in_header to in_out and the
// request's first argument (the per-opcode struct) to op_in; the server
// writes its fuse_out_header to in_out.
struct ReqHeader {
  char in_out[kInOutHeaderBytes];
  char op_in[kOpInOutBytes];
  EntInOut ring_ent_in_out;
};
static_assert(sizeof(ReqHeader) == 288);
static_assert(offsetof(ReqHeader, ring_ent_in_out) == 256);

// enum fuse_uring_cmd: io_uring_sqe.cmd_op of an IORING_OP_URING_CMD on
// /dev/fuse.
constexpr uint32_t kCmdRegister = 1;        // FUSE_IO_URING_CMD_REGISTER
constexpr uint32_t kCmdCommitAndFetch = 2;  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

// struct fuse_uring_cmd_req: in the command area of a 128-byte SQE.
struct CmdReq {
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};
static_assert(sizeof(CmdReq) == 24);

}  // namespace ploop::mount::fuse_uring
