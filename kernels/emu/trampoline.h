// The trampolines of the fake CUDA driver (fake_cuda.cpp): `rcx_tramp_<kernel>(params)`
// calls an emulated kernel with cuLaunchKernel's parameter array, params[i] pointing at
// argument i. The argument types come from the kernel's own signature, so the trampoline
// reads exactly the bytes a GPU would take from each parameter.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

template <typename... Args, size_t... I>
void rcx_tramp_call(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
}

template <typename... Args> void rcx_tramp(void (*kernel)(Args...), void** params) {
    rcx_tramp_call(kernel, params, std::index_sequence_for<Args...>{});
}

#define RCX_TRAMPOLINE(kernel) \
    extern "C" __attribute__((visibility("default"))) void rcx_tramp_##kernel(void** params) { rcx_tramp(kernel, params); }
