"""Decode a stream of encoded images on a thread pool, in chunks, with memory that follows the
images kept: :class:`Decoder`, used by :mod:`imgclf.data.imagefolder`.

The calling thread reads members and hands each one's bytes to :meth:`Decoder.add`, which gives
it a row number. Memory is bounded three ways:

* encoded bytes: at most two chunks per thread wait or are being decoded, and at most
  ``IN_FLIGHT_BYTES`` of encoded images besides the chunk just sent (a chunk ends once it
  reaches its share, so at most that share plus one member);
* decoded pixels: a chunk keeps only the images that decoded, packed; an empty member is never
  sent to a thread, and an undecodable one costs no image slot (issue 22: 20,000 empty
  members once cost 3.6 GB at 224 px, a whole image slot each);
* the cache as a whole: every finished chunk's kept images are checked against the
  :class:`imgclf.data.budget.CacheBudget`, so an archive whose images cannot fit is refused
  while it is read, not by a MemoryError later.

``gather`` assembles the splits block by block, freeing each block once copied, so the cache is
in memory once, not twice.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .budget import CacheBudget
from .decode import decode_chunk

CHUNK = 256  # images per decode task: large enough to amortise the hand-off, small for balance
# Encoded bytes queued for or being decoded, all tasks together. A task is sent off early once
# its images reach a share of this, so every thread still has two tasks to work on.
IN_FLIGHT_BYTES = 32 * 2**20
EMPTY = "empty file"


class _Block:
    """The images of one chunk that decoded: ``rows[i]`` is the row of ``images[i]`` (ascending)."""

    __slots__ = ("rows", "images")

    def __init__(self, rows: np.ndarray, images: np.ndarray):
        self.rows, self.images = rows, images


class Decoder:
    def __init__(self, pool: ThreadPoolExecutor, workers: int, image_size: int, max_pixels: int,
                 budget: CacheBudget | None = None):
        self.pool, self.workers, self.image_size, self.max_pixels = pool, workers, image_size, max_pixels
        self.budget = budget
        self.chunk_limit = IN_FLIGHT_BYTES // (2 * workers)  # bytes that end a chunk early
        self.rows = 0
        self.chunk: list[bytes] = []
        self.chunk_rows: list[int] = []
        self.chunk_bytes = 0
        self.pending: collections.deque[tuple[np.ndarray, int, Future]] = collections.deque()  # rows, bytes, task
        self.pending_bytes = 0
        self.blocks: list[_Block | None] = []  # None: gathered and freed
        self.kept = 0  # images decoded and held
        self.failed: dict[int, str] = {}  # row -> reason

    def add(self, data: bytes) -> int:
        """Queue ``data`` for decoding; its row number. An empty member is failed at once."""
        row = self.rows
        self.rows += 1
        if not data:
            self.failed[row] = EMPTY
            return row
        self.chunk.append(data)
        self.chunk_rows.append(row)
        self.chunk_bytes += len(data)
        if len(self.chunk) == CHUNK or self.chunk_bytes >= self.chunk_limit:
            self._submit()
        return row

    def _submit(self) -> None:
        task = self.pool.submit(
            decode_chunk, self.chunk, self.image_size,
            max_pixels=self.max_pixels, limit_name="preprocess.max_megapixels",
        )
        self.pending.append((np.array(self.chunk_rows, np.int64), self.chunk_bytes, task))
        self.pending_bytes += self.chunk_bytes
        self.chunk, self.chunk_rows, self.chunk_bytes = [], [], 0
        while len(self.pending) > 2 * self.workers or self.pending_bytes > IN_FLIGHT_BYTES:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        rows, nbytes, task = self.pending.popleft()
        self.pending_bytes -= nbytes
        images, ok, failures = task.result()
        self.failed.update((int(rows[i]), reason) for i, reason in failures)
        if len(ok):
            self.blocks.append(_Block(rows[ok], images))
            self.kept += len(ok)
            if self.budget is not None:
                self.budget.check(self.kept, at_least=True)

    def finish(self) -> None:
        if self.chunk:
            self._submit()
        while self.pending:
            self._collect_oldest()

    def cancel(self) -> None:
        for _, _, task in self.pending:
            task.cancel()

    def gather(self, wanted: list[np.ndarray]) -> list[np.ndarray]:
        """The decoded images of each array of rows in ``wanted``, in that order, each as one
        preallocated array. Every row must have decoded. Consumes the blocks: each is freed as
        soon as it is copied, so the images are never held twice."""
        block_of = np.full(self.rows, -1, np.int64)
        index_in = np.zeros(self.rows, np.int64)
        for b, block in enumerate(self.blocks):
            block_of[block.rows] = b
            index_in[block.rows] = np.arange(len(block.rows))
        plans = []  # per split: its rows ordered by block, and where each block's share starts
        for rows in wanted:
            blocks = block_of[rows]
            if (blocks < 0).any():
                raise ValueError("gather: a row that did not decode")
            order = np.argsort(blocks, kind="stable")
            plans.append((order, np.searchsorted(blocks[order], np.arange(len(self.blocks) + 1))))
        outs = [np.empty((len(rows), 3, self.image_size, self.image_size), np.uint8) for rows in wanted]
        for b in range(len(self.blocks)):
            block, self.blocks[b] = self.blocks[b], None  # freed once copied
            for rows, out, (order, starts) in zip(wanted, outs, plans):
                sel = order[starts[b]:starts[b + 1]]
                out[sel] = block.images[index_in[rows[sel]]]
            del block
        self.blocks = []
        return outs
