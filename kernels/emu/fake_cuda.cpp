// A fake CUDA driver (libcuda.so) over the kernel emulator (emu.cpp), so that rcx's CUDA
// backend - cudarc's driver calls, the launch wrappers' argument marshalling, the device
// trainer - runs on a machine without a GPU (tests only). Devices of compute capability
// 8.0, so that rcx loads PTX: one, or RCX_EMU_DEVICES (up to 64) so that the local ranks of
// a data-parallel run each open their own; device memory is host memory from rcx_emu_alloc (a device
// pointer is the host address, every buffer ends at a guard page); every stream and event
// is synchronous: a launch or copy is done when its call returns.
//
// RCX_EMU_TRACE=PREFIX writes, to PREFIX.<pid>, one line per kernel launch and per NCCL
// collective (fake_nccl.cpp), each with its stream ("default" or "created" by
// cuStreamCreate): since every call completes at once, the file is the order the work ran
// in, and tests read from it what a real device would overlap.
//
// Kernels: the directory of this library holds one library per kernel file, listed in
// kernels.list, each with a trampoline `rcx_tramp_<kernel>(void** params)` per kernel
// (trampoline.h) that calls the kernel with cuLaunchKernel's parameter array.
// cuModuleLoadData binds each `.entry` of the PTX to the library that defines it.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct FakeContext* CUcontext;
typedef struct FakeModule* CUmodule;
typedef struct FakeFunction* CUfunction;
typedef struct FakeEvent* CUevent;
typedef void* CUstream;

extern "C" {
int rcx_emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   size_t dynamic_shared_bytes, size_t shared_limit_bytes, void (*body)(void*), void* ctx);
const char* rcx_emu_last_error(void);
void* rcx_emu_alloc(size_t bytes);
void rcx_emu_free(void* data);
size_t rcx_emu_extent(const void* p);
}

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

enum {
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
    CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED = 115,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
};

// The emulator's opt-in limit (emu.cpp MAX_DYNAMIC_SHARED).
constexpr int MAX_SHARED_OPTIN = 99 * 1024;
constexpr int MAX_DEVICES = 64;

struct FakeContext {
    CUdevice device;
};
struct FakeFunction {
    std::string name;
    void (*trampoline)(void**);
    size_t shared_limit;  // 0: the default 48 KiB
};
struct FakeModule {
    std::map<std::string, FakeFunction*> functions;
};
struct FakeEvent {
    int unused;
};
struct FakeStream {
    int unused;
};

