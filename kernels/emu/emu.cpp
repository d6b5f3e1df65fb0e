// The scheduler of the CPU emulation of CUDA (see emu.h): a launch runs its blocks one
// after another; the threads of a block are fibers (ucontext) switched only at barriers
// and warp collectives, so a block behaves like a GPU block whose threads run in an order
// that respects every synchronisation and nothing more. What a GPU would hang on, or do
// undefined things with, is reported as a launch error instead:
//   - a __syncthreads that some thread of the block never reaches (it exited, or waits at
//     another barrier), or threads of the block at different __syncthreads calls;
//   - a warp collective whose mask names lanes that do not exist, exited or wait elsewhere;
//   - a wmma load or store through a misaligned pointer or leading dimension (emu.h), and
//     a wmma::mma_sync that not all 32 lanes of the warp reach;
//   - a fault inside the kernel: an access past a buffer from rcx_emu_alloc (each ends at
//     a guard page), past the launch's dynamic shared memory, a fiber stack overflow, an
//     integer division by zero; writes into the padding after the dynamic shared memory.
// Built into its own library, which every kernel library links: one scheduler, one lock.
#include "emu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>

extern "C" {
__attribute__((visibility("default"))) rcx_emu_thread_record* rcx_emu_current = nullptr;
__attribute__((visibility("default"))) rcx_emu_dim3 rcx_emu_block_idx, rcx_emu_block_dim, rcx_emu_grid_dim;
}

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;  // per emulated thread; kernels use little
constexpr unsigned MAX_BLOCK_THREADS = 1024;
// Without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize) a kernel gets 48 KiB of
// dynamic shared memory; opting in raises its limit up to 99 KiB (compute capability 8.6
// and 8.9 allow no more; 8.0 and 9.0 allow more, but the kernels stay within every GPU's).
constexpr size_t DEFAULT_DYNAMIC_SHARED = 48 * 1024;
constexpr size_t MAX_DYNAMIC_SHARED = 99 * 1024;
// The dynamic shared memory's alignment: kernels/common.cuh declares 128 (wmma tiles need 32).
constexpr size_t SHARED_ALIGN = 128;
constexpr unsigned char SHARED_POISON = 0xff;  // NaN in every float format
constexpr unsigned char SHARED_CANARY = 0xa5;
constexpr int MAX_BUFFERS = 1 << 16;

enum State { READY, RUNNING, AT_BLOCK_BARRIER, AT_WARP, DONE };

struct Fiber {
    rcx_emu_thread_record record;
    ucontext_t context;
    bool context_ready;
    State state;
    unsigned linear;  // x + bx (y + by z): lane = linear % 32, warp = linear / 32
    int barrier_kind, predicate, block_result;
    void* site;
    int warp_kind, source;
    unsigned warp_mask;
    uint64_t bits, warp_result;
};

struct Buffer {
    std::atomic<uintptr_t> data{0};
    uintptr_t region = 0, guard = 0;
    size_t bytes = 0, region_bytes = 0;
};

std::mutex launch_lock;
Fiber* fibers = nullptr;            // [MAX_BLOCK_THREADS]
unsigned char* stacks = nullptr;    // per fiber: a guard page, then STACK_BYTES
size_t page_bytes = 0;
unsigned char* shared_region = nullptr;  // MAX_DYNAMIC_SHARED + SHARED_ALIGN bytes, then a guard page
size_t shared_region_bytes = 0;
unsigned char* shared_base = nullptr;
size_t shared_bytes = 0, shared_padded = 0;
Buffer buffers[MAX_BUFFERS];

// The launch in progress (guarded by launch_lock).
ucontext_t scheduler_context;
sigjmp_buf fault_jump;
volatile sig_atomic_t launching = 0;
pthread_t launch_owner;
Fiber* running = nullptr;
void (*launch_body)(void*) = nullptr;
void* launch_ctx = nullptr;
unsigned block_threads = 0, done_count = 0, block_arrived = 0;
unsigned warp_arrived[MAX_BLOCK_THREADS / 32];
unsigned ready_queue[MAX_BLOCK_THREADS];
unsigned ready_head = 0, ready_count = 0;
// Odd blocks start and release their threads in reverse order, so a missing barrier
// between threads shows in one of the two orders (a read of a slot not yet written).
bool reverse_order = false;
std::string failure;     // set by a fiber that found an error, before it leaves for good
char fault_message[512];  // written by the signal handler
thread_local std::string last_error;

