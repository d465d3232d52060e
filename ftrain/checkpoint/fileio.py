"""Bytes between tensors and one file, hashed in the same pass: the I/O under the safetensors backend.

A file is a run of byte views laid back to back (a header, then each tensor's bytes). :func:`io_jobs` cuts the run
into jobs of about :data:`IO_CHUNK` bytes at known file offsets — a large tensor is split, small ones are gathered
into one vectored call — so that:

- :func:`read_jobs` reads the jobs on :data:`IO_THREADS` threads at once (``os.preadv`` straight into the
  destination tensors' memory: no intermediate buffer, no second pass), while the calling thread hashes each job
  in file order as soon as it has arrived. Reading from the page cache is a copy that scales with cores; the hash
  trails the reads, so a verified read costs about what the reads cost.
- :func:`write_jobs` writes the jobs in order on one thread (``os.pwritev`` straight from the tensors' memory;
  buffered writes to one file are serialized by the kernel anyway), while the calling thread prepares the next
  views (a GPU tensor is copied to the host one job window ahead, never the whole state at once) and hashes what
  was written.

Both keep at most ``2 * threads`` jobs in flight. The views must stay unchanged until the call returns.

Example:
    >>> import hashlib, os, tempfile
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmpdir.name, "f.bin")
    >>> fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    >>> write_jobs(fd, io_jobs([memoryview(b"head"), memoryview(bytes(range(10)))], 0))
    >>> os.close(fd)
    >>> back = [memoryview(bytearray(4)), memoryview(bytearray(10))]
    >>> h = hashlib.sha256()
    >>> fd = os.open(path, os.O_RDONLY)
    >>> read_jobs(fd, io_jobs(back, 0, chunk=3), hasher=h, short=EOFError, threads=2)  # 5 jobs of <= 3 bytes
    >>> os.close(fd)
    >>> bytes(back[0]), list(back[1]) == list(range(10))
    (b'head', True)
    >>> h.hexdigest() == hashlib.sha256(b"head" + bytes(range(10))).hexdigest()  # hashed in file order
    True
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["IO_CHUNK", "IO_THREADS", "Job", "io_jobs", "read_jobs", "write_jobs"]

#: Bytes per read or write call: large enough to amortize a call and a thread hand-off, small enough to spread a
#: file over the threads and let the hash trail the I/O closely.
IO_CHUNK = 8 << 20
#: Reader threads: one per core, at least 2 (a read can wait on the disk), at most 8.
IO_THREADS = min(8, max(2, os.cpu_count() or 1))
_MAX_VIEWS = 512  # buffers per vectored call, under every OS's IOV_MAX (1024 on Linux)


@dataclasses.dataclass
class Job:
    """One vectored read or write: ``views`` back to back in the file from byte ``offset``."""

    offset: int
    views: list[memoryview]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)


def _pieces(view: memoryview, chunk: int) -> Iterator[memoryview]:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    for start in range(0, view.nbytes, chunk):
        yield view[start : start + chunk]


def io_jobs(views: Iterable[memoryview], start: int, *, chunk: int | None = None) -> Iterator[Job]:
    """Jobs of about ``chunk`` bytes (default :data:`IO_CHUNK`) covering ``views`` laid back to back in the file from
    byte ``start``; empty views are skipped. Lazy: a view is taken from ``views`` only when the jobs before it are
    handed out."""
    chunk = chunk or IO_CHUNK
    offset, batch, size = start, [], 0
    for view in views:
        for piece in _pieces(view, chunk):
            batch.append(piece)
            size += piece.nbytes
            if size >= chunk or len(batch) >= _MAX_VIEWS:
                yield Job(offset, batch)
                offset, batch, size = offset + size, [], 0
    if batch:
        yield Job(offset, batch)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    i = 0
    while i < len(views) and n >= views[i].nbytes:
        n -= views[i].nbytes
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def _preadv(fd: int, views: list[memoryview], offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, views, offset)
    data = os.pread(fd, views[0].nbytes, offset)  # no preadv (older macOS): one view per call, one copy
    views[0][: len(data)] = data
    return len(data)


def _pwritev(fd: int, views: list[memoryview], offset: int) -> int:
    if hasattr(os, "pwritev"):
        return os.pwritev(fd, views, offset)
    return os.pwrite(fd, views[0], offset)


def _read_job(fd: int, job: Job, short: Callable[[], BaseException]) -> None:
    views, offset = [v for v in job.views if v.nbytes], job.offset
    while views:
        n = _preadv(fd, views, offset)
        if not n:
            raise short()
        offset += n
        views = _advance(views, n)


def _write_job(fd: int, job: Job) -> None:
    views, offset = [v for v in job.views if v.nbytes], job.offset
    while views:
        n = _pwritev(fd, views, offset)
        offset += n
        views = _advance(views, n)


def _hash(hasher: Any, job: Job) -> None:
    if hasher is not None:
        for view in job.views:
            hasher.update(view)


def _run(work: Callable[[Any], None], jobs: Iterable[Any], threads: int, on_error: Callable[[], None]) -> None:
    """Runs ``work`` over ``jobs`` on ``threads`` threads in job order, at most ``2 * threads`` jobs in flight. On
    an error (a job's, the first in job order, or the caller's), cancels the jobs not started, calls ``on_error``
    (which must let the running jobs end) and raises it once they have ended."""
    window: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ftrain-io") as pool:
        try:
            for job in jobs:
                window.append(pool.submit(work, job))
                if len(window) > 2 * threads:
                    window.popleft().result()
            while window:
                window.popleft().result()
        except BaseException:
            for future in window:
                future.cancel()
            on_error()
            raise


class _InOrder:
    """Lets the reader threads hash their jobs in file order: job ``i`` waits until job ``i - 1`` is hashed, so each
    job is hashed by the thread that just read it, while its bytes are still in that core's cache. Jobs start in
    order (a FIFO pool), so the job waited for is always running or done, unless the read failed (:meth:`fail`)."""

    def __init__(self, hasher: Any):
        self.hasher = hasher
        self._turn = threading.Condition()
        self._next = 0
        self._failed = False

    def hash(self, index: int, job: Job) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self._failed or self._next == index)
            if self._failed:
                return
        _hash(self.hasher, job)
        with self._turn:
            self._next = index + 1
            self._turn.notify_all()

    def fail(self) -> None:
        """Stops the hashing: every job waiting for its turn returns."""
        with self._turn:
            self._failed = True
            self._turn.notify_all()


def read_jobs(
    fd: int,
    jobs: Iterable[Job],
    *,
    hasher: Any = None,
    short: Callable[[], BaseException],
    threads: int | None = None,
) -> None:
    """Fills every job's views from the file ``fd`` (opened for reading) on ``threads`` threads (default
    :data:`IO_THREADS`); with ``hasher``,
    updates it with the bytes in file order, each job on the thread that read it.

    Raises:
        the exception ``short()`` builds, if the file ends before a view is full.
    """
    order = _InOrder(hasher)

    def work(item: tuple[int, Job]) -> None:
        index, job = item
        _read_job(fd, job, short)
        if hasher is not None:
            order.hash(index, job)

    _run(work, enumerate(jobs), threads or IO_THREADS, order.fail)


def write_jobs(fd: int, jobs: Iterable[Job], *, hasher: Any = None) -> None:
    """Writes every job's views at its offset into ``fd`` (opened for writing), in order on one thread, while the
    calling thread hashes the next job (``hasher``, in file order). Does not fsync."""

    def hashed(job: Job) -> Job:
        _hash(hasher, job)
        return job

    _run(lambda job: _write_job(fd, job), (hashed(job) for job in jobs), 1, lambda: None)
