"""TFRecord framing, indexed reading, corruption detection and pickling."""
import multiprocessing
import os
import pickle
import struct

import numpy as np
import pytest

from fss_jax.data import tfrecord


def _crc32c_bitwise(data: bytes) -> int:
  """Independent CRC-32C oracle: reflected polynomial 0x82F63B78, init/xorout 0xFFFFFFFF."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
  # The published TFRecord masking formula, written out independently of the module.
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(n=5, seed=0):
  rng = np.random.default_rng(seed)
  out = [b"", b"a", bytes(range(256))]
  out += [rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
          for _ in range(n - len(out))]
  return out[:n]


def test_crc32c_published_check_values():
  # CRC-32C check value of "123456789" and the RFC 3720 (iSCSI) B.4 vectors.
  assert _crc32c_bitwise(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
  assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E


def test_mask_formula_hand_computed():
  # 0xE3069283 rotated right by 15 = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5.
  assert tfrecord.mask_crc(0xE3069283) == 0xC78AB0E5
  assert _mask(0xE3069283) == 0xC78AB0E5
  assert tfrecord.mask_crc(0) == 0xA282EAD8
  # Overflow wraps mod 2**32: 0xFFFFFFFF rotates to itself, + delta wraps.
  assert tfrecord.mask_crc(0xFFFFFFFF) == (0xFFFFFFFF + 0xA282EAD8) & 0xFFFFFFFF


def test_writer_framing_bit_exact(tmp_path):
  records = [b"123456789", b"", b"hello tfrecord"]
  path = tmp_path / "x.tfrecord"
  assert tfrecord.write_tfrecord(path, records) == 3
  expected = b""
  for r in records:
    length = struct.pack("<Q", len(r))
    expected += (length + struct.pack("<I", _mask(_crc32c_bitwise(length))) + r +
                 struct.pack("<I", _mask(_crc32c_bitwise(r))))
  assert path.read_bytes() == expected
  # The data CRC of the first record is the hand-computed masked check value.
  assert path.read_bytes()[12 + 9:12 + 9 + 4] == struct.pack("<I", 0xC78AB0E5)


def test_round_trip_multi_file(tmp_path):
  a, b = _records(5, 0), _records(7, 1)
  pa, pb, pe = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord", tmp_path / "e.tfrecord"
  tfrecord.write_tfrecord(pa, a)
  tfrecord.write_tfrecord(pe, [])
  with tfrecord.TFRecordWriter(pb) as w:
    for r in b:
      w.write(r)
  reader = tfrecord.TFRecordReader([pa, pe, pb], verify_data=True)
  assert len(reader) == 12
  assert list(reader) == a + b
  # Random access in arbitrary order, numpy indices and negative indices.
  for i in np.random.default_rng(0).permutation(12):
    assert reader[i] == (a + b)[i]
  assert reader[-1] == b[-1]
  assert reader.locate(6) == (2, 1)
  with pytest.raises(IndexError):
    reader[12]


def test_every_single_byte_flip_is_detected(tmp_path):
  records = [b"abc", b"", bytes(range(20))]
  good = b"".join(tfrecord.frame_record(r) for r in records)
  path = tmp_path / "f.tfrecord"
  for pos in range(len(good)):
    bad = bytearray(good)
    bad[pos] ^= 0x5A
    path.write_bytes(bytes(bad))
    with pytest.raises(tfrecord.TFRecordCorruptError) as err:
      reader = tfrecord.TFRecordReader([path])
      for i in range(len(reader)):
        reader[i]
    assert str(path) in str(err.value), pos
    assert "record" in str(err.value)


def test_full_verify_catches_data_corruption_at_index_time(tmp_path):
  good = b"".join(tfrecord.frame_record(r) for r in [b"abc", b"defgh"])
  bad = bytearray(good)
  bad[len(tfrecord.frame_record(b"abc")) + 12 + 2] ^= 1  # a data byte of record 1
  path = tmp_path / "f.tfrecord"
  path.write_bytes(bytes(bad))
  reader = tfrecord.TFRecordReader([path])  # header scan passes
  assert reader[0] == b"abc"
  with pytest.raises(tfrecord.TFRecordCorruptError, match=r"record 1"):
    reader[1]
  with pytest.raises(tfrecord.TFRecordCorruptError, match=r"record 1"):
    tfrecord.TFRecordReader([path], verify_data=True)


def test_truncation_detected_at_every_length(tmp_path):
  good = b"".join(tfrecord.frame_record(r) for r in [b"abc", b"defgh"])
  boundaries = {0, len(tfrecord.frame_record(b"abc")), len(good)}
  path = tmp_path / "t.tfrecord"
  for cut in range(len(good) + 1):
    path.write_bytes(good[:cut])
    if cut in boundaries:
      assert len(tfrecord.TFRecordReader([path])) == (0, 1, 2)[sorted(boundaries).index(cut)]
      continue
    with pytest.raises(tfrecord.TFRecordCorruptError, match="truncated") as err:
      tfrecord.TFRecordReader([path])
    assert str(path) in str(err.value)


def test_missing_file_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
    tfrecord.TFRecordReader([tmp_path / "nope.tfrecord"])


def _child_read(args):
  source, indices = args
  return [source[i] for i in indices]


def test_pickle_and_read_in_spawned_process(tmp_path):
  records = _records(6, 3)
  path = tmp_path / "p.tfrecord"
  tfrecord.write_tfrecord(path, records)
  source = tfrecord.TFRecordDataSource([path])
  assert source[2] == records[2]  # opens a descriptor in this process
  clone = pickle.loads(pickle.dumps(source))
  assert clone.reader._fds == {}
  assert len(clone) == 6 and clone[5] == records[5]
  assert repr(clone) == repr(source)
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(1) as pool:
    got = pool.map(_child_read, [(source, [5, 0, 3])])[0]
  assert got == [records[5], records[0], records[3]]


def test_fork_reopens_descriptors(tmp_path):
  if not hasattr(os, "fork"):
    pytest.skip("no fork")
  path = tmp_path / "k.tfrecord"
  tfrecord.write_tfrecord(path, [b"x", b"y"])
  reader = tfrecord.TFRecordReader([path])
  assert reader[0] == b"x"
  ctx = multiprocessing.get_context("fork")
  with ctx.Pool(1) as pool:
    assert pool.map(_child_read, [(reader, [1])])[0] == [b"y"]


def test_grain_source_protocol(tmp_path):
  import grain.python as grain
  path = tmp_path / "g.tfrecord"
  records = _records(4, 5)
  tfrecord.write_tfrecord(path, records)
  source = tfrecord.TFRecordDataSource([path])
  assert isinstance(source, grain.RandomAccessDataSource)
  ds = grain.MapDataset.source(source).map(len)
  assert [ds[i] for i in range(4)] == [len(r) for r in records]