struct sigaction previous_segv, previous_bus, previous_fpe;
bool handlers_installed = false;

// The i-th thread of the block in this block's order.
Fiber* nth(unsigned i) { return &fibers[reverse_order ? block_threads - 1 - i : i]; }

void push_ready(Fiber* f) {
    f->state = READY;
    ready_queue[(ready_head + ready_count) % MAX_BLOCK_THREADS] = f->linear;
    ready_count++;
}

std::string describe_thread(const Fiber* f) {
    char text[96];
    snprintf(text, sizeof text, "thread (%u,%u,%u)", f->record.thread_idx.x, f->record.thread_idx.y,
             f->record.thread_idx.z);
    return text;
}

std::string describe_site(void* site) {
    Dl_info info;
    char text[256];
    if (dladdr(site, &info) && info.dli_sname) {
        snprintf(text, sizeof text, "%s+0x%lx", info.dli_sname,
                 (unsigned long)((uintptr_t)site - (uintptr_t)info.dli_saddr));
    } else {
        snprintf(text, sizeof text, "%p", site);
    }
    return text;
}

// Leaves the launch from inside a fiber: the fiber is never resumed.
[[noreturn]] void fail(const std::string& why) {
    failure = describe_thread(running) + ": " + why;
    swapcontext(&running->context, &scheduler_context);
    __builtin_unreachable();
}

void yield_to_scheduler() { swapcontext(&running->context, &scheduler_context); }

void fiber_main() {
    for (;;) {
        Fiber* self = running;
        launch_body(launch_ctx);
        self->state = DONE;
        done_count++;
        swapcontext(&self->context, &scheduler_context);
    }
}

const char* warp_kind_name(int kind) {
    switch (kind) {
        case RCX_EMU_SHFL: return "__shfl_sync";
        case RCX_EMU_SHFL_XOR: return "__shfl_xor_sync";
        case RCX_EMU_SHFL_DOWN: return "__shfl_down_sync";
        case RCX_EMU_SHFL_UP: return "__shfl_up_sync";
        case RCX_EMU_VOTE: return "a warp vote (__ballot/__any/__all_sync)";
        case RCX_EMU_WMMA: return "wmma::mma_sync";
        default: return "__syncwarp";
    }
}

// Why no thread of the block can go on: who waits where, who has exited.
std::string diagnose_stuck() {
    unsigned at_block = 0, at_warp = 0;
    const Fiber *first_block = nullptr, *first_warp = nullptr, *first_done = nullptr;
    for (unsigned i = 0; i < block_threads; i++) {
        const Fiber* f = &fibers[i];
        if (f->state == AT_BLOCK_BARRIER && at_block++ == 0) first_block = f;
        if (f->state == AT_WARP && at_warp++ == 0) first_warp = f;
        if (f->state == DONE && !first_done) first_done = f;
    }
    std::string why = "deadlock: ";
    if (at_block) {
        why += std::to_string(at_block) + " of " + std::to_string(block_threads) +
               " threads wait at __syncthreads (first " + describe_thread(first_block) + " at " +
               describe_site(first_block->site) + ")";
        if (done_count)
            why += ", " + std::to_string(done_count) + " threads have exited (first " + describe_thread(first_done) +
                   "): every thread of a block must reach every __syncthreads";
        if (at_warp) why += ", ";
    }
    if (at_warp) {
        const unsigned warp = first_warp->linear / 32, base = warp * 32;
        std::string missing;
        for (unsigned lane = 0; lane < 32; lane++) {
            if (!(first_warp->warp_mask >> lane & 1u)) continue;
            const Fiber* g = &fibers[base + lane];
            if (g->state == AT_WARP) continue;
            if (!missing.empty()) missing += ", ";
            missing += std::to_string(lane) + (g->state == DONE ? " (exited)" : " (at __syncthreads)");
        }
        char mask[16];
        snprintf(mask, sizeof mask, "0x%08x", first_warp->warp_mask);
        why += std::string("warp ") + std::to_string(warp) + " waits in " + warp_kind_name(first_warp->warp_kind) +
               " with mask " + mask + " but lanes " + missing + " never arrive";
    }
    return why;
}

