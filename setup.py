"""Builds adaskip, with its CUDA extension `adaskip._C` compiled through CMake.

The extension is built when a CUDA toolkit and a CUDA build of torch are present (a GPU is not
needed); otherwise the package installs without it and adaskip.ops runs its PyTorch reference.
Environment:
  ADASKIP_CUDA=auto|1|0   auto (default): build if possible; 1: fail if it cannot be built; 0: skip
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;8.9;9.0"
  CUDA_HOME               toolkit root (the folder whose bin/ holds nvcc and lib64/ libcudart)
  ADASKIP_BUILD_DIR       where CMake builds (default build/cmake-<python>-<torch>)
  MAX_JOBS                parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
MODE = os.environ.get("ADASKIP_CUDA", "auto").lower()
if MODE not in ("auto", "1", "0"):
    sys.exit(f"ADASKIP_CUDA must be auto, 1 or 0, got {MODE!r}")


def _has_cudart(root: Path) -> bool:
    return any(any((root / d).glob("libcudart.so*")) for d in ("lib64", "lib", "targets/x86_64-linux/lib"))


def find_cuda_home():
    """The toolkit root; a wrapper script named nvcc on PATH (as on our machines) is not one."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and _has_cudart(Path(c)):
            return Path(c)
    return None


def find_cmake() -> str:
    """The pip `cmake` package's binary if installed (our CMakeLists needs >= 3.26), else PATH's."""
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except (ImportError, AttributeError):
        found = shutil.which("cmake")
        if found is None:
            sys.exit("adaskip: cmake >= 3.26 is needed to build the CUDA extension: pip install cmake")
        return found


def cuda_build_plan():
    """(cuda_home, torch_version) when the extension can be built, else (None, reason)."""
    if MODE == "0":
        return None, "ADASKIP_CUDA=0"
    try:
        import torch
    except ImportError:
        return None, ("torch is not importable in the build environment (with pip's build "
                      "isolation, use `pip install --no-build-isolation .`)")
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to the folder whose bin/ holds nvcc)"
    return cuda_home, torch.__version__


CUDA_HOME, TORCH_OR_REASON = cuda_build_plan()
if CUDA_HOME is None:
    if MODE == "1":
        sys.exit(f"adaskip: ADASKIP_CUDA=1 but the CUDA extension cannot be built: {TORCH_OR_REASON}")
    warnings.warn(f"adaskip: building without the CUDA extension: {TORCH_OR_REASON}")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{TORCH_OR_REASON}"
        build_dir = Path(os.environ.get("ADASKIP_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            find_cmake(), "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={CUDA_HOME / 'bin' / 'nvcc'}",
            f"-DADASKIP_OUTPUT_DIR={out.parent}",
            f"-DADASKIP_OUTPUT_NAME={out.name[: -len(suffix)]}",
            f"-DADASKIP_OUTPUT_SUFFIX={suffix}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja"]
        env = dict(os.environ, CUDA_HOME=str(CUDA_HOME))
        subprocess.run(cfg, check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([find_cmake(), "--build", str(build_dir), "--parallel", jobs], check=True, env=env)
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
        info = ("# Written by setup.py when the CUDA extension was built.\n"
                f"TORCH_VERSION = {TORCH_OR_REASON!r}\nCUDA_ARCH_LIST = {arch!r}\n")
        # Beside the module; for editable installs setuptools copies only the module itself
        # into the source tree, so the source package gets its own copy.
        targets = {out.parent, ROOT / "adaskip"} if getattr(self, "editable_mode", False) or self.inplace else {out.parent}
        for folder in targets:
            (folder / "_build_info.py").write_text(info)


setup(
    ext_modules=[Extension("adaskip._C", sources=[])] if CUDA_HOME is not None else [],
    cmdclass={"build_ext": CMakeBuild},
)
