"""The process-wide worker pool (``CPUInfer``) shared by every MoE layer."""

from __future__ import annotations

import threading
import weakref

from ._lib import check, ffi, lib


def split_threads(total: int, count: int) -> list:
    """Threads per sub-pool: as even as possible, the remainder to the first
    sub-pools (61 over 4 -> [16, 15, 15, 15])."""
    base, rem = divmod(total, count)
    return [base + (1 if i < rem else 0) for i in range(count)]


class CPUInfer:
    """A libktmoe pool: ``threadpool_count`` sub-pools sharing
    ``cpuinfer_threads`` threads, and a FIFO task queue.

    Use :meth:`get` for the process singleton.  ``submit`` queues and returns
    at once; ``sync`` waits for all queued work and raises the first error.
    """

    _instance_ref = None
    _lock = threading.Lock()

    def __init__(self, cpuinfer_threads: int, threadpool_count: int = 1, pin_threads: int = -1):
        if not isinstance(cpuinfer_threads, int) or cpuinfer_threads <= 0:
            raise ValueError(f"cpuinfer_threads must be positive, got {cpuinfer_threads}")
        if not isinstance(threadpool_count, int) or threadpool_count <= 0:
            raise ValueError(f"threadpool_count must be positive, got {threadpool_count}")
        if cpuinfer_threads < threadpool_count:
            raise ValueError(
                f"cpuinfer_threads ({cpuinfer_threads}) must be at least "
                f"threadpool_count ({threadpool_count})"
            )
        cfg = ffi.new("ktmoe_pool_config *")
        lib.ktmoe_pool_config_init(cfg)
        cfg.subpool_count = threadpool_count
        cfg.total_threads = cpuinfer_threads
        cfg.pin_threads = pin_threads
        out = ffi.new("ktmoe_pool **")
        check(lib.ktmoe_pool_create(cfg, out))
        self._pool = ffi.gc(out[0], lib.ktmoe_pool_destroy)
        self.cpuinfer_threads = cpuinfer_threads
        self.threadpool_count = threadpool_count
        self._call_lock = threading.RLock()
        self._failures = 0

    @property
    def handle(self):
        return self._pool

    @property
    def subpool_threads(self) -> list:
        return [lib.ktmoe_pool_subpool_threads(self._pool, i) for i in range(self.threadpool_count)]

    @classmethod
    def get(cls, cpuinfer_threads: int, threadpool_count: int) -> "CPUInfer":
        """The process singleton, created on first use.

        While any layer still uses the running pool, asking for another shape
        raises RuntimeError (the pool is never silently reused with a shape
        other than the one asked for).  Once every user is gone, the next
        request creates a pool of the new shape."""
        with cls._lock:
            inst = cls._instance_ref() if cls._instance_ref is not None else None
            if inst is not None:
                if (inst.cpuinfer_threads, inst.threadpool_count) != (cpuinfer_threads, threadpool_count):
                    raise RuntimeError(
                        f"CPUInfer is already running with cpuinfer_threads={inst.cpuinfer_threads}, "
                        f"threadpool_count={inst.threadpool_count}; a layer asked for "
                        f"cpuinfer_threads={cpuinfer_threads}, threadpool_count={threadpool_count}. "
                        "All layers of a process share one pool: create them with the same values "
                        "(or release the existing layers first)."
                    )
                return inst
            inst = cls(cpuinfer_threads, threadpool_count)
            cls._instance_ref = weakref.ref(inst)
            return inst

    @classmethod
    def current(cls):
        """The running singleton, or None."""
        with cls._lock:
            return cls._instance_ref() if cls._instance_ref is not None else None

    @property
    def failures(self) -> int:
        """How many syncs raised so far.  The queue reports the first error
        of all tasks since the last sync to whoever syncs; a caller with a
        task pending compares this count before and after to learn that a
        failure it did not see may have been its own."""
        return self._failures

    def sync(self) -> None:
        try:
            check(lib.ktmoe_pool_sync(self._pool))
        except Exception:
            self._failures += 1
            raise

    def __repr__(self) -> str:
        return (f"CPUInfer(cpuinfer_threads={self.cpuinfer_threads}, "
                f"threadpool_count={self.threadpool_count}, subpools={self.subpool_threads})")
