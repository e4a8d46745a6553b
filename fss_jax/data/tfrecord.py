"""TFRecord files without TensorFlow: writer, indexed random-access reader, Grain source.

A TFRecord file is a sequence of records, each framed as

  uint64 length            (little-endian)
  uint32 masked_crc32c(length bytes)
  byte   data[length]
  uint32 masked_crc32c(data)

with masked_crc(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32 (the masking keeps a CRC of
data that itself holds CRCs from being trivially zero). This is the format TensorFlow's
`tf.io.TFRecordWriter` / `TFRecordDataset` write and read (uncompressed).

`TFRecordReader` scans the 12-byte headers once to build an offset index, then serves records by
`os.pread`, which has no shared file position, so one open descriptor can serve any number of
threads. Descriptors are opened lazily and dropped on pickling, so a reader built in the parent
can be shipped to Grain worker processes.
"""
from __future__ import annotations

import bisect
import os
import struct
from typing import Iterable, Iterator, Sequence

import google_crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of the 8 length bytes
_FOOTER = struct.Struct("<I")  # masked crc of the data
_HEADER_SIZE = _HEADER.size  # 12
_FOOTER_SIZE = _FOOTER.size  # 4


class TFRecordCorruptError(ValueError):
  """A TFRecord file is truncated or fails a CRC check (message names file and record)."""


def crc32c(data: bytes) -> int:
  """Plain (unmasked) CRC-32C (Castagnoli) of `data`."""
  return google_crc32c.value(bytes(data))


def mask_crc(crc: int) -> int:
  """TFRecord's CRC masking: rotate right by 15 bits, add a constant, mod 2**32."""
  crc &= 0xFFFFFFFF
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  return mask_crc(crc32c(data))


def frame_record(record: bytes) -> bytes:
  """The exact bytes one record occupies in a TFRecord file."""
  length = struct.pack("<Q", len(record))
  return b"".join((length, struct.pack("<I", masked_crc32c(length)), record,
                   struct.pack("<I", masked_crc32c(record))))


# --------------------------------------------------------------------------- writing


class TFRecordWriter:
  """Writes records to one TFRecord file; use as a context manager.

  The file is written in place (no temporary name): callers that need atomic publication
  (`schema.write_dataset`) write to a temporary path and rename.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._file = open(self.path, "wb")
    self.count = 0

  def write(self, record: bytes) -> None:
    if self._file is None:
      raise ValueError(f"TFRecordWriter for {self.path} is closed")
    if not isinstance(record, (bytes, bytearray, memoryview)):
      raise TypeError(f"record must be bytes, got {type(record).__name__} ({self.path})")
    self._file.write(frame_record(bytes(record)))
    self.count += 1

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "TFRecordWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes all `records` to a new TFRecord file at `path`; returns the record count."""
  with TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
    return writer.count


# --------------------------------------------------------------------------- indexing


def scan_tfrecord(path: str | os.PathLike, *, verify_data: bool = False) -> np.ndarray:
  """Builds the offset index of one TFRecord file from its record headers.

  Every length field is checked against its CRC, and every record must fit in the file. With
  `verify_data` the data CRCs are checked as well (reads the whole file).

  Returns:
    int64 array (N, 2): byte offset of each record's data and its length.

  Raises:
    TFRecordCorruptError: naming the file, record index and byte offset.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  offsets, lengths = [], []
  pos = 0
  with open(path, "rb", buffering=0) as f:
    fd = f.fileno()
    while pos < size:
      index = len(offsets)
      if size - pos < _HEADER_SIZE:
        raise TFRecordCorruptError(
            f"{path}: truncated header of record {index} at byte {pos} "
            f"({size - pos} of {_HEADER_SIZE} bytes present)")
      header = os.pread(fd, _HEADER_SIZE, pos)
      length, length_crc = _HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise TFRecordCorruptError(
            f"{path}: length CRC mismatch in record {index} at byte {pos}")
      end = pos + _HEADER_SIZE + length + _FOOTER_SIZE
      if end > size:
        raise TFRecordCorruptError(
            f"{path}: truncated record {index} at byte {pos} (needs {end - pos} bytes, "
            f"{size - pos} present)")
      if verify_data:
        _check_data(path, index, pos + _HEADER_SIZE,
                    os.pread(fd, length + _FOOTER_SIZE, pos + _HEADER_SIZE))
      offsets.append(pos + _HEADER_SIZE)
      lengths.append(length)
      pos = end
  index = np.zeros((len(offsets), 2), np.int64)
  if offsets:
    index[:, 0] = offsets
    index[:, 1] = lengths
  return index


def _check_data(path: str, index: int, offset: int, data_and_crc: bytes) -> bytes:
  """Verifies a record's data CRC; returns the data without its CRC."""
  data = data_and_crc[:-_FOOTER_SIZE]
  (expected,) = _FOOTER.unpack(data_and_crc[-_FOOTER_SIZE:])
  if masked_crc32c(data) != expected:
    raise TFRecordCorruptError(
        f"{path}: data CRC mismatch in record {index} (data at byte {offset})")
  return data


