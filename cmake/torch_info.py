"""Print the facts CMake needs about the installed torch as `set(...)` lines.

We query torch directly instead of `find_package(Torch)`: on machines with a minimal CUDA
toolkit that config fails to find CUDA and nvrtc (see BUILD-NOTES), and we need none of it.
"""
import os
import re
import sys

import torch


def cmake_list(items):
    return ";".join(str(i).replace("\\", "/") for i in items)


def main() -> None:
    torch_dir = os.path.dirname(torch.__file__)
    includes = [os.path.join(torch_dir, "include"),
                os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]
    # torch's CUDA headers include cusparse.h / cublas_v2.h: with a pip-installed CUDA
    # runtime these live in site-packages/nvidia/*/include, not in the toolkit.
    site = os.path.dirname(torch_dir)
    nvidia = os.path.join(site, "nvidia")
    if os.path.isdir(nvidia):
        for root, dirs, _ in os.walk(nvidia):
            if os.path.basename(root) == "include":
                if any(os.path.exists(os.path.join(root, h)) for h in ("cublas_v2.h", "cusparse.h")):
                    includes.append(root)
                dirs[:] = []
    cxx_std = 17
    config = os.path.join(torch_dir, "share", "cmake", "Torch", "TorchConfig.cmake")
    if os.path.exists(config):
        m = re.search(r"CXX_STANDARD\s+(\d+)", open(config).read())
        if m:
            cxx_std = int(m.group(1))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    print(f'set(TORCH_VERSION "{torch.__version__}")')
    print(f'set(TORCH_CUDA_VERSION "{torch.version.cuda or ""}")')
    print(f'set(TORCH_INCLUDE_DIRS "{cmake_list(includes)}")')
    print(f'set(TORCH_LIBRARY_DIR "{os.path.join(torch_dir, "lib")}")')
    print(f'set(TORCH_CXX11_ABI {abi})')
    print(f'set(TORCH_CXX_STANDARD {cxx_std})')


if __name__ == "__main__":
    sys.exit(main())
