"""What ``scripts/train.py`` / ``evaluate.py`` print first: config errors as one or two lines.

``parse_flags`` is the ``flags_parser`` given to ``absl.app.run``: a config error found while
absl parses the command line (an unknown ``--config.<field>``, a value of the wrong type, a bad
``--config=file.py:arg``) is printed as ``<script>: error: ...`` (with ml_collections' "Did you
mean ..." when it has one) and the process exits with ``EXIT_USAGE`` (2), without a traceback.
``checked_config`` does the same for a config file that cannot be loaded and for
``configs_lib.validate_config``.

Exit codes of the scripts:
  0    done.
  1    EXIT_FAILED: the run failed with one message naming the cause (a damaged checkpoint with
       no intact one to fall back to, a failed checkpoint write, divergence, a bad record,
       non-finite weights to evaluate).
  2    EXIT_USAGE: bad command line or config (also a resume whose config differs from the
       workdir's saved one, ``fss_jax/train/workdir.py``).
  3    EXIT_LOCKED: another run holds the workdir (``<workdir>/train.lock``).
  143  EXIT_STOPPED (128 + SIGTERM): stopped by SIGTERM / SIGINT after saving a checkpoint; the
       run did not finish; run the same command again to resume.
"""
import os
import re
import sys
from typing import NoReturn

from absl import flags

EXIT_FAILED = 1  # the run failed with a message that names the cause (checkpoint, record, ...)
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_STOPPED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM

_EXC_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): ")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
  """Prints ``<script>: error: message`` on stderr and exits with ``code``."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fss_jax"
  sys.stderr.write(f"{prog}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _chain(exc):
  seen = []
  while exc is not None and exc not in seen:
    seen.append(exc)
    exc = exc.__cause__ or exc.__context__
  return seen


def _unknown_field(exc, argv) -> str:
  """The message of a KeyError / AttributeError of an unknown ``--config.`` field."""
  key, hint = None, ""
  for e in _chain(exc):
    arg = e.args[0] if e.args else None
    if isinstance(arg, KeyError) and arg.args:
      arg = arg.args[0]
    if isinstance(arg, str):
      first, _, rest = arg.partition("\n")
      key = key or first.strip("'\"")
      hint = hint or rest.strip()
  flag = next((a for a in argv if a.startswith("--config.") and key is not None
               and key in a.partition("=")[0].split(".")[1:]), None)
  where = f"{flag.partition('=')[0]}: " if flag else ""
  fields = ""
  if not hint and flag:
    fields = _sibling_fields(argv, flag.partition("=")[0][len("--config."):], key)
  return f"{where}the config has no field {key!r}.{(' ' + hint) if hint else fields}"


def _sibling_fields(argv, path: str, key: str) -> str:
  """`` Fields of config.<group>: ...`` (best effort: loads the config file again)."""
  spec = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return ""
  try:
    from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
    node = configs_lib.load_config(spec)
    parts = path.split(".")
    group = []
    for p in parts[:parts.index(key)]:
      node = node[p]
      group.append(p)
    return f" Fields of config{''.join('.' + g for g in group)}: {', '.join(sorted(node))}."
  except Exception:  # pylint: disable=broad-except
    return ""


def _short(message: str) -> str:
  """First line, and the last one (the cause) when there are several."""
  lines = [l.strip() for l in str(message).splitlines() if l.strip()]
  if not lines:
    return "?"
  return lines[0] + (f" ({_EXC_PREFIX.sub('', lines[-1])})" if len(lines) > 1 else "")


def _flag_error(exc) -> str:
  message = str(exc)
  if "Traceback (most recent call last)" in message:
    head = message.split("\n", 1)[0]
    head = head.replace("Error whilst parsing config file:", "").rstrip(": ")
    last = [l for l in message.splitlines() if l.strip()][-1].strip()
    return f"{head}: {_EXC_PREFIX.sub('', last)}"
  return _short(message)


def parse_flags(argv):
  """``absl.app.run(main, flags_parser=cli.parse_flags)``: absl's parsing, config errors as
  ``fail(...)`` (exit 2) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    fail(_unknown_field(e, argv))
  except flags.Error as e:
    fail(f"{_flag_error(e)} (see --helpshort)")
  except (ValueError, TypeError, OSError) as e:
    fail(_short(_EXC_PREFIX.sub("", str(e))))


def checked_config(config_flag):
  """The value of a ``DEFINE_config_file`` flag, loaded and validated; errors → ``fail``."""
  try:
    config = config_flag.value
    if config is not None:
      config.get("data")  # a file that failed to load raises here (absl stores the error)
  except (OSError, ValueError, AttributeError, KeyError) as e:
    fail(_short(e))
  if config is None:
    fail("--config is required.")
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  try:
    configs_lib.validate_config(config)
  except (ValueError, KeyError) as e:
    fail(str(e))
  return config