# --------------------------------------------------------------------------- reading


class TFRecordReader:
  """Random access over the records of several TFRecord files, concatenated in order.

  Args:
    paths: TFRecord files; record i of the reader counts through them in the given order.
    verify_data: also check every data CRC while indexing (reads all files once). Data CRCs
      are always checked on `__getitem__`.

  Picklable: the offset index travels with the object; file descriptors are opened lazily per
  process (and re-opened after a fork), so it can be used from Grain worker processes.
  """

  def __init__(self, paths: Sequence[str | os.PathLike], *, verify_data: bool = False):
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    self._paths = [os.fspath(p) for p in paths]
    for p in self._paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"TFRecord file not found: {p}")
    self._indices = [scan_tfrecord(p, verify_data=verify_data) for p in self._paths]
    # starts[k] = global index of file k's first record.
    self._starts = [0]
    for idx in self._indices:
      self._starts.append(self._starts[-1] + len(idx))
    self._fds: dict[int, int] = {}
    self._pid = os.getpid()

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, i: int) -> tuple[int, int]:
    """Maps a global record index to (file number, record number within that file)."""
    n = len(self)
    i = int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"record index {i} out of range for {n} records")
    k = bisect.bisect_right(self._starts, i) - 1
    return k, i - self._starts[k]

  def __getitem__(self, i: int) -> bytes:
    k, j = self.locate(i)
    offset, length = (int(v) for v in self._indices[k][j])
    path = self._paths[k]
    blob = os.pread(self._fd(k), length + _FOOTER_SIZE, offset)
    if len(blob) != length + _FOOTER_SIZE:
      raise TFRecordCorruptError(
          f"{path}: record {j} at byte {offset} is truncated (file changed after indexing?)")
    return _check_data(path, j, offset, blob)

  def raw(self, i: int) -> bytes:
    """Record i's data without the CRC check (for naming a damaged record: its id may still
    parse); possibly short if the file changed after indexing."""
    k, j = self.locate(i)
    offset, length = (int(v) for v in self._indices[k][j])
    return os.pread(self._fd(k), length, offset)

  def __iter__(self) -> Iterator[bytes]:
    for i in range(len(self)):
      yield self[i]

  def _fd(self, k: int) -> int:
    if self._pid != os.getpid():
      # Forked child: the parent's descriptors share file state we must not close or use.
      self._fds = {}
      self._pid = os.getpid()
    fd = self._fds.get(k)
    if fd is None:
      fd = os.open(self._paths[k], os.O_RDONLY)
      self._fds[k] = fd
    return fd

  def close(self) -> None:
    if self._pid == os.getpid():
      for fd in self._fds.values():
        try:
          os.close(fd)
        except OSError:
          pass
    self._fds = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fds = {}
    self._pid = os.getpid()

  def __repr__(self) -> str:
    return f"TFRecordReader(paths={self._paths!r}, num_records={len(self)})"


class TFRecordDataSource:
  """Grain `RandomAccessDataSource` over TFRecord files (records as raw bytes).

  Grain's source type is a runtime-checkable Protocol (`__len__`, `__getitem__`, `__repr__`
  for checkpointing), so this class satisfies it without importing Grain (a 1 s import that
  converters and the reader do not need).

  Args:
    paths_or_reader: TFRecord paths (concatenated in order), or an existing TFRecordReader.
    verify_data: passed to TFRecordReader when paths are given.
  """

  def __init__(self, paths_or_reader, *, verify_data: bool = False):
    if isinstance(paths_or_reader, TFRecordReader):
      self._reader = paths_or_reader
    else:
      self._reader = TFRecordReader(paths_or_reader, verify_data=verify_data)

  @property
  def reader(self) -> TFRecordReader:
    return self._reader

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, record_key: int) -> bytes:
    return self._reader[record_key]

  def __repr__(self) -> str:
    # Grain checkpoints compare the source's repr; keep it deterministic across processes.
    return f"TFRecordDataSource(paths={self._reader.paths!r}, num_records={len(self)})"
