"""Reusable shared-memory batch slots between Grain worker processes and the main process.

Grain hands every NumPy array a worker returns to the main process in a new shared-memory
segment. Each page of a new segment is allocated and faulted in by the worker, mapped again by
the main process and freed afterwards; with 6-7 MB of images and labels per 1-shot episode at
473, page faults were a large share of a worker's time on the VM of benchmarks/data_speed.py.

Here each worker process instead makes one segment of `num_slots` batch-sized slots the first
time it builds a batch of a given layout, writes every batch into a free slot and returns a
small handle. `ReceiveSlots`, applied after `mp_prefetch` in the main process, copies the
batch out of the slot into ordinary arrays (memory that malloc reuses) and records that it did.

Slot reuse (each shared field has one writer):
  * the worker numbers the batches it publishes 1, 2, ... in the order it returns them. It
    builds one batch at a time (one read thread per worker), so that is also the order in
    which the main process receives them;
  * header int64 `consumed` (written by the main process only) is the number of the last
    batch copied out of the segment;
  * a slot is free when the number of its last batch is <= consumed. Batches that Grain
    discards on `set_state` are never received; they free up as soon as a later batch is
    copied out.
A batch received out of order (number <= consumed) would mean its slot may have been reused:
that raises instead of returning wrong data.

The main process unlinks a segment's name the first time it attaches to it: the memory goes
away with the last process that maps it, and nothing is left under /dev/shm. A segment that is
never attached (a worker killed before its first batch) is removed by Python's resource
tracker when the main process exits.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable

import grain
import numpy as np

HANDLE_KEY = "_shm_slot"
_ALIGN = 64
_HEADER_BYTES = 64

# ((key, shape, dtype str), ...): the arrays of one batch, in order.
Layout = tuple[tuple[str, tuple[int, ...], str], ...]


def layout_of(specs: dict[str, tuple[tuple[int, ...], Any]]) -> Layout:
  """{key: (shape, dtype)} -> Layout."""
  return tuple((k, tuple(int(d) for d in shape), np.dtype(dtype).str)
               for k, (shape, dtype) in specs.items())


@functools.lru_cache(maxsize=64)
def _slot_offsets(layout: Layout) -> tuple[tuple[int, ...], int]:
  """Byte offset of each array inside a slot, and the slot's size (both 64-byte aligned)."""
  offsets, pos = [], 0
  for _, shape, dtype in layout:
    offsets.append(pos)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    pos += -(-nbytes // _ALIGN) * _ALIGN
  return tuple(offsets), max(pos, _ALIGN)


def _slot_views(buf, layout: Layout, slot: int) -> dict[str, np.ndarray]:
  """The arrays of slot `slot` of a segment's buffer."""
  offsets, slot_bytes = _slot_offsets(layout)
  start = _HEADER_BYTES + slot * slot_bytes
  return {k: np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=start + off)
          for (k, shape, dtype), off in zip(layout, offsets)}


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
  """Allocates the segment's pages now, so that a full /dev/shm is a clear error here
  instead of a SIGBUS at the first write."""
  fd = getattr(shm, "_fd", -1)
  if fd < 0 or not hasattr(os, "posix_fallocate"):
    return
  try:
    os.posix_fallocate(fd, 0, size)
  except OSError as e:
    shm.close()
    shm.unlink()
    raise OSError(
        e.errno, f"cannot reserve {size / 2**20:.0f} MiB of shared memory for a data worker's "
        f"batch slots ({e.strerror}). /dev/shm is too small for this batch size and worker "
        "count: enlarge it (docker: --shm-size), lower data.num_workers or the batch size, or "
        "build batches in-process (data.num_workers=0, data.read_threads=N)") from e


class WorkerSlots:
  """One worker's segment of `num_slots` slots for batches of one layout.

  Used by the worker's single batch-building thread (see the module docstring).
  """

  def __init__(self, layout: Layout, num_slots: int):
    if num_slots < 1:
      raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    self.layout = layout
    size = _HEADER_BYTES + num_slots * _slot_offsets(layout)[1]
    self._shm = shared_memory.SharedMemory(create=True, size=size)
    _reserve(self._shm, size)
    self._consumed = np.ndarray((1,), np.int64, buffer=self._shm.buf)
    self._consumed[0] = 0
    self._last = [0] * num_slots      # number of the last batch published from each slot
    self._filling = [False] * num_slots
    self._published = 0

  @property
  def name(self) -> str:
    return self._shm.name

  def _try_take(self) -> int | None:
    consumed = int(self._consumed[0])
    for i, last in enumerate(self._last):
      if not self._filling[i] and last <= consumed:
        self._filling[i] = True
        return i
    return None

  def acquire(self) -> tuple[int, dict[str, np.ndarray]]:
    """Waits for a free slot; returns (slot, its arrays to fill)."""
    wait = 1e-4
    while (slot := self._try_take()) is None:
      # Every slot holds a batch the main process has not copied out yet: it is behind
      # (training step, evaluation); wait for it.
      time.sleep(wait)
      wait = min(wait * 2, 0.01)
    return slot, _slot_views(self._shm.buf, self.layout, slot)

  def publish(self, slot: int) -> dict[str, Any]:
    """Marks the filled slot as handed over; returns the element to send instead."""
    self._published += 1
    self._last[slot] = self._published
    self._filling[slot] = False
    return {HANDLE_KEY: (self.name, slot, self._published, self.layout)}


