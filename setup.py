"""Build entry for spanet and spanet_ops.

The native extension ``spanet_ops._C`` is built from ``csrc/`` by CMake (see
CMakeLists.txt) with the Ninja generator, against the torch installed in the
environment; install with ``pip install --no-build-isolation -e .`` (a plain
``pip install -e .`` also works: the build then uses the environment's torch).

Build knobs (environment variables; none depends on ``torch.cuda.is_available()``):

* ``SPANET_CUDA_ARCHS`` — CUDA architectures, e.g. ``"80;90"`` (default),
  ``"8.0 9.0"``, ``"sm_90a"``: SASS for each, plus PTX of the highest (CMakeLists.txt),
  which newer GPUs compile at load; ``spanet_ops._C.cuda_arch_problem(major, minor)``
  says whether a device is covered.
* ``SPANET_CPU_ONLY=1`` — skip the CUDA kernels even where they could be built.
* ``SPANET_CPU_ARCH`` — ``-march`` of the CPU kernels (default ``native``;
  empty for the compiler's default, e.g. to build a portable wheel).
* ``SPANET_DEBUG=1`` — a debug build (``-O0 -g``).
* ``SPANET_BUILD_JOBS`` (or ``MAX_JOBS``) — parallel compile jobs.
* ``SPANET_BUILD_NATIVE=0`` — install without the extension (the PyTorch
  kernels are used).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90"


def _env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


class NativeBuildError(RuntimeError):
    """The native extension could not be built; the message says why and what to do."""


def _import_torch():
    """The environment's torch, also from inside pip's isolated build environment."""
    try:
        import torch
    except ImportError:
        # Build isolation hides the installing environment's packages; torch must not
        # come from PyPI into the build (it would not match), so use the environment's own.
        for key in ("platlib", "purelib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        try:
            import torch
        except ImportError as exc:
            raise NativeBuildError(
                "spanet_ops: building the native extension needs torch installed in this environment "
                "(install torch first, then `pip install --no-build-isolation -e .`; or set "
                "SPANET_BUILD_NATIVE=0 to install without the native kernels)"
            ) from exc
    return torch


def _tool(module: str, attribute: str, name: str) -> str:
    """Path of the ``cmake``/``ninja`` executable: from its PyPI package, else from PATH."""
    try:
        directory = getattr(__import__(module), attribute)
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise NativeBuildError(
            f"spanet_ops: `{name}` was not found; install it (`pip install {name}`, pinned in requirements.txt)"
        )
    return found


def _find_cuda_root():
    """The CUDA toolkit root (``bin/nvcc`` and ``include/`` inside): CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return root
    return None


def _cuda_choice(torch):
    """``(build_cuda, toolkit_root, reason)``: CUDA kernels build for a CUDA torch whenever nvcc is found."""
    if _env_flag("SPANET_CPU_ONLY"):
        return False, None, "not compiled: SPANET_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, None, f"not compiled: torch {torch.__version__} is not a CUDA build"
    root = _find_cuda_root()
    if root is None:
        return False, None, "not compiled: nvcc not found (set CUDA_HOME)"
    return True, root, "built"


def _cuda_archs() -> str:
    """``SPANET_CUDA_ARCHS`` normalised to CMake's ``80;90a`` form (CMake adds PTX of the highest)."""
    raw = os.environ.get("SPANET_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([a-z]?)", item)
        if match is None:
            raise NativeBuildError(f"SPANET_CUDA_ARCHS: cannot read {item!r} (expected e.g. 80, 8.0, sm_90a)")
        archs.append("".join(match.groups()))
    if not archs:
        raise NativeBuildError("SPANET_CUDA_ARCHS is empty; set SPANET_CPU_ONLY=1 to build without CUDA")
    return ";".join(archs)


def _drop_stale_cache(build_dir: str, nvcc) -> None:
    """Remove a build tree configured with another CUDA compiler (CMake would reset its cache and lose our options)."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if nvcc is None or not os.path.isfile(cache):
        return
    with open(cache) as f:
        for line in f:
            if line.startswith("CMAKE_CUDA_COMPILER:") and line.split("=", 1)[1].strip() != nvcc:
                shutil.rmtree(build_dir)
                return


class CMakeExtension(Extension):
    """An extension built by the top-level CMakeLists.txt."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the CMake project with Ninja, writing the module where setuptools expects it."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        torch = _import_torch()
        import pybind11

        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise NativeBuildError(
                f"spanet_ops: no C++ compiler (`{cxx}` not found); install g++ (e.g. `apt-get install g++`) "
                "or set CXX, or set SPANET_BUILD_NATIVE=0 to install without the native kernels"
            )
        cmake, ninja = _tool("cmake", "CMAKE_BIN_DIR", "cmake"), _tool("ninja", "BIN_DIR", "ninja")
        build_cuda, cuda_root, cuda_reason = _cuda_choice(torch)
        build_type = "Debug" if _env_flag("SPANET_DEBUG") else "Release"
        jobs = os.environ.get("SPANET_BUILD_JOBS") or os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        # A persistent build tree (gitignored build/) keeps rebuilds incremental.
        build_dir = os.path.join(ROOT, "build", f"native-{build_type.lower()}{'-cuda' if build_cuda else ''}")
        _drop_stale_cache(build_dir, os.path.join(cuda_root, "bin", "nvcc") if build_cuda else None)
        os.makedirs(build_dir, exist_ok=True)
        args = [
            cmake, "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSPANET_OUTPUT_DIR={output_dir}",
            f"-DSPANET_TORCH_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            f"-DSPANET_CUDA={'ON' if build_cuda else 'OFF'}",
            f"-DSPANET_CUDA_REASON={cuda_reason}",
            f"-DSPANET_CPU_ARCH={os.environ.get('SPANET_CPU_ARCH', 'native')}",
        ]
        if build_cuda:
            args += [
                f"-DSPANET_CUDA_ARCHS={_cuda_archs()}",
                f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_root, 'bin', 'nvcc')}",
                f"-DCUDAToolkit_ROOT={cuda_root}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}",  # torch's config still uses FindCUDA
            ]
        print(f"spanet_ops: building the native extension ({build_type}, CUDA: {cuda_reason})", flush=True)
        for step in (args, [cmake, "--build", build_dir, "-j", jobs]):
            try:
                subprocess.run(step, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise NativeBuildError(
                    f"spanet_ops: the native build failed at `{' '.join(step[:4])} ...` ({exc}); see the "
                    "compiler output above. Set SPANET_CPU_ONLY=1 to skip the CUDA kernels, or "
                    "SPANET_BUILD_NATIVE=0 to install without the native kernels."
                ) from exc


# The metadata (name, version, dependencies, extras, console scripts, package data) is in
# pyproject.toml; this file adds the native extension and the CMake step that builds it.
setup(
    ext_modules=[CMakeExtension("spanet_ops._C")] if _env_flag("SPANET_BUILD_NATIVE", "1") else [],
    cmdclass={"build_ext": CMakeBuild},
)
