r"""Writes evaluation episodes of a converted dataset as image files, to try predict.py / the demo.

  # three 1-shot episodes of fold 0's novel classes of the procedural dataset (the default job's
  # cache), drawn as the evaluator draws them (seed 321; --min_pixels = the config's
  # data.min_class_pixels, 64 in the synthetic_* configs: another value draws other episodes):
  python scripts/export_episodes.py --data_dir ~/.cache/fss_jax/synthetic --fold 0 \
      --episodes 3 --min_pixels 64 --out examples
  # then, for example:
  python scripts/predict.py --workdir=workdirs/synthetic \
      --support=examples/episode_0/support_0.png:examples/episode_0/support_0_mask.png \
      --query=examples/episode_0/query.png --output=predictions --explain

Per episode: support_<k>.png and support_<k>_mask.png (255 object), query.png and
query_truth.png (255 object, 128 ignore); episodes.json lists classes and image ids
(fss_jax/data/examples.py).
"""
import argparse
import sys

from fss_jax.data import examples


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--data_dir", required=True,
                      help="converted dataset (manifest.json + TFRecord shards)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--fold", type=int, default=0)
  parser.add_argument("--shot", type=int, default=1)
  parser.add_argument("--episodes", type=int, default=3)
  parser.add_argument("--seed", type=int, default=321, help="episode draw (the evaluator's)")
  parser.add_argument("--split", default="val")
  parser.add_argument("--classes", choices=["novel", "base"], default="novel")
  parser.add_argument("--min_pixels", type=int, default=None,
                      help="smallest class area of an eligible image: the config's "
                           "data.min_class_pixels, for the evaluator's episodes (default: the "
                           "pipeline's, 2048, as the PASCAL / COCO configs; the procedural "
                           "configs (synthetic_*) use 64)")
  args = parser.parse_args(argv)
  try:
    eps = examples.write_episodes(args.data_dir, args.out, fold=args.fold, shot=args.shot,
                                  num_episodes=args.episodes, seed=args.seed, split=args.split,
                                  classes=args.classes, min_pixels=args.min_pixels)
  except (FileNotFoundError, ValueError, KeyError, OSError) as e:
    print(f"export_episodes.py: error: {e}", file=sys.stderr)
    return 2
  for e in eps:
    print(f"{e['folder']}: class {e['class_id']} ({e['class_name']}), query {e['query']['id']}, "
          f"supports {', '.join(s['id'] for s in e['supports'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