class WorkerPools:
  """The slots of one worker process, one segment per batch layout (made on first use)."""

  def __init__(self, num_slots: int):
    self.num_slots = int(num_slots)
    self._pools: dict[Layout, WorkerSlots] = {}

  def new_batch(self, specs: dict[str, tuple[tuple[int, ...], Any]]
                ) -> tuple[dict[str, np.ndarray], Callable[[dict], dict]]:
    """(arrays to fill, finish): finish(arrays), once they are filled, is the element the
    worker returns: the slot's handle."""
    layout = layout_of(specs)
    pool = self._pools.get(layout)
    if pool is None:
      pool = self._pools[layout] = WorkerSlots(layout, self.num_slots)
    slot, arrays = pool.acquire()
    return arrays, lambda filled: pool.publish(slot)


class _Segment:
  """The main process's mapping of one worker segment."""

  def __init__(self, name: str):
    self.shm = shared_memory.SharedMemory(name=name)
    # Nothing else will open it by name: remove the name now (see the module docstring).
    self.shm.unlink()
    self.consumed = np.ndarray((1,), np.int64, buffer=self.shm.buf)

  def close(self) -> None:
    del self.consumed
    self.shm.close()


class ArrayRecycler:
  """np.empty that hands out again arrays it made earlier once nothing else holds them.

  Batch arrays are several MB each; fresh ones cost a page fault per 4 KiB page (glibc's
  malloc returns arrays over 32 MB, such as 5-shot support batches, to the system at every
  free, so they are fresh every time). An array is reused only when the recycler's own list holds the sole reference
  to it (views, JAX buffers that alias it, a batch dict a caller keeps: all hold references).
  """

  def __init__(self, keep: int = 4):
    self.keep = keep
    self._arrays: dict[tuple, list[np.ndarray]] = {}
    self._lock = threading.Lock()  # batch-building threads share one recycler

  def __getstate__(self):  # a copy (e.g. in a worker process) starts empty
    return {"keep": self.keep}

  def __setstate__(self, state):
    self.__init__(state["keep"])

  def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
    with self._lock:
      pool = self._arrays.setdefault((tuple(shape), np.dtype(dtype).str), [])
      for i in range(len(pool)):
        # References: the list, and getrefcount's argument.
        if sys.getrefcount(pool[i]) == 2:
          return pool[i]
      array = np.empty(shape, dtype)
      if len(pool) < self.keep:
        pool.append(array)
      return array


def receive(element: Any, segments: dict[str, _Segment],
            recycler: ArrayRecycler | None = None) -> Any:
  """A worker's element -> the batch it stands for (copied out of its slot); other elements
  pass unchanged. `segments` caches the mappings of one iterator."""
  if not isinstance(element, dict) or HANDLE_KEY not in element:
    return element
  name, slot, number, layout = element[HANDLE_KEY]
  seg = segments.get(name)
  if seg is None:
    seg = segments[name] = _Segment(name)
  consumed = int(seg.consumed[0])
  if number <= consumed:
    raise RuntimeError(f"shared-memory batch {number} of segment {name} arrived after batch "
                       f"{consumed}: its slot may have been reused (a worker built batches "
                       "out of order)")
  views = _slot_views(seg.shm.buf, layout, slot)
  empty = np.empty if recycler is None else recycler.empty
  batch = {}
  for k in list(views):
    view = views.pop(k)
    batch[k] = empty(view.shape, view.dtype)
    np.copyto(batch[k], view)
    del view
  seg.consumed[0] = number  # the copies are done: the worker may refill the slot
  return batch


class ReceiveSlots(grain.IterDataset):
  """Main-process side: turns slot handles from `mp_prefetch` workers back into batches."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> "_ReceiveSlotsIterator":
    return _ReceiveSlotsIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "ReceiveSlots"


class _ReceiveSlotsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._segments: dict[str, _Segment] = {}
    self._recycler = ArrayRecycler()

  def __next__(self):
    return receive(next(self._parent), self._segments, self._recycler)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def close(self) -> None:
    if getattr(self, "_closed", True):
      return
    super().close()
    segments, self._segments = self._segments, {}
    for seg in segments.values():
      seg.close()
