"""Stand-ins for what scripts/gpu-check.sh runs on a GPU machine, for
scripts/gpu-check-selftest.sh on a machine without one: nvidia-smi, compute-sanitizer, the
bundle's executables (rcx, the libtest test executables cuda_kernels and cuda_model, the
benches kernels and gpu_step) and the PyTorch bench. Each prints what the real one prints
(libtest's lines, the lab's and the step bench's result lines, the JSON records) and
enforces how gpu-check.sh must call it, so a wrong call fails the selftest.

Usage: python3 gpu-check-fakes.py ROLE ARGS...   (the selftest's wrappers pass ROLE)

Behaviour, from the environment:
  FAKE_DRIVER, FAKE_CUDA   driver version and the CUDA version it supports (580.159.04, 13.0)
  FAKE_SMI=broken          nvidia-smi cannot reach the driver
  FAKE_GPUS                how many GPUs nvidia-smi lists (1)
  FAKE_SANITIZER           unsupported (as on gVisor) | clean | error
  FAKE_BEHAVIOUR           EXE:TEST=fail|poison|hang, comma-separated: poison fails the test
                           with a sticky CUDA error that fails every later test of the process;
                           gpu_step:MODEL=fail|hang for a model of the step bench;
                           rcx:rank1=fail (rank 1 of a --nproc run fails), rcx:zero1=drift
                           (ZeRO-1's weights drift from the one process's)
  FAKE_MARKS               folder where each run of a bundle executable logs its arguments
"""

import ctypes
import json
import os
import struct
import subprocess
import sys
import time

TESTS = {
    "cuda_kernels": [
        "cls_pool_matches_cpu",
        "flash_attention_matches_cpu",
        "flash_attention_tensor_cores_match_cpu",
        "matmul_matches_cpu",
    ],
    "cuda_model": [
        "all_gpu_tests_on_the_emulated_device",
        "training_step_matches_cpu",
        "bf16_training_step_matches_cpu",
    ],
}


def mark(role, args):
    marks = os.environ.get("FAKE_MARKS")
    if marks:
        with open(os.path.join(marks, "ran-" + role), "a") as f:
            f.write(" ".join(args) + "\n")


def load_cuda(need_blas):
    """What the real executables do first: dlopen libcuda (and libcublas) by name."""
    if os.environ.get("RCX_REQUIRE_GPU") != "1":
        return "RCX_REQUIRE_GPU is not 1: a skip would pass silently"
    if os.environ.get("FAKE_CUDA_ERROR"):
        return "CUDA is available but the runtime failed: CUDA_ERROR_UNKNOWN (999)"
    names = ["libcuda.so"] + (["libcublas.so"] if need_blas else [])
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            return f"{name} was not found: {e}"
    return None


