"""Native CPU kernels (csrc/*.cpp), built once per CPU, and CPU runtime tuning.

The kernels:
- paged decode attention, KV writes and gathers (csrc/paged_attention_cpu.cpp) and paged prefill
  attention (csrc/prefill_attention_cpu.cpp), used by the `cpu` attention backend;
- fused elementwise steps of the decoder (csrc/cpu_ops.cpp): RMS norm with the residual add,
  rotary embedding in place, SiLU-and-multiply. Each replaces several PyTorch ops that would
  each read and write the whole activation.

Building (with the machine's C++ compiler, through PyTorch's extension builder) takes about a
minute on 2 cores, so it belongs to installation, not to a server's start:

    python -m lmserve.engine.kernels build     # `make install` runs it; so should an image build

Where builds live: `$LMSERVE_KERNELS_DIR` if set, else `lmserve/` under PyTorch's extension cache
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`). Each build is a directory named
`lmserve_kernels_<build digest>_<CPU key>`, complete once its `build.json` exists:
- the build digest covers the sources, the compiler flags, the torch and Python versions;
- the CPU key covers the instruction sets this CPU has among those the build may use
  (`ISA_OPTIONS`). The build is compiled for exactly those (`-mavx2 -mfma ...`, never
  `-march=native`, which would also use whatever else the build machine has), so a cache or an
  image shared between different CPUs holds one build per kind of CPU and never loads another
  CPU's build.
Invariant: a server loads the build of its own digest and CPU key or builds it (once, logged, the
first start on a machine where the install step did not run); without a compiler it falls back to
the PyTorch attention path with one warning (attention/__init__.py).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger("lmserve.engine")
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "paged_attention_cpu.cpp", CSRC / "prefill_attention_cpu.cpp", CSRC / "cpu_ops.cpp"]
# -fopenmp: at::parallel_for only runs on several threads in code compiled with OpenMP.
CFLAGS = ["-O3", "-fopenmp"]
# x86 instruction sets the kernels' code can use, as /proc/cpuinfo names them, and the GCC/Clang
# option that lets the compiler use each (all known to GCC >= 10 and Clang >= 9).
ISA_OPTIONS = {
    "pni": "-msse3", "ssse3": "-mssse3", "sse4_1": "-msse4.1", "sse4_2": "-msse4.2", "popcnt": "-mpopcnt",
    "avx": "-mavx", "avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c", "bmi1": "-mbmi", "bmi2": "-mbmi2",
    "abm": "-mlzcnt", "movbe": "-mmovbe", "avx512f": "-mavx512f", "avx512dq": "-mavx512dq",
    "avx512cd": "-mavx512cd", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl",
    "avx512_vnni": "-mavx512vnni", "avx512_bf16": "-mavx512bf16",
}
_MARKER = "build.json"


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded here."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of this machine's first CPU (x86 `flags`, Arm `Features`); empty where
    /proc/cpuinfo is missing."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def isa_options(flags: frozenset[str]) -> list[str]:
    """The compiler options of the instruction sets in `flags` (none on CPUs other than x86)."""
    return [option for flag, option in ISA_OPTIONS.items() if flag in flags]


def cpu_key(flags: frozenset[str], machine: str | None = None) -> str:
    """8 hex digits naming what a build for a CPU with `flags` may use: equal for two CPUs exactly
    when the same build runs on both."""
    machine = machine or platform.machine()
    used = sorted(flag for flag in flags if flag in ISA_OPTIONS)
    return hashlib.blake2b(" ".join([machine, *used]).encode(), digest_size=4).hexdigest()


@dataclass(frozen=True)
class KernelBuild:
    """One build of the kernels: its extension module name, directory and compiler flags."""

    name: str
    directory: Path
    cflags: list[str]
    flags: frozenset[str]

    @property
    def complete(self) -> bool:
        return (self.directory / _MARKER).is_file()


def kernels_dir() -> Path:
    """Where builds live: $LMSERVE_KERNELS_DIR, else lmserve/ in PyTorch's extension cache."""
    if os.environ.get("LMSERVE_KERNELS_DIR"):
        return Path(os.environ["LMSERVE_KERNELS_DIR"])
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "lmserve"


def current_build(flags: frozenset[str] | None = None) -> KernelBuild:
    """The build for this CPU (or for one with `flags`), of these sources, torch and Python."""
    flags = cpu_flags() if flags is None else flags
    cflags = CFLAGS + isa_options(flags)
    files = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))
    versions = f"{torch.__version__} {sys.implementation.cache_tag} {' '.join(cflags)}"
    digest = hashlib.blake2b(b"".join(f.read_bytes() for f in files) + versions.encode(), digest_size=4)
    name = f"lmserve_kernels_{digest.hexdigest()}_{cpu_key(flags)}"
    return KernelBuild(name, kernels_dir() / name, cflags, flags)


