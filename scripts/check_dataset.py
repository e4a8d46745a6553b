r"""Validates every record of a converted dataset: exit status 0 when all are sound, 1 if not.

For each split: every shard's framing and data CRCs, every record's image and label decode,
label ids within the manifest's classes (or 0 / 255), and each record against its manifest
entry (id, size, class pixel counts). Prints the number of problems per kind and the first
--max_listed problems, each naming the shard file, the record number in it and the image id
(problem kinds: fss_jax/data/check.py).

  python scripts/check_dataset.py --data_dir data/pascal5i [--splits train,val]

Training stops at the first damaged record it reads, naming it; data.skip_bad_records=True
makes it skip such records instead (each skip logged).
"""
import argparse
import sys

from fss_jax.data import check


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--data_dir", required=True,
                      help="converted dataset (manifest.json + TFRecord shards)")
  parser.add_argument("--splits", default="", help="comma-separated splits (default: all)")
  parser.add_argument("--max_listed", type=int, default=20,
                      help="problems listed individually (the counts cover all)")
  args = parser.parse_args(argv)
  splits = [s for s in args.splits.split(",") if s] or None
  try:
    report = check.check_dataset(args.data_dir, splits)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.summary(args.max_listed))
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