def nvidia_smi(args):
    if os.environ.get("FAKE_SMI") == "broken":
        print(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running."
        )
        return 9
    driver = os.environ.get("FAKE_DRIVER", "580.159.04")
    cuda = os.environ.get("FAKE_CUDA", "13.0")
    values = {
        "driver_version": driver,
        "name": "NVIDIA H200",
        "memory.total": "143771 MiB",
        "memory.used": "0 MiB",
        "clocks.sm": "345 MHz",
        "clocks.max.sm": "1980 MHz",
        "power.draw": "75.00 W",
        "temperature.gpu": "31",
        "compute_cap": "9.0",
    }
    gpus = int(os.environ.get("FAKE_GPUS", "1"))
    if "-L" in args:
        for i in range(gpus):
            print(f"GPU {i}: NVIDIA H200 (UUID: GPU-5e1f0c3a-0000-4000-8000-00000000000{i})")
        return 0
    query = [a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")]
    if query:
        fields = query[0].split(",")
        if not any("noheader" in a for a in args):
            print(", ".join(fields))
        for _ in range(gpus):
            print(", ".join(values.get(f, "[N/A]") for f in fields))
        return 0
    if "-q" in args:
        print(f"Driver Version                            : {driver}")
        print(f"CUDA Version                              : {cuda}")
        return 0
    print("+" + "-" * 89 + "+")
    print(f"| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |")
    print("|   0  NVIDIA H200   On  |   00000000:00:05.0 Off |   0 |")
    return 0


def sanitizer(args):
    """compute-sanitizer [--opt value | --opt=value]... COMMAND ARGS..."""
    mode = os.environ.get("FAKE_SANITIZER", "clean")
    i = 0
    tool = "memcheck"
    while i < len(args) and args[i].startswith("-"):
        if "=" in args[i]:
            i += 1
        else:
            if args[i] == "--tool":
                tool = args[i + 1]
            i += 2
    command = args[i:]
    print("========= COMPUTE-SANITIZER")
    if not command or "--exact" not in command or "RCX_FLASH_SHAPE" not in os.environ:
        print(f"fake compute-sanitizer: no small case selected: {command}")
        return 98
    env = dict(os.environ)
    if mode == "unsupported":
        print("========= Error: Device not supported")
        env["FAKE_CUDA_ERROR"] = "999"
    rc = subprocess.call(command, env=env)
    if mode == "error":
        print("========= Invalid __global__ write of size 4 bytes")
        print("=========     at flash_attention_forward_v3+0x1c40")
        print("========= ERROR SUMMARY: 1 error")
        return 9
    summary = "RACECHECK SUMMARY: 0 hazards displayed" if tool == "racecheck" else "ERROR SUMMARY: 0 errors"
    print(f"========= {summary}")
    return rc


def behaviour(exe, test):
    for item in filter(None, os.environ.get("FAKE_BEHAVIOUR", "").split(",")):
        key, what = item.split("=")
        if key == f"{exe}:{test}":
            return what
    return "pass"


def test_executable(exe, args):
    tests = TESTS[exe]
    if "--list" in args:
        for t in tests:
            print(f"{t}: test")
        print(f"\n{len(tests)} tests, 0 benchmarks")
        return 0
    mark(exe, args)
    if "--test-threads=1" not in args:
        print("fake test executable: run with --test-threads=1")
        return 97
    positional, skip, i = [], [], 0
    while i < len(args):
        if args[i] == "--skip":
            skip.append(args[i + 1])
            i += 2
            continue
        if not args[i].startswith("-"):
            positional.append(args[i])
        i += 1
    if "--exact" in args:
        chosen = [t for t in tests if not positional or t in positional]
    else:
        chosen = [t for t in tests if not positional or any(p in t for p in positional)]
    chosen = [t for t in chosen if t not in skip]
    print(f"\nrunning {len(chosen)} tests")
    failures = []
    poisoned = False
    for t in chosen:
        what = behaviour(exe, t)
        why = load_cuda(need_blas=(exe == "cuda_model" or t == "matmul_matches_cpu"))
        if why is None and poisoned:
            why = "CUDA: synchronize: CUDA_ERROR_ILLEGAL_ADDRESS (sticky, from an earlier launch)"
        if why is None and what == "hang":
            sys.stdout.flush()
            time.sleep(3600)
        if why is None and what == "poison":
            poisoned = True
            why = "CUDA: synchronize: CUDA_ERROR_ILLEGAL_ADDRESS, an illegal memory access was encountered"
        if why is None and what == "fail":
            why = "loss differs: gpu 0.6931 cpu 0.6925 (rtol 1e-4)"
        print(f"test {t} ... {'ok' if why is None else 'FAILED'}")
        if why is not None:
            failures.append((t, why))
    if failures:
        print("\nfailures:\n")
        for t, why in failures:
            print(f"---- {t} stdout ----\n\nthread '{t}' (4242) panicked at tests/{exe}.rs:83:13:\n{why}\n")
        print("\nfailures:")
        for t, _ in failures:
            print(f"    {t}")
    passed = len(chosen) - len(failures)
    status = "FAILED" if failures else "ok"
    print(
        f"\ntest result: {status}. {passed} passed; {len(failures)} failed; 0 ignored; "
        f"0 measured; {len(tests) - len(chosen)} filtered out; finished in 0.02s\n"
    )
    return 101 if failures else 0


def bench(name, args):
    mark(name, args)
    if "--bench" not in args:
        print(f"fake {name}: without --bench it reruns itself on the emulated device")
        return 96
    why = load_cuda(need_blas=True)
    if why:
        print(f"{name}: {why}")
        return 1
    if name == "kernels":
        for i in range(40):
            print(f"lab noise {i}: embedding_forward [8,512,768] err 1.2e-07  12.0 us  900 GB/s")
        print("copy 1 GiB: 4300 GB/s; cuBLAS SGEMM 8192^3: 51.0 TFLOP/s; bf16 GEMM 8192^3: 780.0 TFLOP/s")
        print("\nceilings: copy 4300 GB/s (read + write), SGEMM 51.0 TFLOP/s, bf16 GEMM 780.0 TFLOP/s")
        print("kernel lab: every kernel matches its CPU twin")
    else:
        return step_bench(args)
    return 0


def step_bench(args):
    """benches/gpu_step.rs --bench [--models bert,llama,deberta]: each model's lines."""
    models = ["bert", "llama", "deberta"]
    if "--models" in args:
        models = args[args.index("--models") + 1].split(",")
        unknown = [m for m in models if m not in ("bert", "llama", "deberta")]
        if unknown:
            print(f"gpu_step: --models: unknown model '{unknown[0]}'; expected some of bert,llama,deberta")
            return 2
    for model in models:
        what = behaviour("gpu_step", model)
        if what == "hang":
            time.sleep(3600)
        if what == "fail":
            print(f"bf16 {model}: the first step")
            print(
                f'gpu_step: error: CUDA: synchronize: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal '
                f'memory access was encountered") in {model}\'s step'
            )
            return 1
    if "bert" in models:
        print("bert-base reward model: 109483009 parameters")
    if "deberta" in models:
        print("deberta-v3-base-shape reward model: 184422913 parameters")
    for dtype, ms in [("bf16", 61.0), ("f32", 190.0)]:
        if "bert" in models:
            print(f"{dtype} all pairs: 8 sequences of 512, 28 pairs")
            for s in range(5):
                print(f"  step {s + 1}: {ms:.1f} ms  loss 0.69310  grad norm 1.0000")
            print(f"rcx {dtype} step: all pairs {ms:.1f} ms, pair-duplicated {ms * 6:.1f} ms (6.00x)")
            print(
                f'{{"bench": "rcx_gpu_step", "dtype": "{dtype}", "all_pairs_ms": {ms:.3f}, '
                f'"pair_duplicated_ms": {ms * 6:.3f}, "ratio": 6.000, "all_pairs_loss": 0.693100, '
                f'"pair_duplicated_loss": 0.693100}}'
            )
        if "llama" in models:
            print(
                f"rcx llama {dtype} step: shared prefix {ms * 2:.1f} ms, whole sequences "
                f"{ms * 5:.1f} ms (2.50x), rows 1408 vs 4096"
            )
            print(
                f'{{"bench": "rcx_gpu_decoder_step", "model": "llama-1b-shape", "dtype": "{dtype}", '
                f'"shared_prefix_ms": {ms * 2:.3f}, "whole_sequences_ms": {ms * 5:.3f}, "ratio": 2.500, '
                f'"shared_prefix_rows": 1408, "whole_sequences_rows": 4096, '
                f'"shared_prefix_first_loss": -3.100000, "whole_sequences_first_loss": -3.100000}}'
            )
        if "deberta" in models:
            deberta_ms = {"bf16": 120.0, "f32": 400.0}[dtype]
            print(f"{dtype} deberta: deberta-v3-base-shape with 8 sequences of 512, 28 pairs")
            print(
                f"rcx deberta {dtype} step: {deberta_ms:.1f} ms (median of 5), 8 sequences of 512, "
                "first loss -16.90855"
            )
            print(
                f'{{"bench": "rcx_gpu_deberta_step", "model": "deberta-v3-base-shape", "dtype": "{dtype}", '
                f'"params": 184422913, "step_ms": {deberta_ms:.3f}, "steps": 5, "sequences": 8, "t": 512, '
                f'"first_loss": -16.908550, "last_loss": -16.501230}}'
            )
    return 0


def write_safetensors(path, tensors):
    """A safetensors file of F32 tensors: the header's length, the header, the data."""
    header, data = {}, b""
    for name, values in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [len(data), len(data) + 4 * len(values)]}
        data += struct.pack(f"<{len(values)}f", *values)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def rcx_train(args):
    """rcx train CONFIG [--quiet] [--nproc N --dist-timeout S]: bert-tiny's checkpoints, with
    the ranks' weights off the one process's by a summation order's 3e-6."""
    mark("rcx", args)
    config = {}
    with open(args[1]) as f:
        for line in f:
            key, _, value = line.partition(":")
            config[key.strip()] = value.strip()
    mark("rcx-config", [f"{k}={config.get(k)}" for k in ("model_name", "device", "zero_stage", "max_steps")])
    if config.get("device") != "cuda":
        print(f"fake rcx: device is {config.get('device')}, expected cuda", file=sys.stderr)
        return 94
    why = load_cuda(need_blas=True)
    if why:
        print(f"rcx: error: {why}", file=sys.stderr)
        return 1
    if config.get("datasets") == "[kjv-jargon]":
        shipped = os.path.join(os.environ.get("RCX_DATA_DIR", "/nonexistent"), "kjv-jargon", "train.jsonl")
        if not os.path.exists(shipped):
            print(f"rcx: error: datasets[0]: {shipped}: no such file", file=sys.stderr)
            return 2
    nproc = int(args[args.index("--nproc") + 1]) if "--nproc" in args else 1
    if nproc > 1:
        if "--dist-timeout" not in args:
            print("fake rcx: --nproc without --dist-timeout: a lost rank would hang for 300 s", file=sys.stderr)
            return 93
        try:
            ctypes.CDLL("libnccl.so")
        except OSError as e:
            print(f"[rank 0] rcx: error: NCCL: libnccl.so cannot be loaded: {e}", file=sys.stderr)
            return 1
        if behaviour("rcx", "rank1") == "fail":
            print("[rank 1] rcx: error: NCCL all-reduce: unhandled system error (ncclSystemError)", file=sys.stderr)
            print("rcx: rank 1 exited with code 1", file=sys.stderr)
            print(f"rcx: error: training on {nproc} processes failed (exit code 1)", file=sys.stderr)
            return 1
    out = config["output_dir"]
    start = [((i * 37) % 101) / 101.0 - 0.5 for i in range(512)]
    drift = 0.0
    if nproc > 1:
        drift = 3e-6
    if config.get("zero_stage") == "1" and behaviour("rcx", "zero1") == "drift":
        drift = 1e-3
    step1 = {"bert.pooler.dense.weight": start, "classifier.weight": start[:128]}
    step2 = {name: [v + 5e-4 + drift * (i % 2) for i, v in enumerate(values)] for name, values in step1.items()}
    write_safetensors(os.path.join(out, "checkpoint-1", "model.safetensors"), step1)
    write_safetensors(os.path.join(out, "checkpoint-2", "model.safetensors"), step2)
    write_safetensors(os.path.join(out, "model.safetensors"), step2)
    return 0