const char* classify_address(uintptr_t address) {
    if (address >= (uintptr_t)shared_base + shared_padded &&
        address < (uintptr_t)shared_region + shared_region_bytes)
        return "past the end of the launch's dynamic shared memory";
    const uintptr_t stacks_end = (uintptr_t)stacks + MAX_BLOCK_THREADS * (page_bytes + STACK_BYTES);
    if (address >= (uintptr_t)stacks && address < stacks_end &&
        (address - (uintptr_t)stacks) % (page_bytes + STACK_BYTES) < page_bytes)
        return "stack overflow of the emulated thread";
    for (const Buffer& b : buffers) {
        if (b.data.load(std::memory_order_acquire) == 0) continue;
        if (address >= b.guard && address < b.guard + page_bytes) return "past the end of a device buffer";
        if (address >= b.region && address < b.guard) return "before the start of a device buffer";
    }
    return "at an address no buffer owns";
}

void on_fault(int signal, siginfo_t* info, void* context) {
    if (launching && running && pthread_equal(pthread_self(), launch_owner)) {
        const Fiber* f = running;
        if (signal == SIGFPE) {
            snprintf(fault_message, sizeof fault_message,
                     "thread (%u,%u,%u): arithmetic fault (integer division by zero?)", f->record.thread_idx.x,
                     f->record.thread_idx.y, f->record.thread_idx.z);
        } else {
            snprintf(fault_message, sizeof fault_message, "thread (%u,%u,%u): illegal memory access %s (address %p)",
                     f->record.thread_idx.x, f->record.thread_idx.y, f->record.thread_idx.z,
                     classify_address((uintptr_t)info->si_addr), info->si_addr);
        }
        siglongjmp(fault_jump, 1);
    }
    // Not a kernel's: hand it to whoever handled it before us.
    struct sigaction* previous = signal == SIGSEGV ? &previous_segv : signal == SIGBUS ? &previous_bus : &previous_fpe;
    if (previous->sa_flags & SA_SIGINFO) {
        previous->sa_sigaction(signal, info, context);
    } else if (previous->sa_handler == SIG_DFL || previous->sa_handler == SIG_IGN) {
        sigaction(signal, previous, nullptr);  // the fault repeats on return, now fatal
    } else {
        previous->sa_handler(signal);
    }
}

