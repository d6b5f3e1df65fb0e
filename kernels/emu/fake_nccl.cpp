// A fake NCCL (libnccl.so) for the emulated device (fake_cuda.cpp), written from NCCL's
// documented semantics, so that rcx's data-parallel code runs its ranks as processes on a
// machine without GPUs (tests only). Device memory is host memory and every stream is
// synchronous, so a collective runs to completion inside its call.
//
// Ranks meet in a POSIX shared-memory segment named by the unique id (with a random nonce):
//   [Header][Slot x nranks][data area: SLOT_BYTES x nranks]
// A slot is one rank's: its pid, its state, its barrier phase and its last two collective
// calls. A collective is: every rank announces its call (a barrier); every rank compares all
// the calls, so the i-th call of every rank must agree on the operation, count, type,
// reduction and root, or every rank fails with ncclInvalidUsage naming both calls; then the
// data moves in chunks of SLOT_BYTES: each rank copies its chunk into its data slot (a
// barrier), each computes its output from all the slots in rank order (a barrier). Sums run
// in rank order in float (f16, bf16, f32) or the type itself, so every rank gets the same
// bits.
//
// Waiting sleeps on a futex in the segment (woken whenever a rank arrives) with 50 ms
// timeouts; after a quiet timeout the peers' pids are checked. A peer that exited or was
// killed (pid gone or a zombie), left (ncclCommDestroy/ncclCommAbort) or failed ends the
// wait with ncclRemoteError, and a wait longer than RCX_NCCL_EMU_TIMEOUT_S seconds (default
// 60) with ncclSystemError; ncclCommGetAsyncError then reports the error and
// ncclGetLastError says why. The last rank to leave unlinks the segment.
//
// ncclGroupStart/ncclGroupEnd are no-ops: every call completes on its own, so grouping
// changes nothing for one communicator per process (several communicators driven from one
// thread inside a group would block, which rcx never does).
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>

extern "C" size_t rcx_emu_extent(const void* p);  // emu.cpp
extern "C" int cuCtxGetDevice(int* device);        // fake_cuda.cpp
extern "C" void rcx_emu_trace(const char* line);    // fake_cuda.cpp

// The enums and structs of NCCL 2.30's nccl.h that cudarc's `nccl` feature binds.
typedef int ncclResult_t;
enum : ncclResult_t {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
enum DataType : int {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
};
enum RedOp : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };

struct ncclUniqueId {
    char internal[128];
};
// The fields every version of ncclConfig_t starts with; only `blocking` is read.
struct ConfigHead {
    size_t size;
    unsigned magic;
    unsigned version;
    int blocking;
};
constexpr unsigned CONFIG_MAGIC = 0xcafebeef;
constexpr int CONFIG_UNDEF_INT = INT_MIN;
constexpr int VERSION = 23000;  // NCCL_VERSION(2, 30, 0): the ABI cudarc binds

