"""Native CPU kernels (csrc/*.cpp), compiled on first use, and CPU runtime tuning.

The kernels are built with the machine's C++ compiler through PyTorch's extension loader and
cached by PyTorch (`~/.cache/torch_extensions`), so later starts load them in about a second:
- paged decode attention, KV writes and gathers (csrc/paged_attention_cpu.cpp) and paged prefill
  attention (csrc/prefill_attention_cpu.cpp), used by the `cpu` attention backend;
- fused elementwise steps of the decoder (csrc/cpu_ops.cpp): RMS norm with the residual add,
  rotary embedding in place, SiLU-and-multiply. Each replaces several PyTorch ops that would
  each read and write the whole activation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger("lmserve.engine")
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "paged_attention_cpu.cpp", CSRC / "prefill_attention_cpu.cpp", CSRC / "cpu_ops.cpp"]
# -fopenmp: at::parallel_for only runs on several threads in code compiled with OpenMP.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded here."""


@cache
def load_kernels() -> ModuleType:
    """Compiles (once per machine) and loads the C++ kernels; raises KernelBuildError."""
    # The sources' and flags' hash in the name: two lmserve versions on one machine each keep their own
    # build instead of rebuilding over each other at every start.
    files = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))
    digest = hashlib.blake2b(b"".join(f.read_bytes() for f in files) + " ".join(CFLAGS).encode(), digest_size=4)
    try:
        return compile_kernels(CSRC, f"lmserve_cpu_kernels_{digest.hexdigest()}")
    except Exception as exc:  # compiler missing, headers missing, unsupported flags...
        reason = " ".join(str(exc).split())[:300]
        raise KernelBuildError(f"cannot build the CPU kernels: {reason}") from None


def compile_kernels(source_dir: Path, name: str) -> ModuleType:
    """Builds the sources of `SOURCES`, as found in `source_dir`, into the extension module `name`
    (PyTorch reuses an earlier build of the same name and sources) and imports it."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    return load(
        name=name,
        sources=[str(source_dir / s.name) for s in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
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