void install_handlers() {
    if (handlers_installed) return;
    struct sigaction action = {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
    sigaction(SIGBUS, &action, &previous_bus);
    sigaction(SIGFPE, &action, &previous_fpe);
    handlers_installed = true;
}

bool allocate_once() {
    if (fibers) return true;
    page_bytes = (size_t)sysconf(_SC_PAGESIZE);
    fibers = new Fiber[MAX_BLOCK_THREADS]();
    const size_t stack_total = MAX_BLOCK_THREADS * (page_bytes + STACK_BYTES);
    void* s = mmap(nullptr, stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    shared_region_bytes = (MAX_DYNAMIC_SHARED + SHARED_ALIGN + page_bytes - 1) / page_bytes * page_bytes + page_bytes;
    void* r = mmap(nullptr, shared_region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED || r == MAP_FAILED) return false;
    stacks = (unsigned char*)s;
    for (unsigned i = 0; i < MAX_BLOCK_THREADS; i++) mprotect(stacks + i * (page_bytes + STACK_BYTES), page_bytes, PROT_NONE);
    shared_region = (unsigned char*)r;
    mprotect(shared_region + shared_region_bytes - page_bytes, page_bytes, PROT_NONE);
    return true;
}

// Runs every block; returns normally on success or after a fiber set `failure`. Not
// inlined: the launch's sigsetjmp must not share its frame.
__attribute__((noinline)) void run_grid() {
    const rcx_emu_dim3 grid = rcx_emu_grid_dim, block = rcx_emu_block_dim;
    for (unsigned i = 0; i < block_threads; i++) {
        Fiber* f = &fibers[i];
        f->linear = i;
        f->record.thread_idx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        if (!f->context_ready) {
            getcontext(&f->context);
            f->context.uc_stack.ss_sp = stacks + i * (page_bytes + STACK_BYTES) + page_bytes;
            f->context.uc_stack.ss_size = STACK_BYTES;
            f->context.uc_link = nullptr;
            makecontext(&f->context, fiber_main, 0);
            f->context_ready = true;
        }
    }
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                rcx_emu_block_idx = {bx, by, bz};
                memset(shared_base, SHARED_POISON, shared_bytes);
                memset(shared_base + shared_bytes, SHARED_CANARY, shared_padded - shared_bytes);
                done_count = block_arrived = 0;
                memset(warp_arrived, 0, sizeof warp_arrived);
                ready_head = ready_count = 0;
                reverse_order = (bx + grid.x * (by + grid.y * bz)) % 2 == 1;
                for (unsigned i = 0; i < block_threads; i++) push_ready(nth(i));
                while (done_count < block_threads) {
                    if (ready_count == 0) {
                        failure = diagnose_stuck();
                        break;
                    }
                    Fiber* f = &fibers[ready_queue[ready_head]];
                    ready_head = (ready_head + 1) % MAX_BLOCK_THREADS;
                    ready_count--;
                    f->state = RUNNING;
                    running = f;
                    rcx_emu_current = &f->record;
                    swapcontext(&scheduler_context, &f->context);
                    if (!failure.empty()) break;
                }
                if (!failure.empty()) {
                    char where[96];
                    snprintf(where, sizeof where, "block (%u,%u,%u), ", bx, by, bz);
                    failure = where + failure;
                    return;
                }
                for (size_t i = shared_bytes; i < shared_padded; i++) {
                    if (shared_base[i] != SHARED_CANARY) {
                        char why[160];
                        snprintf(why, sizeof why,
                                 "block (%u,%u,%u) wrote byte %zu of dynamic shared memory, past the %zu bytes of the launch",
                                 bx, by, bz, i, shared_bytes);
                        failure = why;
                        return;
                    }
                }
            }
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* rcx_emu_dynamic_shared(void) { return shared_base; }

__attribute__((visibility("default"))) void rcx_emu_fail(const char* why) { fail(why); }

__attribute__((visibility("default"))) int rcx_emu_block_barrier(int kind, int predicate) {
    Fiber* self = running;
    self->site = __builtin_return_address(0);
    self->barrier_kind = kind;
    self->predicate = predicate;
    self->state = AT_BLOCK_BARRIER;
    if (++block_arrived < block_threads) {
        yield_to_scheduler();
        return self->block_result;
    }
    // The last thread in: every thread of the block is here.
    int any = 0, all = 1, count = 0;
    for (unsigned i = 0; i < block_threads; i++) {
        const Fiber* f = &fibers[i];
        if (f->site != self->site || f->barrier_kind != kind)
            fail("divergent __syncthreads: this thread is at " + describe_site(self->site) + " but " +
                 describe_thread(f) + " is at " + describe_site(f->site));
        any |= f->predicate;
        all &= f->predicate;
        count += f->predicate;
    }
    const int result = kind == 1 ? any : kind == 2 ? all : kind == 3 ? count : 0;
    block_arrived = 0;
    for (unsigned i = 0; i < block_threads; i++) {
        fibers[i].block_result = result;
        if (nth(i) != self) push_ready(nth(i));
    }
    self->state = RUNNING;
    return result;
}

__attribute__((visibility("default"))) uint64_t rcx_emu_warp_exchange(int kind, unsigned mask, uint64_t bits,
                                                                      int source) {
    Fiber* self = running;
    const unsigned lane = self->linear % 32, warp = self->linear / 32, base = warp * 32;
    const unsigned lanes = block_threads - base < 32 ? block_threads - base : 32;
    const unsigned existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    char text[256];
    if (!(mask >> lane & 1u)) {
        snprintf(text, sizeof text, "%s with mask 0x%08x from lane %u, which the mask leaves out", warp_kind_name(kind),
                 mask, lane);
        fail(text);
    }
    if (mask & ~existing) {
        snprintf(text, sizeof text, "%s with mask 0x%08x but warp %u has only %u lanes (blockDim gives %u threads)",
                 warp_kind_name(kind), mask, warp, lanes, block_threads);
        fail(text);
    }
    if (source >= 0 && !(mask >> source & 1u)) {
        snprintf(text, sizeof text, "%s reads lane %d, which mask 0x%08x leaves out", warp_kind_name(kind), source,
                 mask);
        fail(text);
    }
    self->warp_kind = kind;
    self->warp_mask = mask;
    self->bits = bits;
    self->source = source;
    self->state = AT_WARP;
    warp_arrived[warp] |= 1u << lane;
    if ((warp_arrived[warp] & mask) != mask) {
        yield_to_scheduler();
        return self->warp_result;
    }
    // The last lane of the mask in: exchange.
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        const Fiber* f = &fibers[base + l];
        if (f->warp_kind != kind || f->warp_mask != mask) {
            snprintf(text, sizeof text, "lanes of warp %u disagree: lane %u is in %s (mask 0x%08x), lane %u in %s (mask 0x%08x)",
                     warp, lane, warp_kind_name(kind), mask, l, warp_kind_name(f->warp_kind), f->warp_mask);
            fail(text);
        }
        ballot |= (uint64_t)(f->bits & 1u) << l;
    }
    for (unsigned i = 0; i < 32; i++) {
        const unsigned l = reverse_order ? 31 - i : i;
        if (!(mask >> l & 1u)) continue;
        Fiber* f = &fibers[base + l];
        f->warp_result = f->source < 0 ? ballot : fibers[base + f->source].bits;
        if (f != self) push_ready(f);
    }
    warp_arrived[warp] &= ~mask;
    self->state = RUNNING;
    return self->warp_result;
}

// Launches `body` once per thread of a gx·gy·gz grid of bx·by·bz blocks with
// `dynamic_shared_bytes` of dynamic shared memory; body(ctx) calls the kernel. The kernel's
// dynamic shared memory limit is `shared_limit_bytes`: 0 for the default (48 KiB), else
// what the host raised it to (cudaFuncAttributeMaxDynamicSharedMemorySize, at most 99 KiB).
// 0 on success; otherwise rcx_emu_last_error() says why. One launch at a time (a lock).
__attribute__((visibility("default"))) int rcx_emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                                          unsigned by, unsigned bz, size_t dynamic_shared_bytes,
                                                          size_t shared_limit_bytes, void (*body)(void*),
                                                          void* ctx) {
    std::lock_guard<std::mutex> guard(launch_lock);
    char why[256];
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gx > 0x7fffffffu || gy > 65535 ||
        gz > 65535 || bx > 1024 || by > 1024 || bz > 64 || threads > MAX_BLOCK_THREADS) {
        snprintf(why, sizeof why, "invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)", gx, gy, gz, bx, by,
                 bz);
        last_error = why;
        return 1;
    }
    if (shared_limit_bytes > MAX_DYNAMIC_SHARED) {
        snprintf(why, sizeof why, "invalid kernel attribute: a dynamic shared memory limit of %zu bytes, over the %zu "
                 "bytes a kernel may opt in to", shared_limit_bytes, MAX_DYNAMIC_SHARED);
        last_error = why;
        return 1;
    }
    if (shared_limit_bytes == 0 && dynamic_shared_bytes > DEFAULT_DYNAMIC_SHARED) {
        snprintf(why, sizeof why, "invalid launch configuration: %zu bytes of dynamic shared memory, over the %zu bytes "
                 "a kernel gets without opting in", dynamic_shared_bytes, DEFAULT_DYNAMIC_SHARED);
        last_error = why;
        return 1;
    }
    if (shared_limit_bytes != 0 && dynamic_shared_bytes > shared_limit_bytes) {
        snprintf(why, sizeof why, "invalid launch configuration: %zu bytes of dynamic shared memory, over the %zu bytes "
                 "the kernel's limit was raised to", dynamic_shared_bytes, shared_limit_bytes);
        last_error = why;
        return 1;
    }
    if (!allocate_once()) {
        last_error = "cannot map the emulator's stacks";
        return 1;
    }
    install_handlers();
    // The stack-overflow report runs on an alternate signal stack: use the thread's, or
    // lend it one for the launch.
    static unsigned char alternate[64 * 1024];
    stack_t current = {}, lent = {};
    sigaltstack(nullptr, &current);
    const bool lend = current.ss_flags & SS_DISABLE;
    if (lend) {
        lent.ss_sp = alternate;
        lent.ss_size = sizeof alternate;
        sigaltstack(&lent, nullptr);
    }

    shared_bytes = dynamic_shared_bytes;
    shared_padded = (dynamic_shared_bytes + SHARED_ALIGN - 1) / SHARED_ALIGN * SHARED_ALIGN;
    shared_base = shared_region + shared_region_bytes - page_bytes - shared_padded;
    rcx_emu_grid_dim = {gx, gy, gz};
    rcx_emu_block_dim = {bx, by, bz};
    block_threads = (unsigned)threads;
    launch_body = body;
    launch_ctx = ctx;
    failure.clear();
    launch_owner = pthread_self();
    launching = 1;
    if (sigsetjmp(fault_jump, 1) == 0) {
        run_grid();
    } else {
        failure = std::string("block (") + std::to_string(rcx_emu_block_idx.x) + "," +
                  std::to_string(rcx_emu_block_idx.y) + "," + std::to_string(rcx_emu_block_idx.z) + "), " +
                  fault_message;
    }
    launching = 0;
    running = nullptr;
    rcx_emu_current = nullptr;
    if (lend) {
        stack_t off = {};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
    }
    if (failure.empty()) return 0;
    // Fibers left mid-kernel start afresh next launch.
    for (unsigned i = 0; i < MAX_BLOCK_THREADS; i++) fibers[i].context_ready = false;
    last_error = failure;
    return 1;
}

