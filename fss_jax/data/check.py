"""Validation of every record of a converted dataset (``scripts/check_dataset.py``).

Each record of each split is read and decoded as training reads it, and compared with its
manifest entry. Problem kinds:

  index         a shard's record framing is broken (length CRC or truncation): its records
                cannot be located; the rest of the shard is not checked
  count         a split's shards hold another number of records than its manifest lists
  crc           a record's data CRC does not match
  parse         not a tf.train.Example, or a feature is missing or malformed
  image, label  the image / label bytes do not decode
  size          image and label sizes differ
  instance, scribble  an optional map (schema.OPTIONAL_FEATURES) does not decode or is not of
                the label's size
  label_values  label ids outside 0, 1..C (the manifest's classes) and 255
  manifest      the record's id, height/width, class pixel counts or optional features differ
                from its manifest entry (after an 'index' or 'count' problem, entries can no longer be matched
                to records and this check is skipped for that split)

Every problem names the shard file, the record number in it (from 0) and the image id, as
`schema.BadRecordError` messages do.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Optional

import numpy as np

from fss_jax.data import schema
from fss_jax.data import tfrecord

KINDS = ("index", "count", "crc", "parse", "image", "label", "size", "instance", "scribble",
         "label_values", "manifest")


@dataclasses.dataclass
class Problem:
  kind: str
  split: str
  path: str
  record: Optional[int]  # None: the shard as a whole
  image_id: Optional[str]
  detail: str

  def __str__(self) -> str:
    if self.record is None:
      return f"[{self.kind}] {self.path}: {self.detail}"
    return f"[{self.kind}] {schema.record_name(self.path, self.record, self.image_id)}: " \
           f"{self.detail}"


@dataclasses.dataclass
class Report:
  data_dir: str
  records: int = 0  # records read (whatever their state)
  problems: list = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.problems

  @property
  def counts(self) -> dict[str, int]:
    """Problems per kind, in KINDS order (kinds with none left out)."""
    c = collections.Counter(p.kind for p in self.problems)
    return {k: c[k] for k in KINDS if c[k]}

  @property
  def bad_records(self) -> int:
    return len({(p.path, p.record) for p in self.problems if p.record is not None})

  def summary(self, max_listed: int = 20) -> str:
    lines = [f"{self.data_dir}: {self.records} records checked, "
             + (f"{len(self.problems)} problems in {self.bad_records} records"
                if self.problems else "no problems")]
    for kind, n in self.counts.items():
      lines.append(f"  {kind}: {n}")
    for p in self.problems[:max_listed]:
      lines.append(f"  {p}")
    if len(self.problems) > max_listed:
      lines.append(f"  ... and {len(self.problems) - max_listed} more")
    return "\n".join(lines)


def check_dataset(data_dir: str, splits: Optional[Iterable[str]] = None) -> Report:
  """Reads and checks every record of `splits` (default: all) of a converted dataset."""
  manifest = schema.load_manifest(data_dir)
  report = Report(manifest.root)
  for split in (list(splits) if splits else list(manifest.splits)):
    _check_split(manifest, split, report)
  return report


def _check_split(manifest: schema.Manifest, split: str, report: Report) -> None:
  images = manifest.images(split)
  paths = manifest.split_files(split)
  aligned = True  # manifest entry i is record i of the split
  global_index = 0
  readers = []
  for path in paths:
    try:
      readers.append(tfrecord.TFRecordReader([path]))
    except tfrecord.TFRecordCorruptError as e:
      detail = str(e)[len(path) + 2:] if str(e).startswith(path + ": ") else str(e)
      report.problems.append(Problem("index", split, path, None, None, detail))
      readers.append(None)
      aligned = False
  total = sum(len(r) for r in readers if r is not None)
  if aligned and total != len(images):
    report.problems.append(Problem(
        "count", split, manifest.path, None, None,
        f"split {split!r} lists {len(images)} images but its shards hold {total} records"))
    aligned = False
  num_classes = manifest.num_classes
  for path, reader in zip(paths, readers):
    if reader is None:
      continue
    for j in range(len(reader)):
      report.records += 1
      entry = images[global_index] if aligned else None
      global_index += 1
      try:
        ex, image, label = schema.read_record(reader, j)
      except schema.BadRecordError as e:
        report.problems.append(Problem(e.kind, split, path, j, e.image_id, e.detail))
        continue
      del image
      try:
        schema.read_extras(reader, j, ex, label.shape)
      except schema.BadRecordError as e:
        report.problems.append(Problem(e.kind, split, path, j, e.image_id, e.detail))
      values = np.unique(label)
      bad = [int(v) for v in values if v != 0 and v != schema.IGNORE_LABEL and v > num_classes]
      if bad:
        report.problems.append(Problem(
            "label_values", split, path, j, ex["id"],
            f"label ids {bad[:10]} outside 1..{num_classes} (and 0, 255)"))
      if entry is None:
        continue
      diffs = []
      if entry["id"] != ex["id"]:
        diffs.append(f"id {ex['id']!r} vs manifest {entry['id']!r}")
      if (entry["height"], entry["width"]) != label.shape:
        diffs.append(f"size {label.shape[0]}x{label.shape[1]} vs manifest "
                     f"{entry['height']}x{entry['width']}")
      if (ex["height"], ex["width"]) != label.shape:
        diffs.append(f"size {label.shape[0]}x{label.shape[1]} vs its own height/width "
                     f"{ex['height']}x{ex['width']}")
      want = {int(c): int(n) for c, n in entry["classes"].items()}
      if not bad and schema.class_pixel_counts(label) != want:
        diffs.append("class pixel counts differ from the manifest's")
      stored = [f for f in schema.OPTIONAL_FEATURES if ex.get(f"{f}_png") is not None]
      if stored != [f for f in schema.OPTIONAL_FEATURES if f in entry.get("features", ())]:
        diffs.append(f"optional features {stored} vs manifest {entry.get('features', [])}")
      if diffs:
        report.problems.append(Problem("manifest", split, path, j, ex["id"], "; ".join(diffs)))
