r"""Procedural few-shot dataset (fss_jax.data.synthetic) -> TFRecords (fss_jax format).

Twenty classes (shape family x texture x hue, see fss_jax/data/synthetic.py), PASCAL-5i
folds (fold i novel = 5i+1..5i+5), splits "train" and "val". Scene i of a split is a pure
function of (--seed, split, i), so the output is identical for any --workers.

Usage:
  python -m data_prep.synthetic --out_dir=data/synthetic --workers=2 \
      --preview=data/synthetic_preview.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from fss_jax.data import schema
from fss_jax.data import synthetic


def main(argv: Sequence[str] | None = None) -> schema.Manifest | None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--out_dir", help="output directory (manifest.json + shards)")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_val", type=int, default=500)
  parser.add_argument("--image_size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE,
                      help="longer image side in pixels (the shorter is 75-100%% of it)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg")
  parser.add_argument("--shards", type=int, default=2, help="shards per split")
  parser.add_argument("--instances", action="store_true",
                      help="also store each scene's instance map (for PANet's box supports)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="render processes (0: in this process)")
  parser.add_argument("--preview", help="also write a PNG grid of 12 train scenes with "
                      "their masks to this path")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  if not args.out_dir and not args.preview:
    parser.error("give --out_dir and/or --preview")
  manifest = None
  if args.out_dir:
    start = time.time()
    manifest = synthetic.write_synthetic_dataset(
        args.out_dir, num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, seed=args.seed, image_format=args.image_format,
        workers=args.workers, num_shards=args.shards, progress=not args.no_progress,
        instances=args.instances)
    print(f"wrote {args.num_train} train + {args.num_val} val scenes to {args.out_dir} "
          f"in {time.time() - start:.1f} s")
  if args.preview:
    synthetic.write_preview(args.preview, seed=args.seed, image_size=args.image_size)
    print(f"preview: {args.preview}")
  return manifest


if __name__ == "__main__":
  main(sys.argv[1:])
