#!/usr/bin/env python3
"""Compile every kernels/*.cu with NVRTC for sm_80 and sm_90 and report registers, spills and
shared memory per kernel. Exit status 1 on any compile error or any register spill.

NVRTC comes from the PyPI wheels (no CUDA toolkit, no GPU needed):
    pip install nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
libnvrtc.so.12 is loaded with ctypes from site-packages/nvidia/cuda_nvrtc/lib and cuda_fp16.h is
taken from site-packages/nvidia/cuda_runtime/include. Compiling to CUBIN (-arch=sm_XX) runs ptxas,
whose -v report (registers, stack, spill stores/loads, smem) lands in the program log.

Usage: python3 scripts/check_kernels.py [--arch sm_80,sm_90] [kernels/foo.cu ...]
The NVRTC options here match src/backend/cuda/nvrtc.rs (the runtime compile), so what CI checks
is what the server loads.
"""
import argparse
import ctypes
import glob
import os
import re
import site
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keep in step with NVRTC_OPTIONS in src/backend/cuda/nvrtc.rs.
COMMON_OPTS = ["--std=c++17", "-default-device"]


def site_dirs():
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs.append(sysconfig.get_paths()["purelib"])
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def find(rel_glob):
    for d in site_dirs():
        hits = sorted(glob.glob(os.path.join(d, rel_glob)))
        if hits:
            return hits[0]
    return None


def load_nvrtc():
    lib = os.environ.get("NVRTC_LIB") or find("nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
    if lib is None:
        sys.exit("libnvrtc.so.12 not found: pip install nvidia-cuda-nvrtc-cu12==12.9.86 "
                 "nvidia-cuda-runtime-cu12==12.9.79")
    inc = os.environ.get("CUDA_INCLUDE") or (
        os.path.dirname(find("nvidia/cuda_runtime/include/cuda_fp16.h") or ""))
    if not inc or not os.path.isfile(os.path.join(inc, "cuda_fp16.h")):
        sys.exit("cuda_fp16.h not found: pip install nvidia-cuda-runtime-cu12==12.9.79")
    return ctypes.CDLL(lib), lib, inc


def compile_one(nvrtc, inc, path, arch):
    """Returns (ok, log)."""
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(),
                                  0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = COMMON_OPTS + [f"--gpu-architecture={arch}", "--ptxas-options=-v", f"-I{inc}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value + 1)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    ok = rc == 0
    if ok:
        csize = ctypes.c_size_t()
        ok = nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(csize)) == 0 and csize.value > 0
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log


FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(.*)")
SMEM = re.compile(r"(\d+) bytes smem")


def parse(log):
    """ptxas -v report -> [(kernel, regs, stack, spill_st, spill_ld, smem)]."""
    rows, cur = [], None
    for line in log.splitlines():
        m = FUNC.search(line)
        if m:
            cur = {"name": m.group(1), "regs": 0, "stack": 0, "st": 0, "ld": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
        m = USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = SMEM.search(m.group(2))
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
    if not files:
        sys.exit("no kernels/*.cu found")
    nvrtc, lib, inc = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value} ({lib})")
    failures = []
    print(f"{'file':<22} {'kernel':<22} {'arch':<6} {'regs':>4} {'stack':>5} "
          f"{'spill st':>8} {'spill ld':>8} {'smem':>6}")
    for path in files:
        name = os.path.basename(path)
        for arch in a.arch.split(","):
            ok, log = compile_one(nvrtc, inc, path, arch)
            if not ok:
                failures.append(f"{name} [{arch}]: compile error")
                print(f"{name:<22} COMPILE ERROR for {arch}\n{log}")
                continue
            rows = parse(log)
            if not rows:
                failures.append(f"{name} [{arch}]: no ptxas report in the log")
            for r in rows:
                flag = ""
                if r["st"] or r["ld"]:
                    flag = "  <-- SPILL"
                    failures.append(f"{name} {r['name']} [{arch}]: spills "
                                    f"{r['st']} B stores / {r['ld']} B loads")
                print(f"{name:<22} {r['name']:<22} {arch:<6} {r['regs']:>4} {r['stack']:>5} "
                      f"{r['st']:>8} {r['ld']:>8} {r['smem']:>6}{flag}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall {len(files)} kernel files compile for {a.arch} with zero spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