namespace {

constexpr char ID_MAGIC[8] = {'r', 'c', 'x', 'n', 'c', 'c', 'l', '1'};
constexpr uint32_t SEGMENT_READY = 0x52435831;
constexpr size_t SLOT_BYTES = (size_t)1 << 20;  // one rank's chunk of a collective
constexpr int MAX_RANKS = 1024;
constexpr size_t TEXT = 240;

enum Kind : uint32_t { ALL_REDUCE = 1, REDUCE_SCATTER, ALL_GATHER, BROADCAST, REDUCE };
enum State : uint32_t { ABSENT = 0, CLAIMED, JOINED, LEFT, FAILED };

// One collective call as a rank announced it.
struct Call {
    uint64_t seq;  // 1 for the communicator's first collective
    uint32_t kind;
    int32_t dtype;
    uint64_t count;
    int32_t op;
    int32_t root;
    uint32_t invalid;  // the call's own arguments are wrong: `text` says why
    char text[TEXT];   // the call as written, e.g. "ncclAllReduce(count 10, float32, sum)"
};

struct alignas(64) Slot {
    std::atomic<int32_t> pid;
    std::atomic<uint32_t> state;
    std::atomic<uint64_t> phase;  // barriers passed
    Call calls[2];                // by seq parity: a peer may read the previous one
    char reason[TEXT];            // why it failed (state FAILED)
};

struct alignas(64) Header {
    std::atomic<uint32_t> ready;
    int32_t nranks;
    std::atomic<uint32_t> bell;  // the futex word: bumped by every arrival
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free");

size_t data_offset(int nranks) {
    const size_t meta = sizeof(Header) + (size_t)nranks * sizeof(Slot);
    const size_t page = 4096;
    return (meta + page - 1) / page * page;
}
size_t segment_bytes(int nranks) { return data_offset(nranks) + (size_t)nranks * SLOT_BYTES; }

std::mutex global_lock;
char global_error[1024];  // for calls without a communicator

double now_s() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t seen, double seconds) {
    timespec t;
    t.tv_sec = (time_t)seconds;
    t.tv_nsec = (long)((seconds - (double)t.tv_sec) * 1e9);
    syscall(SYS_futex, (uint32_t*)word, FUTEX_WAIT, seen, &t, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
    syscall(SYS_futex, (uint32_t*)word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Whether process `pid` still runs: gone, or a zombie nobody has reaped yet, is dead.
bool alive(int32_t pid) {
    if (pid <= 0) return true;  // not recorded yet
    if (kill(pid, 0) == -1 && errno == ESRCH) return false;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE* f = fopen(path, "r");
    if (!f) return true;
    char text[512];
    const size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    const char* close = strrchr(text, ')');  // the command name may hold spaces
    return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}

const char* type_name(int dtype) {
    switch (dtype) {
        case ncclInt8: return "int8";
        case ncclUint8: return "uint8";
        case ncclInt32: return "int32";
        case ncclUint32: return "uint32";
        case ncclInt64: return "int64";
        case ncclUint64: return "uint64";
        case ncclFloat16: return "float16";
        case ncclFloat32: return "float32";
        case ncclFloat64: return "float64";
        case ncclBfloat16: return "bfloat16";
        case ncclFloat8e4m3: return "float8e4m3";
        case ncclFloat8e5m2: return "float8e5m2";
        default: return nullptr;
    }
}

size_t type_size(int dtype) {
    switch (dtype) {
        case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}

const char* op_name(int op) {
    switch (op) {
        case ncclSum: return "sum";
        case ncclProd: return "prod";
        case ncclMax: return "max";
        case ncclMin: return "min";
        case ncclAvg: return "avg";
        default: return nullptr;
    }
}

const char* kind_name(uint32_t kind) {
    switch (kind) {
        case ALL_REDUCE: return "ncclAllReduce";
        case REDUCE_SCATTER: return "ncclReduceScatter";
        case ALL_GATHER: return "ncclAllGather";
        case BROADCAST: return "ncclBroadcast";
        case REDUCE: return "ncclReduce";
        default: return "?";
    }
}

bool reduces(uint32_t kind) { return kind == ALL_REDUCE || kind == REDUCE_SCATTER || kind == REDUCE; }
bool rooted(uint32_t kind) { return kind == BROADCAST || kind == REDUCE; }

// f16 and bf16 to and from float, rounding to nearest even.
float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0) {
        const float magnitude = std::ldexp((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    const uint32_t bits = exponent == 31 ? sign | 0x7f800000 | (mantissa << 13)
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t magnitude = x & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;    // NaN
    if (magnitude >= 0x477ff000) return sign | 0x7c00;   // rounds past 65504: infinity
    if (magnitude < 0x38800000) {                        // below 2^-14: subnormal or zero
        float a;
        memcpy(&a, &magnitude, 4);
        return sign | (uint16_t)std::nearbyint(a * 16777216.0f);  // units of 2^-24, exact scaling
    }
    uint32_t h = ((magnitude >> 23) - 112) << 10 | ((magnitude >> 13) & 0x3ff);
    const uint32_t rest = magnitude & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  // a carry moves into the exponent
    return sign | (uint16_t)h;
}

float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// An element type: how to load it into its accumulator type and store it back.
template <typename T>
struct Plain {
    using Acc = T;
    static Acc load(const void* p, size_t i) { return ((const T*)p)[i]; }
    static void store(void* p, size_t i, Acc v) { ((T*)p)[i] = v; }
};
struct Half {
    using Acc = float;
    static Acc load(const void* p, size_t i) { return half_to_float(((const uint16_t*)p)[i]); }
    static void store(void* p, size_t i, Acc v) { ((uint16_t*)p)[i] = float_to_half(v); }
};
struct Bf16 {
    using Acc = float;
    static Acc load(const void* p, size_t i) { return bf16_to_float(((const uint16_t*)p)[i]); }
    static void store(void* p, size_t i, Acc v) { ((uint16_t*)p)[i] = float_to_bf16(v); }
};

// Integer sums and products wrap, as on the device.
template <typename A>
A add(A a, A b) {
    if constexpr (std::is_integral_v<A>) {
        using U = std::make_unsigned_t<A>;
        return (A)((U)a + (U)b);
    } else {
        return a + b;
    }
}
template <typename A>
A mul(A a, A b) {
    if constexpr (std::is_integral_v<A>) {
        using U = std::make_unsigned_t<A>;
        return (A)((U)a * (U)b);
    } else {
        return a * b;
    }
}

// dst[i] = op over ranks r = 0, 1, ... of srcs[r][i] (ncclAvg: the sum over nranks).
template <typename E>
void reduce_elements(int op, int nranks, const uint8_t* const* srcs, void* dst, size_t n) {
    using A = typename E::Acc;
    for (size_t i = 0; i < n; i++) {
        A acc = E::load(srcs[0], i);
        for (int r = 1; r < nranks; r++) {
            const A x = E::load(srcs[r], i);
            switch (op) {
                case ncclSum: case ncclAvg: acc = add(acc, x); break;
                case ncclProd: acc = mul(acc, x); break;
                case ncclMax: acc = x > acc ? x : acc; break;
                default: acc = x < acc ? x : acc; break;
            }
        }
        if (op == ncclAvg) acc = (A)(acc / (A)nranks);
        E::store(dst, i, acc);
    }
}

void reduce(int dtype, int op, int nranks, const uint8_t* const* srcs, void* dst, size_t n) {
    switch (dtype) {
        case ncclInt8: reduce_elements<Plain<int8_t>>(op, nranks, srcs, dst, n); break;
        case ncclUint8: reduce_elements<Plain<uint8_t>>(op, nranks, srcs, dst, n); break;
        case ncclInt32: reduce_elements<Plain<int32_t>>(op, nranks, srcs, dst, n); break;
        case ncclUint32: reduce_elements<Plain<uint32_t>>(op, nranks, srcs, dst, n); break;
        case ncclInt64: reduce_elements<Plain<int64_t>>(op, nranks, srcs, dst, n); break;
        case ncclUint64: reduce_elements<Plain<uint64_t>>(op, nranks, srcs, dst, n); break;
        case ncclFloat16: reduce_elements<Half>(op, nranks, srcs, dst, n); break;
        case ncclFloat32: reduce_elements<Plain<float>>(op, nranks, srcs, dst, n); break;
        case ncclFloat64: reduce_elements<Plain<double>>(op, nranks, srcs, dst, n); break;
        case ncclBfloat16: reduce_elements<Bf16>(op, nranks, srcs, dst, n); break;
    }
}

}  // namespace

struct ncclComm {
    std::string segment;  // the shared-memory name
    int nranks = 0, rank = 0, device = 0;
    double timeout_s = 60;
    Header* header = nullptr;
    size_t bytes = 0;
    uint64_t seq = 0;    // collectives called
    uint64_t phase = 0;  // barriers passed
    std::atomic<ncclResult_t> state{ncclInProgress};  // what ncclCommGetAsyncError reports
    std::atomic<bool> aborting{false};
    std::thread init;  // a non-blocking init's join
    std::mutex error_lock;
    char last_error[1024] = {0};

    Slot* slot(int r) const { return (Slot*)((uint8_t*)header + sizeof(Header)) + r; }
    uint8_t* data(int r) const { return (uint8_t*)header + data_offset(nranks) + (size_t)r * SLOT_BYTES; }
};

namespace {

ncclResult_t global_fail(ncclResult_t code, const std::string& why) {
    std::lock_guard<std::mutex> guard(global_lock);
    snprintf(global_error, sizeof global_error, "%s", why.c_str());
    return code;
}

// Records the error as the communicator's last and, for a failure of the communicator
// itself (not of one call's arguments), as its asynchronous error and in its slot, so that
// the peers waiting on this rank learn why it stopped.
ncclResult_t fail(ncclComm* comm, ncclResult_t code, const std::string& why, bool breaks = true) {
    const std::string text = "fake NCCL rank " + std::to_string(comm->rank) + " of " +
                             std::to_string(comm->nranks) + ": " + why;
    {
        std::lock_guard<std::mutex> guard(comm->error_lock);
        snprintf(comm->last_error, sizeof comm->last_error, "%s", text.c_str());
    }
    global_fail(code, text);
    if (breaks) {
        comm->state.store(code);
        if (comm->header) {
            Slot* mine = comm->slot(comm->rank);
            if (mine->state.load() == JOINED) {
                snprintf(mine->reason, TEXT, "%s", why.c_str());
                mine->state.store(FAILED, std::memory_order_release);
                comm->header->bell.fetch_add(1, std::memory_order_release);
                futex_wake_all(&comm->header->bell);
            }
        }
    }
    return code;
}

// Waits until every rank satisfies `ready`; fails on a peer that is gone, failed or left
// before it was ready, on the timeout or on ncclCommAbort from another thread.
template <typename Ready>
ncclResult_t wait_all(ncclComm* comm, const std::string& during, Ready ready) {
    const double deadline = now_s() + comm->timeout_s;
    bool quiet = false;  // the last sleep timed out: check the peers' processes
    for (;;) {
        const uint32_t bell = comm->header->bell.load(std::memory_order_acquire);
        std::string missing;
        for (int r = 0; r < comm->nranks; r++) {
            Slot* s = comm->slot(r);
            if (ready(s)) continue;
            missing += (missing.empty() ? "" : ", ") + std::to_string(r);
            const uint32_t state = s->state.load(std::memory_order_acquire);
            const std::string who = "rank " + std::to_string(r);
            if (state == FAILED)
                return fail(comm, ncclRemoteError, who + " failed (" + std::string(s->reason) + ") " + during);
            if (state == LEFT)
                return fail(comm, ncclRemoteError,
                            who + " left the communicator (ncclCommDestroy or ncclCommAbort) " + during);
            if (quiet && state == JOINED && !alive(s->pid.load()))
                return fail(comm, ncclRemoteError,
                            who + " (pid " + std::to_string(s->pid.load()) + ") exited or was killed " + during);
        }
        if (missing.empty()) return ncclSuccess;
        if (comm->aborting.load()) return fail(comm, ncclInvalidUsage, "ncclCommAbort was called " + during);
        const double left = deadline - now_s();
        if (left <= 0) {
            char limit[32];
            snprintf(limit, sizeof limit, "%g", comm->timeout_s);
            return fail(comm, ncclSystemError,
                        "timed out after " + std::string(limit) + " s (RCX_NCCL_EMU_TIMEOUT_S) waiting for rank(s) " +
                            missing + " " + during);
        }
        const uint32_t before = comm->header->bell.load(std::memory_order_acquire);
        if (before != bell) {
            quiet = false;
            continue;
        }
        futex_wait(&comm->header->bell, bell, left < 0.05 ? left : 0.05);
        quiet = comm->header->bell.load(std::memory_order_acquire) == bell;
    }
}

// This rank's next barrier: arrive, then wait for every rank to arrive.
ncclResult_t barrier(ncclComm* comm, const std::string& during) {
    const uint64_t phase = ++comm->phase;
    comm->slot(comm->rank)->phase.store(phase, std::memory_order_release);
    comm->header->bell.fetch_add(1, std::memory_order_release);
    futex_wake_all(&comm->header->bell);
    return wait_all(comm, during, [phase](Slot* s) { return s->phase.load(std::memory_order_acquire) >= phase; });
}

// Attaches to the segment (creating it when first), claims this rank's slot and waits for
// every rank to join.
ncclResult_t join(ncclComm* comm) {
    const double deadline = now_s() + comm->timeout_s;
    const std::string during = "while the communicator was being created";
    int fd = shm_open(comm->segment.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    const bool creator = fd >= 0;
    if (!creator && errno == EEXIST) fd = shm_open(comm->segment.c_str(), O_RDWR, 0600);
    if (fd < 0) return fail(comm, ncclSystemError, "shm_open " + comm->segment + ": " + strerror(errno));
    const size_t bytes = segment_bytes(comm->nranks);
    if (creator && ftruncate(fd, (off_t)bytes) != 0) {
        const std::string why = strerror(errno);
        close(fd);
        shm_unlink(comm->segment.c_str());
        return fail(comm, ncclSystemError, "cannot size " + comm->segment + ": " + why);
    }
    // A joiner waits for the creator to size and mark the segment.
    struct stat st = {};
    while (!creator && (fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(Header))) {
        if (now_s() > deadline || comm->aborting.load()) {
            close(fd);
            return fail(comm, ncclSystemError, comm->segment + " was never sized by its creator");
        }
        usleep(1000);
    }
    const size_t mapped = creator ? bytes : (size_t)st.st_size;
    void* at = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (at == MAP_FAILED) return fail(comm, ncclSystemError, "mmap " + comm->segment + ": " + strerror(errno));
    Header* header = (Header*)at;
    if (creator) {
        header->nranks = comm->nranks;
        header->ready.store(SEGMENT_READY, std::memory_order_release);
    }
    while (header->ready.load(std::memory_order_acquire) != SEGMENT_READY) {
        if (now_s() > deadline || comm->aborting.load()) {
            munmap(at, mapped);
            return fail(comm, ncclSystemError, comm->segment + " was never initialised by its creator");
        }
        usleep(1000);
    }
    if (header->nranks != comm->nranks || mapped != bytes) {
        const int theirs = header->nranks;
        munmap(at, mapped);
        return fail(comm, ncclInvalidUsage,
                    "ncclCommInitRank was given " + std::to_string(comm->nranks) +
                        " ranks, but the communicator was created by a rank given " + std::to_string(theirs));
    }
    comm->header = header;
    comm->bytes = bytes;
    Slot* mine = comm->slot(comm->rank);
    uint32_t absent = ABSENT;
    if (!mine->state.compare_exchange_strong(absent, CLAIMED)) {
        const std::string holder = std::to_string(mine->pid.load());
        comm->header = nullptr;  // the slot is another process's: leave it alone
        munmap(at, mapped);
        return fail(comm, ncclInvalidUsage,
                    "rank " + std::to_string(comm->rank) + " joined twice (pid " + holder + " holds it)");
    }
    mine->pid.store((int32_t)getpid());
    mine->state.store(JOINED, std::memory_order_release);
    header->bell.fetch_add(1, std::memory_order_release);
    futex_wake_all(&header->bell);
    // A peer that joined and already left or failed has arrived: its collectives say so.
    return wait_all(comm, during, [](Slot* s) { return s->state.load(std::memory_order_acquire) >= JOINED; });
}

// The call as text, for messages.
std::string describe(const Call& c) {
    std::string s = std::string(kind_name(c.kind)) + "(count " + std::to_string(c.count) + ", ";
    const char* type = type_name(c.dtype);
    s += type ? type : "type " + std::to_string(c.dtype);
    if (reduces(c.kind)) {
        const char* op = op_name(c.op);
        s += ", ";
        s += op ? op : "op " + std::to_string(c.op);
    }
    if (rooted(c.kind)) s += ", root " + std::to_string(c.root);
    return s + ")";
}

bool same_call(const Call& a, const Call& b) {
    return a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && (!reduces(a.kind) || a.op == b.op) &&
           (!rooted(a.kind) || a.root == b.root);
}

// Whether [p, p + bytes) lies in one emulated device allocation.
bool in_device_memory(const void* p, size_t bytes) { return bytes == 0 || rcx_emu_extent(p) >= bytes; }

ncclResult_t collective(ncclComm* comm, uint32_t kind, const void* send, void* recv, size_t count, int dtype,
                        int op, int root, const void* stream) {
    if (!comm) return global_fail(ncclInvalidArgument, std::string(kind_name(kind)) + ": the communicator is NULL");
    const ncclResult_t state = comm->state.load();
    if (state == ncclInProgress)
        return fail(comm, ncclInvalidUsage,
                    std::string(kind_name(kind)) + " before the communicator was ready (poll ncclCommGetAsyncError)",
                    false);
    if (state != ncclSuccess) return state;  // ncclGetLastError keeps the first failure's reason

    const int nranks = comm->nranks, rank = comm->rank;
    const uint64_t seq = ++comm->seq;
    Call& call = comm->slot(rank)->calls[seq & 1];
    call = Call{seq, kind, dtype, (uint64_t)count, op, root, 0, {0}};
    const std::string text = describe(call);
    rcx_emu_trace(("nccl " + text + " stream=" + (stream ? "created" : "default")).c_str());

    // Wrong arguments on one rank are announced, so that every rank fails, not just this one.
    std::string invalid;
    const size_t size = type_size(dtype);
    const size_t in_count = kind == REDUCE_SCATTER ? count * (size_t)nranks : count;
    const size_t out_count = kind == ALL_GATHER ? count * (size_t)nranks : count;
    if (!size) {
        invalid = "unknown data type";
    } else if (reduces(kind) && !op_name(op)) {
        invalid = "unknown reduction";
    } else if (reduces(kind) && (dtype == ncclFloat8e4m3 || dtype == ncclFloat8e5m2)) {
        invalid = "reductions over fp8 are not emulated";
    } else if (rooted(kind) && (root < 0 || root >= nranks)) {
        invalid = "root out of range";
    } else if (count > SIZE_MAX / size / (size_t)nranks) {
        invalid = "count too large";
    } else {
        const bool sends = !(kind == BROADCAST && rank != root);
        const bool receives = !(kind == REDUCE && rank != root);
        if (sends && !in_device_memory(send, in_count * size))
            invalid = "sendbuff does not hold " + std::to_string(in_count * size) + " bytes of device memory";
        else if (receives && !in_device_memory(recv, out_count * size))
            invalid = "recvbuff does not hold " + std::to_string(out_count * size) + " bytes of device memory";
    }
    call.invalid = !invalid.empty();
    snprintf(call.text, TEXT, "%s%s%s", text.c_str(), invalid.empty() ? "" : ": ", invalid.c_str());

    const std::string during = "during collective #" + std::to_string(seq) + " (" + text + ")";
    if (const ncclResult_t r = barrier(comm, during)) return r;
    for (int r = 0; r < nranks; r++) {
        const Call& theirs = comm->slot(r)->calls[seq & 1];
        if (theirs.seq != seq)
            return fail(comm, ncclInternalError,
                        "rank " + std::to_string(r) + " announced collective #" + std::to_string(theirs.seq) + " " +
                            during);
        if (theirs.invalid)
            return fail(comm, ncclInvalidArgument,
                        "collective #" + std::to_string(seq) + ": rank " + std::to_string(r) + " called " + theirs.text);
    }
    const Call& first = comm->slot(0)->calls[seq & 1];
    for (int r = 1; r < nranks; r++) {
        const Call& theirs = comm->slot(r)->calls[seq & 1];
        if (!same_call(first, theirs))
            return fail(comm, ncclInvalidUsage,
                        "collective #" + std::to_string(seq) + " does not match across ranks: rank 0 called " +
                            first.text + ", rank " + std::to_string(r) + " called " + theirs.text);
    }

    // The data, in chunks of one slot: copy in, barrier, compute from every slot, barrier.
    const uint8_t* in = (const uint8_t*)send;
    uint8_t* out = (uint8_t*)recv;
    const uint8_t* slots[MAX_RANKS];
    for (int r = 0; r < nranks; r++) slots[r] = comm->data(r);
    const size_t chunk = SLOT_BYTES / size;
    for (size_t off = 0; off < in_count; off += chunk) {
        const size_t n = in_count - off < chunk ? in_count - off : chunk;
        if (kind != BROADCAST || rank == root) memcpy(comm->data(rank), in + off * size, n * size);
        if (const ncclResult_t r = barrier(comm, during)) return r;
        switch (kind) {
            case ALL_REDUCE: reduce(dtype, op, nranks, slots, out + off * size, n); break;
            case REDUCE:
                if (rank == root) reduce(dtype, op, nranks, slots, out + off * size, n);
                break;
            case BROADCAST: memcpy(out + off * size, slots[root], n * size); break;
            case ALL_GATHER:
                for (int r = 0; r < nranks; r++) memcpy(out + ((size_t)r * count + off) * size, slots[r], n * size);
                break;
            case REDUCE_SCATTER: {
                // This rank's block [rank count, (rank + 1) count) within the chunk [off, off + n).
                const size_t begin = (size_t)rank * count, end = begin + count;
                const size_t lo = off > begin ? off : begin, hi = off + n < end ? off + n : end;
                if (lo < hi) {
                    const uint8_t* parts[MAX_RANKS];
                    for (int r = 0; r < nranks; r++) parts[r] = slots[r] + (lo - off) * size;
                    reduce(dtype, op, nranks, parts, out + (lo - begin) * size, hi - lo);
                }
                break;
            }
        }
        if (const ncclResult_t r = barrier(comm, during)) return r;
    }
    return ncclSuccess;
}

// Marks this rank gone and unmaps the segment; the last rank to leave unlinks it.
void leave(ncclComm* comm) {
    if (!comm->header) return;
    Slot* mine = comm->slot(comm->rank);
    uint32_t joined = JOINED;
    mine->state.compare_exchange_strong(joined, LEFT);  // a FAILED rank keeps its reason
    mine->pid.store(-1);                                // detached
    comm->header->bell.fetch_add(1, std::memory_order_release);
    futex_wake_all(&comm->header->bell);
    bool last = true;
    for (int r = 0; r < comm->nranks && last; r++) {
        Slot* s = comm->slot(r);
        const int32_t pid = s->pid.load();
        last = s->state.load() == ABSENT || pid == -1 || (pid > 0 && !alive(pid));
    }
    if (last) shm_unlink(comm->segment.c_str());
    munmap(comm->header, comm->bytes);
    comm->header = nullptr;
}

double timeout_from_env(std::string* error) {
    const char* text = getenv("RCX_NCCL_EMU_TIMEOUT_S");
    if (!text || !*text) return 60;
    char* end = nullptr;
    const double seconds = strtod(text, &end);
    if (*end || !std::isfinite(seconds) || seconds <= 0 || seconds > 1e6) {
        *error = std::string("RCX_NCCL_EMU_TIMEOUT_S=") + text + ": expected a number of seconds above 0";
        return 0;
    }
    return seconds;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))
typedef ncclComm* ncclComm_t;
typedef void* cudaStream_t;

API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return global_fail(ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = VERSION;
    return ncclSuccess;
}

API const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

API const char* ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error : global_error; }

// The id names a fresh segment: "/rcx-nccl-<pid>-<random nonce>".
API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return global_fail(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
        return global_fail(ncclSystemError, std::string("ncclGetUniqueId: getrandom: ") + strerror(errno));
    memset(id, 0, sizeof *id);
    memcpy(id->internal, ID_MAGIC, sizeof ID_MAGIC);
    snprintf(id->internal + sizeof ID_MAGIC, sizeof id->internal - sizeof ID_MAGIC, "/rcx-nccl-%d-%016llx",
             (int)getpid(), (unsigned long long)nonce);
    return ncclSuccess;
}

API ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int nranks, ncclUniqueId id, int rank, void* config) {
    if (!out) return global_fail(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    if (nranks < 1 || nranks > MAX_RANKS)
        return global_fail(ncclInvalidArgument, "ncclCommInitRank: nranks " + std::to_string(nranks) +
                                                    " is outside 1.." + std::to_string(MAX_RANKS));
    if (rank < 0 || rank >= nranks)
        return global_fail(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) +
                                                    " is outside 0.." + std::to_string(nranks - 1));
    if (memcmp(id.internal, ID_MAGIC, sizeof ID_MAGIC) != 0 ||
        memchr(id.internal + sizeof ID_MAGIC, 0, sizeof id.internal - sizeof ID_MAGIC) == nullptr)
        return global_fail(ncclInvalidArgument, "ncclCommInitRank: the id was not made by this library's ncclGetUniqueId");
    bool blocking = true;
    if (config) {
        const ConfigHead* head = (const ConfigHead*)config;
        if (head->magic != CONFIG_MAGIC || head->size < sizeof(ConfigHead))
            return global_fail(ncclInvalidArgument,
                               "ncclCommInitRankConfig: the config was not set up with NCCL_CONFIG_INITIALIZER");
        blocking = head->blocking == CONFIG_UNDEF_INT || head->blocking != 0;
    }
    std::string bad_env;
    const double timeout_s = timeout_from_env(&bad_env);
    if (!bad_env.empty()) return global_fail(ncclInvalidArgument, bad_env);
    int device = 0;
    if (cuCtxGetDevice(&device) != 0)
        return global_fail(ncclUnhandledCudaError, "ncclCommInitRank: no current CUDA context");

    ncclComm* comm = new ncclComm;
    comm->segment = id.internal + sizeof ID_MAGIC;
    comm->nranks = nranks;
    comm->rank = rank;
    comm->device = device;
    comm->timeout_s = timeout_s;
    *out = comm;
    if (blocking) {
        const ncclResult_t r = join(comm);
        if (r == ncclSuccess) comm->state.store(ncclSuccess);
        return r;
    }
    comm->init = std::thread([comm] {
        if (join(comm) == ncclSuccess) comm->state.store(ncclSuccess);
    });
    return ncclInProgress;
}

API ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    return ncclCommInitRankConfig(out, nranks, id, rank, nullptr);
}

API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* error) {
    if (!comm || !error) return global_fail(ncclInvalidArgument, "ncclCommGetAsyncError: NULL argument");
    *error = comm->state.load();
    return ncclSuccess;
}

// Nothing is ever pending, so abort and destroy are the same: stop any init, leave, free.
API ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    comm->aborting.store(true);
    if (comm->init.joinable()) comm->init.join();
    leave(comm);
    delete comm;
    return ncclSuccess;
}

API ncclResult_t ncclCommDestroy(ncclComm_t comm) { return ncclCommAbort(comm); }

API ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    if (!comm) return global_fail(ncclInvalidArgument, "ncclCommFinalize: comm is NULL");
    return ncclSuccess;
}

API ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    if (!comm || !count) return global_fail(ncclInvalidArgument, "ncclCommCount: NULL argument");
    *count = comm->nranks;
    return ncclSuccess;
}

API ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    if (!comm || !rank) return global_fail(ncclInvalidArgument, "ncclCommUserRank: NULL argument");
    *rank = comm->rank;
    return ncclSuccess;
}

API ncclResult_t ncclCommCuDevice(ncclComm_t comm, int* device) {
    if (!comm || !device) return global_fail(ncclInvalidArgument, "ncclCommCuDevice: NULL argument");
    *device = comm->device;
    return ncclSuccess;
}

API ncclResult_t ncclGroupStart(void) { return ncclSuccess; }
API ncclResult_t ncclGroupEnd(void) { return ncclSuccess; }

API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, ncclComm_t comm,
                               cudaStream_t stream) {
    return collective(comm, ALL_REDUCE, send, recv, count, dtype, op, 0, stream);
}

API ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, int dtype, int op,
                                   ncclComm_t comm, cudaStream_t stream) {
    return collective(comm, REDUCE_SCATTER, send, recv, recvcount, dtype, op, 0, stream);
}

API ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, int dtype, ncclComm_t comm,
                               cudaStream_t stream) {
    return collective(comm, ALL_GATHER, send, recv, sendcount, dtype, ncclSum, 0, stream);
}

API ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root, ncclComm_t comm,
                               cudaStream_t stream) {
    return collective(comm, BROADCAST, send, recv, count, dtype, ncclSum, root, stream);
}

API ncclResult_t ncclBcast(void* buff, size_t count, int dtype, int root, ncclComm_t comm, cudaStream_t stream) {
    return collective(comm, BROADCAST, buff, buff, count, dtype, ncclSum, root, stream);
}

API ncclResult_t ncclReduce(const void* send, void* recv, size_t count, int dtype, int op, int root,
                            ncclComm_t comm, cudaStream_t stream) {
    return collective(comm, REDUCE, send, recv, count, dtype, op, root, stream);
}
