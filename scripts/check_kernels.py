#!/usr/bin/env python3
"""Compiles every kernels/*.cu with NVRTC, as the `cuda` feature does at run time: the source
after kernels/common.cuh, no include path, for each target architecture. A kernel that does not
compile fails with NVRTC's log. Needs no GPU and no CUDA toolkit, only libnvrtc (12 or 13), e.g.
from NVIDIA's pip packages or PyTorch's (found on $NVRTC_LIB, or in site-packages' nvidia/*/lib).

    python3 scripts/check_kernels.py [--nvrtc PATH/libnvrtc.so.13]
"""

import ctypes
import glob
import os
import sys

ARCHS = ["sm_80", "sm_90"]  # A100, H100 / H200
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def find_nvrtc():
    if len(sys.argv) == 3 and sys.argv[1] == "--nvrtc":
        return sys.argv[2]
    if os.environ.get("NVRTC_LIB"):
        return os.environ["NVRTC_LIB"]
    for base in sys.path:
        hit = sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so.*")))
        hit = [h for h in hit if "alt" not in h and "builtins" not in h]
        if hit:
            return hit[0]
    sys.exit("libnvrtc not found: pip install nvidia-cuda-nvrtc, or set NVRTC_LIB")


def compile_source(lib, name, source, arch):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) != 0:
        return False, "nvrtcCreateProgram failed"
    opts = [f"--gpu-architecture={arch}", "--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status == 0, log.value.decode(errors="replace").strip()


def main():
    path = find_nvrtc()
    # NVRTC opens its builtins library by name; load the one beside it first, so that no
    # library path has to be set.
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
        if "alt" not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    common = open(os.path.join(ROOT, "kernels", "common.cuh")).read()
    sources = sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
    if not sources:
        sys.exit("no kernels/*.cu")
    failed = 0
    for path in sources:
        name = os.path.basename(path)
        source = common + "\n" + open(path).read()
        for arch in ARCHS:
            ok, log = compile_source(lib, name, source, arch)
            print(f"NVRTC {major.value}.{minor.value} {arch} {name}: {'ok' if ok else 'FAILED'}")
            if log and (not ok or "warning" in log):
                print(log)
            failed += not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