def torch_bench(args):
    if "--budget-s" not in args:
        print("fake torch bench: no --budget-s")
        return 95
    medians = {
        "fp32-eager": 300.0,
        "bf16-eager": 95.0,
        "llama-bf16-eager": 400.0,
        "deberta-bf16-eager": 150.0,
        "deberta-fp32-eager": 320.0,
    }
    for mode, ms in medians.items():
        print(f'{{"bench": "torch_gpu_step", "mode": "{mode}", "median_ms": {ms}, "min_ms": {ms - 1}}}')
    print('{"bench": "torch_gpu_step", "mode": "bf16-compile", "skipped": "budget spent (200 s)"}')
    print(f'{{"bench": "torch_gpu_step_summary", "median_ms": {json.dumps(medians)}, "total_s": 41.0}}')
    return 0


def main():
    role, args = sys.argv[1], sys.argv[2:]
    sys.stdout.reconfigure(line_buffering=True)
    if role == "nvidia-smi":
        return nvidia_smi(args)
    if role == "compute-sanitizer":
        return sanitizer(args)
    if role in TESTS:
        return test_executable(role, args)
    if role in ("kernels", "gpu_step"):
        return bench(role, args)
    if role == "torch":
        return torch_bench(args)
    if role == "rcx" and args[:1] == ["train"]:
        return rcx_train(args)
    if role == "rcx":
        mark(role, args)
        print("Reward models trained on ranked preferences\n\nUsage: rcx <COMMAND>")
        return 0
    print(f"gpu-check-fakes: unknown role {role}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