@cache
def load_kernels() -> ModuleType:
    """The kernels built for this CPU, built first (about a minute, logged) where the install step
    did not build them; raises KernelBuildError where they cannot be built or loaded."""
    build = current_build()
    if build.complete:
        try:
            module = _import_built(build)
            logger.info("CPU kernels: loaded %s", build.directory)
            return module
        except ImportError as exc:
            logger.warning("CPU kernels: cannot load %s (%s); building them again", build.directory, exc)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no CPU kernels built for this CPU in {build.directory.parent} and no C++ "
                               f"compiler ({compiler!r} not found) to build them; install g++ and run "
                               "`python -m lmserve.engine.kernels build`")
    logger.info("CPU kernels: building them for this CPU into %s (about a minute on 2 cores, once; "
                "`python -m lmserve.engine.kernels build` does it at install time)", build.directory)
    try:
        return build_kernels(build)
    except Exception as exc:  # headers missing, unsupported flags, directory not writable...
        reason = " ".join(str(exc).split())[:300]
        raise KernelBuildError(f"cannot build the CPU kernels into {build.directory}: {reason}") from None


def _import_built(build: KernelBuild) -> ModuleType:
    """Imports a complete build's module straight from its file: no compiler, no write."""
    path = build.directory / f"{build.name}.so"
    loader = importlib.machinery.ExtensionFileLoader(build.name, str(path))
    spec = importlib.util.spec_from_file_location(build.name, path, loader=loader)
    if spec is None:
        raise ImportError(f"no module in {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build_kernels(build: KernelBuild) -> ModuleType:
    """Compiles `build` (PyTorch's builder locks its directory: concurrent builders wait for the
    first), marks it complete and imports it."""
    build.directory.mkdir(parents=True, exist_ok=True)
    module = compile_kernels(CSRC, build.name, build.directory, build.cflags)
    info = {"cflags": build.cflags, "cpu_flags": sorted(build.flags & ISA_OPTIONS.keys()),
            "torch": torch.__version__, "python": sys.version.split()[0]}
    partial = build.directory / f"{_MARKER}.{os.getpid()}"
    partial.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(partial, build.directory / _MARKER)  # readers see no marker or a whole one
    return module


def compile_kernels(source_dir: Path, name: str, build_directory: Path | None = None,
                    cflags: list[str] | None = None) -> ModuleType:
    """Builds the sources of `SOURCES`, as found in `source_dir`, into the extension module `name`
    (in `build_directory`, default PyTorch's cache; PyTorch reuses an earlier build of the same name
    and sources) with `cflags` (default: for this CPU) and imports it."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    return load(
        name=name,
        sources=[str(source_dir / s.name) for s in SOURCES],
        extra_cflags=CFLAGS + isa_options(cpu_flags()) if cflags is None else cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=None if build_directory is None else str(build_directory),
        verbose=False,
    )


def _ninja_on_path() -> None:
    """PyTorch builds with the `ninja` program; the `ninja` package ships one, which is not on PATH
    when python is run from a virtual environment without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # load() then reports that ninja is missing
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def use_native_kernels(model: Any, kernels: ModuleType | None) -> int:
    """Hands the kernels to every layer of the model (an nn.Module) that can use them (None: back
    to PyTorch ops); returns how many layers took them."""
    count = 0
    for module in model.modules():
        if hasattr(module, "native_kernels"):
            setattr(module, "native_kernels", kernels)  # noqa: B010 (typed per class)
            count += 1
    return count


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = (libc.mallopt, libc.madvise)  # AttributeError where they are missing
    except (OSError, AttributeError):
        return None
    return libc


@cache
def tune_malloc() -> bool:
    """Keeps freed activation buffers in the process instead of handing them back to the kernel.

    glibc serves allocations above a (dynamic) threshold with fresh `mmap`s and unmaps them when
    freed, so every step's activations page-fault again from zero-filled pages: on a CPU that is
    over a million page faults and several seconds of system time per thousand-request batch.
    Raising the mmap and trim thresholds makes the heap keep and reuse those pages. Returns False
    where the C library is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1  # glibc's largest allowed value
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 64 * 2**20) == 1
    if not ok:
        logger.warning("could not tune malloc thresholds; CPU steps may spend time in page faults")
    return ok


_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 * 2**20


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory the kernel is asked to back with 2 MiB pages.

    Paged attention reads each sequence's blocks from scattered addresses; with 4 KiB pages
    nearly every block is a TLB miss. Where transparent huge pages are in `madvise` mode (a common
    default) memory gets them only when asked, before it is first touched.
    """
    tensor = torch.empty(shape, dtype=dtype)
    start = tensor.data_ptr()
    aligned = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (start + tensor.numel() * tensor.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    libc = _libc()
    if end > aligned and libc is not None:  # elsewhere: ordinary pages
        libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), _MADV_HUGEPAGE)
    return tensor.zero_()


def main(argv: list[str] | None = None) -> int:
    """`build`: builds the kernels for this CPU unless built (exit 1 where they cannot be);
    `clean`: removes every lmserve kernel build from the kernels directory; `where`: prints the
    directory of this CPU's build."""
    parser = argparse.ArgumentParser(prog="python -m lmserve.engine.kernels",
                                     description="lmserve's C++ CPU kernels (see lmserve/engine/kernels.py).")
    parser.add_argument("command", choices=["build", "clean", "where"])
    command = parser.parse_args(argv).command
    build = current_build()
    if command == "where":
        print(build.directory)
    elif command == "clean":
        removed = sorted(kernels_dir().glob("lmserve_kernels_*"))
        for path in removed:
            shutil.rmtree(path)
        print(f"removed {len(removed)} CPU kernel build(s) from {kernels_dir()}")
    else:
        start = time.monotonic()
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            load_kernels()
        except KernelBuildError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"CPU kernels for this CPU ready in {build.directory} ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
