"""What every data_prep converter's command line shares: the summary line and error exit."""
import sys


def report(manifest) -> None:
  """Prints where the manifest went and how many images each split holds."""
  print(f"wrote {manifest.path}: " + ", ".join(
      f"{s} {len(manifest.images(s))} images" for s in manifest.splits))
  for name, counts in manifest.optional_features.items():
    print(f"  with {name} maps: " + ", ".join(
        f"{s} {counts.get(s, 0)} of {len(manifest.images(s))}" for s in manifest.splits))


def run(main) -> None:
  """Runs a converter's ``main()``; bad inputs end with a one-line ``error: ...`` (exit 1)."""
  try:
    main()
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f"error: {e}")
