"""One OpenMP thread pool at a time: what lets a worker thread run torch at full speed.

torch's CPU kernels run on OpenMP (GNU libgomp on Linux). libgomp gives every thread that starts
a parallel region its own pool of helper threads, and keeps it. When a process holds more libgomp
threads than the machine has CPUs, libgomp stops spinning between parallel regions (about 100
spins instead of about 3 ms) and puts its helpers to sleep after each one, so every small
operator pays a futex wake-up. The server hits exactly this: the models are loaded on the main
thread (one pool) and run on the worker thread (a second pool). Measured on a 2-core Intel Xeon
(q4k target, 2 threads; `python experiments/omp_pools.py`): one target forward over 8 rows took
122 ms on the thread that loaded the model, 199 ms on another thread, and 121 ms on that other
thread once the loading thread's pool was released (`omp_pause_resource_all`; docs/server.md,
"Threads").

`release_pool()` hands the CPUs over: the calling thread frees its pool, and with `serial=True`
it also runs its own future torch work on one thread (torch's kernels, oneDNN and MKL), so it
makes no new pool.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("adaspec")


def _loaded(name: str, symbol: str) -> ctypes.CDLL | None:
    """The shared library this process has loaded whose file name contains `name`, if it has `symbol`."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if name in line.rsplit("/", 1)[-1]), None)
        lib = ctypes.CDLL(path) if path else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, symbol) else None


def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process has loaded (torch's), or None (another runtime, another OS)."""
    return _loaded("libgomp", "omp_pause_resource_all")


def release_pool(*, serial: bool = False) -> bool:
    """Free the calling thread's OpenMP thread pool; serial=True also limits this thread's own
    OpenMP regions to one thread from now on (other threads keep their setting). True when done,
    False where the process does not run on GNU OpenMP (nothing to do there)."""
    lib = _libgomp()
    if lib is None:
        return False
    import torch

    torch.get_num_threads()  # torch sets a thread's OpenMP thread count at its first use: before ours
    if lib.omp_pause_resource_all(1) != 0:  # omp_pause_soft; non-zero: inside a parallel region
        log.warning("could not release this thread's OpenMP pool (omp_pause_resource_all failed)")
        return False
    if serial:
        lib.omp_set_num_threads(1)  # torch's own kernels and oneDNN follow this thread's OpenMP setting
        mkl = _loaded("libtorch_cpu", "MKL_Set_Num_Threads_Local")
        if mkl is not None:  # MKL (matmuls) keeps a count of its own
            mkl.MKL_Set_Num_Threads_Local(1)  # the C entry point (the lower-case one is Fortran's)
    return True
