"""Shared-memory batch slots: hand-over, reuse protocol, recycling, errors (in one process)."""
import errno
import os

import numpy as np
import pytest

from fss_jax.data import shm_slots

SPECS = {"image": ((2, 5, 7, 3), np.float32), "label": ((2, 5, 7), np.int32),
         "index": ((2,), np.int64)}


def _fill(arrays, value):
  for k, a in arrays.items():
    a[...] = np.arange(a.size).reshape(a.shape) + value
  return {k: a.copy() for k, a in arrays.items()}


def test_round_trip_and_name_removed():
  pools = shm_slots.WorkerPools(num_slots=2)
  segments = {}
  for value in range(5):  # more batches than slots: slots are refilled
    arrays, finish = pools.new_batch(SPECS)
    want = _fill(arrays, value)
    element = finish(arrays)
    assert set(element) == {shm_slots.HANDLE_KEY}
    got = shm_slots.receive(element, segments)
    assert list(got) == list(SPECS)
    for k in SPECS:
      assert got[k].dtype == SPECS[k][1] and not np.shares_memory(got[k], arrays[k])
      np.testing.assert_array_equal(got[k], want[k])
  (name,) = segments
  if os.path.isdir("/dev/shm"):
    assert not os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))
  for seg in segments.values():
    seg.close()


def test_slot_free_only_after_copy_and_dropped_batches_come_back():
  layout = shm_slots.layout_of(SPECS)
  slots = shm_slots.WorkerSlots(layout, num_slots=2)
  segments = {}
  s0, arrays0 = slots.acquire()
  _fill(arrays0, 0)
  dropped = slots.publish(s0)            # batch 1: never received (Grain dropped it)
  s1, arrays1 = slots.acquire()
  assert s1 != s0
  want = _fill(arrays1, 1)
  kept = slots.publish(s1)               # batch 2
  assert slots._try_take() is None       # both slots are in flight
  got = shm_slots.receive(kept, segments)
  np.testing.assert_array_equal(got["image"], want["image"])
  # Copying batch 2 out frees its slot and the slot of the earlier, dropped batch 1.
  assert slots._try_take() is not None and slots._try_take() is not None
  with pytest.raises(RuntimeError, match="arrived after batch 2"):
    shm_slots.receive(dropped, segments)
  for seg in segments.values():
    seg.close()


def test_other_elements_pass_through():
  element = {"a": np.arange(3)}
  assert shm_slots.receive(element, {}) is element
  assert shm_slots.receive(7, {}) == 7


def test_recycler_reuses_only_unreferenced_arrays():
  recycler = shm_slots.ArrayRecycler(keep=2)
  a = recycler.empty((4, 3), np.float32)
  a_id = id(a)                           # the recycler's list keeps it alive: ids stay valid
  b = recycler.empty((4, 3), np.float32)
  assert a is not b                      # a is still held here
  view = a[1:]
  del a
  c = recycler.empty((4, 3), np.float32)
  assert c is not view.base              # a view keeps its base alive
  del view
  d = recycler.empty((4, 3), np.float32)
  assert id(d) == a_id                   # only the recycler held the first array
  assert recycler.empty((4, 3), np.int32).dtype == np.int32


def test_full_shm_is_a_clear_error(monkeypatch):
  def no_space(fd, offset, size):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
  with pytest.raises(OSError, match=r"/dev/shm is too small.*num_workers"):
    shm_slots.WorkerSlots(shm_slots.layout_of(SPECS), num_slots=3)