namespace {

std::mutex lock;
bool initialised = false;
int device_count = 1;
FakeContext primary[MAX_DEVICES];
thread_local CUcontext current = nullptr;
std::vector<void*> kernel_libraries;

// The directory of this library, with a trailing slash.
std::string own_directory() {
    Dl_info info;
    if (!dladdr((void*)&own_directory, &info) || !info.dli_fname) return "./";
    std::string path = info.dli_fname;
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "./" : path.substr(0, slash + 1);
}

CUresult fail(CUresult code, const std::string& why) {
    fprintf(stderr, "fake CUDA driver: %s\n", why.c_str());
    return code;
}

// A copy or memset of `bytes` at device address `ptr` must stay inside one allocation, as
// the driver requires (CUDA_ERROR_INVALID_VALUE otherwise).
CUresult check_range(const char* op, CUdeviceptr ptr, size_t bytes) {
    if (bytes == 0) return CUDA_SUCCESS;
    const size_t extent = rcx_emu_extent((const void*)(uintptr_t)ptr);
    if (extent >= bytes) return CUDA_SUCCESS;
    const std::string why = std::string(op) + " of " + std::to_string(bytes) + " bytes at device address " +
                            std::to_string(ptr) + ", but " +
                            (extent ? "its allocation ends " + std::to_string(extent) + " bytes from there"
                                    : std::string("no allocation holds it"));
    return fail(CUDA_ERROR_INVALID_VALUE, why);
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// One line of the RCX_EMU_TRACE file (nothing when it is unset).
API void rcx_emu_trace(const char* line) {
    static std::mutex trace_lock;
    static FILE* trace = [] {
        const char* prefix = getenv("RCX_EMU_TRACE");
        if (!prefix || !*prefix) return (FILE*)nullptr;
        const std::string path = std::string(prefix) + "." + std::to_string(getpid());
        FILE* file = fopen(path.c_str(), "w");
        if (!file) fail(CUDA_ERROR_INVALID_VALUE, "RCX_EMU_TRACE: cannot write " + path);
        return file;
    }();
    if (!trace) return;
    std::lock_guard<std::mutex> guard(trace_lock);
    fprintf(trace, "%s\n", line);
    fflush(trace);
}

static const char* stream_label(const void* stream) { return stream ? "created" : "default"; }

API CUresult cuInit(unsigned) {
    std::lock_guard<std::mutex> guard(lock);
    if (initialised) return CUDA_SUCCESS;
    if (const char* devices = getenv("RCX_EMU_DEVICES")) {
        char* end = nullptr;
        const long n = strtol(devices, &end, 10);
        if (*devices == 0 || *end != 0 || n < 1 || n > MAX_DEVICES)
            return fail(CUDA_ERROR_INVALID_VALUE, std::string("RCX_EMU_DEVICES=") + devices +
                                                      ": expected a device count from 1 to " +
                                                      std::to_string(MAX_DEVICES));
        device_count = (int)n;
    }
    for (int d = 0; d < MAX_DEVICES; d++) primary[d].device = d;
    const std::string dir = own_directory();
    std::ifstream list(dir + "kernels.list");
    if (!list) return fail(CUDA_ERROR_NOT_INITIALIZED, "no kernels.list beside " + dir);
    std::string name;
    while (std::getline(list, name)) {
        if (name.empty()) continue;
        void* library = dlopen((dir + name).c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!library) return fail(CUDA_ERROR_NOT_INITIALIZED, dlerror());
        kernel_libraries.push_back(library);
    }
    initialised = true;
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* version) {
    *version = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* count) {
    *count = device_count;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "rcx emulated device");
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = (size_t)16 << 30;
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = *total = (size_t)16 << 30;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 8; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *value = 0; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = MAX_SHARED_OPTIN; break;
        default: return fail(CUDA_ERROR_NOT_SUPPORTED, "device attribute " + std::to_string(attribute) + " is not emulated");
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &primary[device];
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }

API CUresult cuCtxSetCurrent(CUcontext ctx) {
    current = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = current;
    return CUDA_SUCCESS;
}

// The fake NCCL reads the device of its communicator here, as NCCL reads the current one.
API CUresult cuCtxGetDevice(CUdevice* device) {
    if (!current) return CUDA_ERROR_INVALID_HANDLE;
    *device = current->device;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize(void) { return CUDA_SUCCESS; }
API CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
// Every stream runs its work inside the call, so a created one only has to be told apart
// from the default (null) stream in the trace.
API CUresult cuStreamCreate(CUstream* stream, unsigned) {
    *stream = new FakeStream{};
    return CUDA_SUCCESS;
}
API CUresult cuStreamDestroy_v2(CUstream stream) {
    delete (FakeStream*)stream;
    return CUDA_SUCCESS;
}

API CUresult cuEventCreate(CUevent* event, unsigned) {
    *event = new FakeEvent{};
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(CUevent event) {
    delete event;
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
API CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
API CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }

API CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    void* data = rcx_emu_alloc(bytes);
    if (!data) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot allocate " + std::to_string(bytes) + " bytes");
    *ptr = (CUdeviceptr)(uintptr_t)data;
    return CUDA_SUCCESS;
}
API CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream) { return cuMemAlloc_v2(ptr, bytes); }

API CUresult cuMemFree_v2(CUdeviceptr ptr) {
    rcx_emu_free((void*)(uintptr_t)ptr);
    return CUDA_SUCCESS;
}
API CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream) { return cuMemFree_v2(ptr); }

API CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t count) {
    if (const CUresult r = check_range("cuMemsetD8", ptr, count)) return r;
    memset((void*)(uintptr_t)ptr, value, count);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t count, CUstream) {
    return cuMemsetD8_v2(ptr, value, count);
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    if (const CUresult r = check_range("cuMemcpyHtoD", dst, bytes)) return r;
    memcpy((void*)(uintptr_t)dst, src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    if (const CUresult r = check_range("cuMemcpyDtoH", src, bytes)) return r;
    memcpy(dst, (const void*)(uintptr_t)src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (const CUresult r = check_range("cuMemcpyDtoD (source)", src, bytes)) return r;
    if (const CUresult r = check_range("cuMemcpyDtoD (destination)", dst, bytes)) return r;
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}

// Binds every `.entry NAME(` of the PTX text to the kernel library that has its trampoline.
API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    const char* text = (const char*)image;
    if (strncmp(text, "\x7f" "ELF", 4) == 0)
        return fail(CUDA_ERROR_INVALID_PTX, "a cubin cannot be emulated; load the PTX");
    std::lock_guard<std::mutex> guard(lock);
    FakeModule* loaded = new FakeModule;
    for (const char* at = strstr(text, ".entry"); at; at = strstr(at + 6, ".entry")) {
        const char* name = at + 6;
        while (*name == ' ' || *name == '\t') name++;
        size_t len = 0;
        while (name[len] && name[len] != '(' && name[len] != ' ' && name[len] != '\n') len++;
        const std::string kernel(name, len);
        const std::string symbol = "rcx_tramp_" + kernel;
        void* trampoline = nullptr;
        for (void* library : kernel_libraries)
            if ((trampoline = dlsym(library, symbol.c_str()))) break;
        if (!trampoline) {
            delete loaded;
            return fail(CUDA_ERROR_INVALID_PTX, "no emulated kernel " + kernel + " (" + symbol + ")");
        }
        loaded->functions[kernel] = new FakeFunction{kernel, (void (*)(void**))trampoline, 0};
    }
    *module = loaded;
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(CUmodule module) {
    for (auto& entry : module->functions) delete entry.second;
    delete module;
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    const auto found = module->functions.find(name);
    if (found == module->functions.end()) return CUDA_ERROR_NOT_FOUND;
    *function = found->second;
    return CUDA_SUCCESS;
}

API CUresult cuFuncSetAttribute(CUfunction function, int attribute, int value) {
    if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "function attribute " + std::to_string(attribute) + " is not emulated");
    if (value < 0 || value > MAX_SHARED_OPTIN)
        return fail(CUDA_ERROR_INVALID_VALUE, function->name + ": a dynamic shared memory limit of " +
                                                  std::to_string(value) + " bytes is over the device's " +
                                                  std::to_string(MAX_SHARED_OPTIN));
    function->shared_limit = (size_t)value;
    return CUDA_SUCCESS;
}

API CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction function) {
    if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "function attribute " + std::to_string(attribute) + " is not emulated");
    *value = function->shared_limit ? (int)function->shared_limit : 48 * 1024;
    return CUDA_SUCCESS;
}

namespace {
struct LaunchCall {
    void (*trampoline)(void**);
    void** params;
};
void launch_body(void* ctx) {
    const LaunchCall* call = (const LaunchCall*)ctx;
    call->trampoline(call->params);
}
}  // namespace

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared_bytes, CUstream stream, void** params, void** extra) {
    rcx_emu_trace(("launch " + f->name + " stream=" + stream_label(stream)).c_str());
    if (extra) return fail(CUDA_ERROR_NOT_SUPPORTED, f->name + ": launch `extra` parameters are not emulated");
    LaunchCall call = {f->trampoline, params};
    if (rcx_emu_launch(gx, gy, gz, bx, by, bz, shared_bytes, f->shared_limit, launch_body, &call) != 0)
        return fail(CUDA_ERROR_LAUNCH_FAILED, f->name + ": " + rcx_emu_last_error());
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult code, const char** name) {
    switch (code) {
        case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_PTX: *name = "CUDA_ERROR_INVALID_PTX"; break;
        case CUDA_ERROR_INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *name = nullptr; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult code, const char** text) {
    if (code == CUDA_ERROR_LAUNCH_FAILED) {
        *text = "the emulated launch failed (the fake driver printed why on stderr)";
        return CUDA_SUCCESS;
    }
    return cuGetErrorName(code, text);
}