__attribute__((visibility("default"))) const char* rcx_emu_last_error(void) { return last_error.c_str(); }

// A device buffer of `bytes` that ends exactly at a guard page, so reading or writing
// past its end faults (and the launch reports it). A guard page precedes its first page,
// whose bytes before the buffer are 0xff (NaN): a read just before the start gives NaN,
// one before the page faults. Null on failure.
__attribute__((visibility("default"))) void* rcx_emu_alloc(size_t bytes) {
    std::lock_guard<std::mutex> guard(launch_lock);
    if (page_bytes == 0) page_bytes = (size_t)sysconf(_SC_PAGESIZE);
    const size_t data_pages = (bytes + page_bytes - 1) / page_bytes * page_bytes;
    const size_t total = page_bytes + data_pages + page_bytes;  // guard, data, guard
    void* r = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) return nullptr;
    unsigned char* region = (unsigned char*)r;
    mprotect(region, page_bytes, PROT_NONE);
    mprotect(region + page_bytes + data_pages, page_bytes, PROT_NONE);
    unsigned char* data = region + page_bytes + data_pages - bytes;
    memset(region + page_bytes, 0xff, data_pages - bytes);
    for (Buffer& b : buffers) {
        if (b.data.load(std::memory_order_relaxed) != 0) continue;
        b.region = (uintptr_t)region;
        b.guard = (uintptr_t)(region + page_bytes + data_pages);
        b.bytes = bytes;
        b.region_bytes = total;
        // A zero-byte buffer is the guard page itself: any access faults.
        b.data.store((uintptr_t)data, std::memory_order_release);
        return data;
    }
    munmap(region, total);
    return nullptr;
}

// The bytes from `p` to the end of the rcx_emu_alloc buffer holding it; 0 when no buffer
// holds it. The fake CUDA driver and cuBLAS check copies and operands against it.
__attribute__((visibility("default"))) size_t rcx_emu_extent(const void* p) {
    std::lock_guard<std::mutex> guard(launch_lock);
    const uintptr_t address = (uintptr_t)p;
    for (const Buffer& b : buffers) {
        const uintptr_t data = b.data.load(std::memory_order_relaxed);
        if (data != 0 && address >= data && address < data + b.bytes) return data + b.bytes - address;
    }
    return 0;
}

__attribute__((visibility("default"))) void rcx_emu_free(void* data) {
    std::lock_guard<std::mutex> guard(launch_lock);
    for (Buffer& b : buffers) {
        if (b.data.load(std::memory_order_relaxed) != (uintptr_t)data || data == nullptr) continue;
        b.data.store(0, std::memory_order_release);
        munmap((void*)b.region, b.region_bytes);
        return;
    }
}

}  // extern "C"
