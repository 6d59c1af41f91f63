"""Process-wide settings for the processes that run the model: XLA flags and glibc's malloc.

They change the whole process, so no import applies them: ``ponder serve``,
``ponder train``, ``ponder generate`` and the other model-running commands
call ``configure_process()`` before JAX starts its backend, as do the
benchmark scripts. A library user who imports ``ponder.model`` keeps their
own process as it was.
"""

import ctypes
import os
import platform
import time


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


def xla_flags() -> list[str]:
    """The XLA flags ponder's processes run with on this machine."""
    # XLA's CPU backend by default copies a buffer that is read and then updated
    # in place within one computation; for the KV cache that is every layer's
    # cache on every decode step (3x slower single-stream decode at 1024 slots).
    # Region analysis proves the update safe in place.
    flags = ["--xla_cpu_copy_insertion_use_region_analysis=true"]
    # On a CPU with AVX-512, XLA still emits its own loop fusions with 256-bit
    # vectors. A one-token decode step of `tiny` runs ~80 such fusions (LayerNorm,
    # softmax, GELU, cache updates) around 25 library matrix-vector products;
    # 512-bit vectors made single-stream decode 15-25% faster on an AMD Zen 5 and
    # left the training step as it was (bench/README.md).
    if _has_avx512():
        flags.append("--xla_cpu_prefer_vector_width=512")
    return flags


def _keep_freed_memory() -> None:
    """Makes glibc's malloc reuse freed memory instead of handing it back to the kernel.

    An XLA executable takes its temporary buffers from malloc on every call.
    glibc serves a large request with a fresh ``mmap`` and unmaps it on free,
    so every call page-faults its temporaries in again: an 8-row decode step
    whose attention reads 512 of 1,024 cache slots took 8,209 faults (32 MB)
    and 13 ms per call, against 5 ms once the memory is kept. Serving every
    request from the heap (no ``mmap``) and never trimming it keeps the
    process at its peak footprint, which a server reaches within seconds.
    A user's own ``MALLOC_*`` or ``GLIBC_TUNABLES`` settings win.
    """
    if platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)



class HeapTrimmer:
    """Hands memory that freed arrays leave in malloc's heap back to the kernel, at most every ``interval_s``.

    Under ``_keep_freed_memory`` the heap never shrinks: what evicted
    sessions held stays resident, scattered among live blocks, so a server's
    RSS sat 0.3-0.5 GiB above its warm size plus ``--session-memory``
    (bench/README.md, soak). ``malloc_trim(0)`` releases the free pages
    everywhere in the heap (not only at its top); the next allocations that
    land there fault them in again, so a server calls this only after an
    eviction, and only every few seconds.
    """

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = -float("inf")
        self._trim = ctypes.CDLL(None).malloc_trim if platform.libc_ver()[0] == "glibc" else None

    def __call__(self) -> bool:
        """Trims now unless it did within ``interval_s``; True if it trimmed."""
        now = time.monotonic()
        if self._trim is None or now - self._last < self.interval_s:
            return False
        self._last = now
        self._trim(0)
        return True


def configure_process() -> None:
    """Sets ``xla_flags()`` and the malloc policy of ``_keep_freed_memory``; call it before JAX's first computation.

    The flags are read when the JAX backend starts, so a call after that changes
    nothing for XLA (malloc's policy still applies). A flag already in
    ``XLA_FLAGS`` keeps the user's value.
    """
    for flag in xla_flags():
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    _keep_freed_memory()
