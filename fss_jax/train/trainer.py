"""The training loop: ``train_and_evaluate(config, workdir)``.

One step, end to end:
  Grain iterator (this process's episodes, ``data.pipeline.train_dataset``)
  → ``sharding.host_batch_to_global`` (global arrays split over the ``"data"`` mesh axis)
  → jitted ``step.train_step`` (replicated state, donated) → metrics, fetched every
  ``train.log_every`` steps → ``metrics.jsonl`` / TensorBoard / progress line.
Every ``eval_every`` steps the evaluator runs on the selection episodes (novel classes as the
reference, or held-out base classes: ``data.eval_episodes`` episodes of seed ``data.seed``,
``evaluator.selection_settings``) and a checkpoint is saved with that score, so the manager
keeps the last N plus the best. That evaluation also draws its first ``eval.num_images``
episodes (process 0's) as TensorBoard images ``eval/episode_<i>`` (supports | truth |
prediction), the same episodes every time. At the end the best checkpoint is evaluated on the novel classes
with the evaluation protocol (``config.eval.protocol``, ``evaluator.protocol_settings``: its
episode count, seeds and label mode) and the result is written to ``final_metrics.json``.

Restarts: the workdir's latest checkpoint (train state + Grain iterator state) is restored
automatically, so a killed run continues with exactly the batches and random numbers it would
have seen (per-step randomness is ``fold_in(seed, step)``). SIGTERM / SIGINT save a checkpoint at
the next step boundary and return; a non-finite loss stops the run without saving.

Damage: a newest checkpoint that cannot be read is moved to ``<workdir>/damaged_checkpoints/``
(one log line) and the previous intact one is resumed (``train.restore_fallback = False``: stop
with ``checkpoint.CheckpointRestoreError`` instead). Each save is waited for: a failed write
(full disk, permissions) stops the run there with ``checkpoint.CheckpointWriteError`` and no
partial checkpoint; the workdir is probed for writing before any set-up. Divergence guard
(``checkpoint.DivergenceGuard``), before every evaluation/save: the loss since the last check
and all trainable parameters and batch statistics are finite, and the trainable parameters'
global L2 norm is ≤ ``train.max_param_norm_ratio`` × max(its value at the start or resume, 1)
(ratio 0: no norm check); otherwise ``checkpoint.DivergenceError`` (a ``NonFiniteLossError``)
names the step and the check, and the state is neither scored nor saved.
"""
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from fss_jax import configs_lib
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.data import episodes as episodes_lib
from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax import weights
from fss_jax.models import registry
from fss_jax.train import checkpoint as ckpt_lib
from fss_jax.train import evaluator as evaluator_lib
from fss_jax.train import logging as logging_lib
from fss_jax.train import optim
from fss_jax.train import semantic as semantic_lib
from fss_jax.train import sharding
from fss_jax.train import step as step_lib
from fss_jax.train import workdir as workdir_lib

SELECT_METRIC = ckpt_lib.BEST_METRIC


def log(msg: str) -> None:
  """One line on stdout from process 0."""
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- schedule


class Plan:
  """Step counts derived from the config and the dataset size."""

  def __init__(self, config, num_train_queries: int):
    t, d = config.train, config.data
    self.steps_per_epoch = max(1, num_train_queries // int(d.train_batch_size))
    self.total_steps = optim.total_steps_from_config(config, self.steps_per_epoch)
    self.eval_every = int(t.eval_every) or int(t.eval_every_epochs) * self.steps_per_epoch
    self.checkpoint_every = int(t.checkpoint_every) or self.eval_every or self.total_steps
    self.log_every = max(1, int(t.log_every))

  def is_eval_step(self, step: int) -> bool:
    return bool(self.eval_every) and step % self.eval_every == 0

  def is_checkpoint_step(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.total_steps


class _StopRequest:
  """SIGTERM / SIGINT → finish the current step, save, return. A second SIGINT aborts."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after this step "
          "(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, sync: bool = True) -> bool:
    """Whether to stop. With several processes the answer is agreed on (an all-gather), and
    only when ``sync`` (at logging / checkpoint steps, not every step); otherwise False."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      if not sync:
        return False
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def _abstract(tree, shard):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard), tree)


def _mean_metrics(pending: list) -> dict:
  pending = jax.device_get(pending)
  out = {}
  for k in pending[0]:
    if k == "finite":
      continue
    out[k] = float(np.mean([p[k] for p in pending]))
  return out


def episode_options(model, config, *, train: bool, sampler_only: bool = False) -> dict:
  """The episode pipeline's options a model needs: stage-2 models (BAM, MSANet) read the
  query's base-class label and the episode class's base index (``base_label``), and train on
  BAM's image lists (``data.exclude_novel_images``)."""
  wants_base = "base_class" in model.inputs or "query_base_label" in model.targets
  out = {}
  if train:
    out["exclude_novel_images"] = bool(config.data.get("exclude_novel_images", False))
  if not sampler_only:
    out["base_label"] = wants_base
  return out


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config, workdir: str,
                       step_hook: Optional[Callable[[int, Any, dict], None]] = None) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, returns a summary.

  Args:
    config: a config of ``configs/`` (validated again here, after command-line overrides).
    workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json,
      final_metrics.json.
    step_hook: called as ``hook(step, state, host_batch)`` after every step, with this
      process's part of the batch (tests, custom logging).

  Returns:
    dict with ``step`` (steps done), ``stopped`` (True when interrupted by a signal) and, when
    training completed, the final evaluation ``final`` (see ``final_metrics.json``).
    ``scripts/train.py`` exits 143 (128 + SIGTERM) when ``stopped``.

  Raises:
    workdir.WorkdirLockedError: another run holds ``workdir/train.lock`` (one run per workdir;
      ``config.train.break_lock``), see ``fss_jax/train/workdir.py``.
    workdir.ConfigChangedError: the workdir holds checkpoints of a run with another config
      (``config.train.accept_changes`` lets listed changes through).
  """
  configs_lib.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  with workdir_lib.claim(config, workdir, log=log):  # lock + config check on resume
    return _train_and_evaluate(config, workdir, step_hook)


def _train_and_evaluate(config, workdir: str, step_hook) -> dict:
  d, t = config.data, config.train
  ckpt_lib.check_workdir_writable(workdir)  # full disk / read-only: say so before any set-up
  dataset_dir = dataset_dir_lib.prepare(config)
  mesh = sharding.make_mesh()
  local_batch = sharding.local_batch_size(int(d.train_batch_size), mesh)
  manifest = schema.load_manifest(dataset_dir)
  scale_msg = dataset_dir_lib.scale_warning(config, manifest)  # before any costly set-up
  if scale_msg:
    log(scale_msg)
  way = int(d.get("way", 1))
  model = registry.build_model(config)
  # 'episodes' (few-shot models) or 'semantic' (per-image: PSPNet, BAM's stage 1)
  semantic = registry.task(model) == "semantic"
  if semantic:
    num_train = pipeline.semantic_train_size(dataset_dir, d.train_split)
    task = f"per-image base-class segmentation; {num_train} training images"
    semantic_lib.check_classes(config, manifest)
  else:
    sampler = episodes_lib.train_sampler_for_fold(
        manifest, d.train_split, d.fold, d.shot, d.min_class_pixels, way,
        **episode_options(model, config, train=True, sampler_only=True))
    num_train = len(sampler)
    task = (f"{f'{way}-way ' if way > 1 else ''}{d.shot}-shot; {num_train} training queries")
  plan = Plan(config, num_train)
  log(f"fss_jax: {jax.process_count()} process(es), {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s); dataset {dataset_dir} fold {d.fold} "
      f"{task}, {plan.total_steps} steps "
      f"(batch {d.train_batch_size}, {plan.steps_per_epoch} steps/epoch)")

  # ---- model, optimiser, state ----
  init_rng, train_rng = jax.random.split(jax.random.key(int(t.seed)))
  variables = registry.init_variables(model, d.image_size, d.shot, init_rng)
  if "base_weights" in config.model and not config.model.init_weights:
    # Stage 2 (BAM, MSANet): the frozen backbone and base learner of the stage-1 PSPNet.
    variables = weights.load_base_learner(variables, config)
    log(f"stage-1 base learner: {config.model.base_weights}")
  if config.model.backbone_weights:
    variables = weights.load_backbone(variables, config)
    log(f"backbone weights: {config.model.backbone_weights}")
  elif ("backbone" in tuple(t.frozen_keys) and not config.model.init_weights
        and "base_weights" not in config.model):
    log("WARNING: config.model.backbone_weights is empty and the backbone is frozen: training "
        "on a random backbone (import ImageNet weights with scripts/convert_backbone.py).")
  if config.model.init_weights:  # a whole model to start from (head and backbone)
    variables = weights.read_model(config.model.init_weights, model, config)
    log(f"initial weights (whole model): {config.model.init_weights}")
  tx = optim.make_optimizer(config, plan.total_steps)
  replicated = sharding.replicated(mesh)
  state = jax.device_put(step_lib.create_train_state(variables, tx, tuple(t.frozen_keys)),
                         replicated)
  del variables
  log(f"parameters: {optim.count_params(state.trainable):,} trainable, "
      f"{optim.count_params(state.frozen):,} frozen")

  # ---- data ----
  if semantic:
    train_ds = pipeline.semantic_train_dataset(
        dataset_dir, d.fold, d.image_size, int(d.seed), local_batch, jax.process_index(),
        jax.process_count(), int(d.num_workers), split=d.train_split,
        aug=dataset_dir_lib.train_aug(config), read_threads=int(d.read_threads),
        skip_bad_records=bool(d.get("skip_bad_records", False)))
  else:
    train_ds = pipeline.train_dataset(
        dataset_dir, d.fold, d.shot, d.image_size, int(d.seed), local_batch,
        jax.process_index(), jax.process_count(), int(d.num_workers), split=d.train_split,
        aug=dataset_dir_lib.train_aug(config), min_pixels=int(d.min_class_pixels),
        read_threads=int(d.read_threads),
        skip_bad_records=bool(d.get("skip_bad_records", False)), way=way,
        **episode_options(model, config, train=True))
  train_iter = iter(train_ds)

  # In-training selection: cheap and protocol-independent. The final evaluation: the protocol.
  if semantic:  # BAM's train_base.py: the whole validation split, base-class mIoU
    select_eval = final_eval = semantic_lib.from_config(config, model, mesh, dataset_dir)
  else:
    select_eval = evaluator_lib.from_config(
        config, model, mesh, dataset_dir, "novel" if t.select_on == "novel" else "base",
        protocol=evaluator_lib.selection_settings(config))
    final_eval = evaluator_lib.from_config(config, model, mesh, dataset_dir, "novel")

  # ---- checkpoints: resume ----
  ckpt = ckpt_lib.CheckpointManager(workdir, max_to_keep=int(t.keep_checkpoints),
                                    keep_best=True, best_metric=SELECT_METRIC)
  start = 0
  # The newest intact checkpoint: a damaged one is moved aside (train.restore_fallback).
  restored = ckpt.restore_latest(_abstract(state, replicated), train_iter,
                                 fallback=bool(t.get("restore_fallback", True)), log=log)
  if restored is not None:
    state, start = restored.state, restored.step
    log(f"resumed from {ckpt.directory}/{start}")
  guard = ckpt_lib.DivergenceGuard(float(t.get("max_param_norm_ratio", 1e3)))
  guard.reset(state.trainable)  # the reference norm: at the start of the run or at resume
  if start > plan.total_steps:
    raise ValueError(f"{workdir} holds a checkpoint at step {start}, beyond this config's "
                     f"{plan.total_steps} steps; use another --workdir.")

  writer = logging_lib.MetricWriter(workdir)
  logging_lib.save_config(config, workdir)
  train_step = jax.jit(
      lambda s, b, r: step_lib.train_step(s, b, r, model=model, tx=tx),
      donate_argnums=(0,), out_shardings=(replicated, replicated))
  schedule = optim.make_schedule(config, plan.total_steps)
  keys = step_lib.device_keys(model)
  # Pictures of the first selection episodes (the same ones at every evaluation), drawn by
  # process 0 from the evaluation's own forward; every process joins that forward anyway.
  num_images = configs_lib.num_images(config) if writer.enabled else 0

  def evaluate(step):
    variables = state.variables()
    r = select_eval.run(variables, select_eval.protocol.seeds[0], desc=f"eval@{step}",
                        num_rows=num_images)
    if semantic:
      scores = {SELECT_METRIC: r.miou, **r.summary(prefix="val/")}
      log(f"[step {step}] base-class eval: {r.headline()}")
    else:
      scores = {SELECT_METRIC: r.miou, "select/fbiou": r.fbiou}
      if t.select_on == "novel":
        scores.update(r.summary(prefix="val/"))
      log(f"[step {step}] {t.select_on} eval ({r.meter.num_episodes} episodes): "
          f"mIoU {100 * r.miou:.2f}  FB-IoU {100 * r.fbiou:.2f}")
    writer.write_scalars(step, scores)
    writer.write_images(step, {f"eval/episode_{i}": row for i, row in enumerate(r.rows)})
    return scores

  result = {"step": start, "stopped": False}
  if t.eval_at_start and start == 0:
    evaluate(0)  # the untrained model's score, logged at step 0

  bar = logging_lib.ProgressBar(plan.total_steps, desc="train", unit="step", initial=start)
  pending, last_log, last_log_time = [], start, time.monotonic()
  with _StopRequest() as stop:
    try:
      for step in range(start + 1, plan.total_steps + 1):
        batch = next(train_iter)
        device_batch = sharding.host_batch_to_global({k: batch[k] for k in keys}, mesh)
        state, metrics = train_step(state, device_batch, train_rng)
        pending.append(metrics)
        bar.update(1)
        if step_hook is not None:
          step_hook(step, state, batch)

        if step % plan.log_every == 0 or step == plan.total_steps:
          finite = bool(np.all(jax.device_get([p["finite"] for p in pending])))
          if not finite:
            raise ckpt_lib.NonFiniteLossError(
                f"Non-finite loss between steps {last_log + 1} and {step}; the run stops here "
                f"and the last checkpoint ({ckpt.latest_step()}) is kept. Lower config.train.lr "
                "or inspect those batches before resuming.")
          scalars = _mean_metrics(pending)
          now = time.monotonic()
          scalars["lr"] = float(schedule(step - 1))
          scalars["episodes_per_s"] = ((step - last_log) * int(d.train_batch_size)
                                       / max(now - last_log_time, 1e-9))
          writer.write_scalars(step, scalars)
          if not bar.enabled:
            log(f"{bar.describe()}  loss {scalars['loss']:.4f}  "
                f"acc {scalars['pixel_acc']:.3f}  {scalars['episodes_per_s']:.1f} ep/s")
          pending, last_log, last_log_time = [], step, now

        is_eval = plan.is_eval_step(step)
        boundary = is_eval or plan.is_checkpoint_step(step)
        check = lambda: guard.check(  # divergence guard: before this state is scored or saved
            step, state.trainable, state.batch_stats,
            loss_finite=bool(np.all(jax.device_get([p["finite"] for p in pending]))))
        if boundary:
          check()
        scores = evaluate(step) if is_eval else None
        stopping = stop.requested(sync=boundary or step % plan.log_every == 0)
        if boundary or stopping:
          if not boundary:
            check()
          ckpt.save(step, state, train_iter, metrics=scores, force=True)
          ckpt.wait()  # a failed write (full disk, ...) stops the run here: CheckpointWriteError
        result["step"] = step
        if stopping:
          log(f"stopped at step {step}; checkpoint saved in {ckpt.directory}. Run the same "
              "command again to resume.")
          result["stopped"] = True
          break
    finally:
      bar.close()
      ckpt.wait()
      writer.flush()
      train_iter.close()  # stops data workers before the final evaluation starts its own

  if not result["stopped"]:
    result["final"] = final_evaluation(config, workdir, ckpt, state, final_eval, writer)
  ckpt.close()
  writer.close()
  return result


def final_evaluation(config, workdir, ckpt, state, final_eval, writer) -> dict:
  """Best checkpoint (else the last state) on the novel classes with ``final_eval``'s protocol
  (``evaluator.from_config``: ``config.eval.protocol``'s episodes, seeds and label mode)."""
  del config  # the protocol is final_eval's
  protocol = final_eval.protocol
  best = ckpt.best_step()
  last_step = int(jax.device_get(state.step))
  source = "last"
  if best is not None and best != last_step:
    template = _abstract(state, sharding.replicated(final_eval.mesh))
    state = ckpt.restore(best, state_template=template).state
    source = "best"
  step = best if source == "best" else last_step
  semantic = isinstance(final_eval, semantic_lib.SemanticEvaluator)
  log(f"final evaluation of the {source} checkpoint (step {step}) on "
      f"{'base' if semantic else 'novel'} classes, {protocol.describe()}")
  out = final_eval.run_protocol(state.variables(), log=log)
  last = out["runs"][-1]
  log(last.table())
  if semantic:
    log(f"final: {last.headline()}")
    summary = semantic_lib.results_json(last, **protocol.header(), checkpoint_step=step,
                                        checkpoint=source)
  else:
    log(f"final: {evaluator_lib.format_seeds(out)}")
    summary = evaluator_lib.results_json(out, **protocol.header(), checkpoint_step=step,
                                         checkpoint=source)
  writer.write_scalars(last_step, {"final/miou": out["miou"]["mean"],
                                   "final/fbiou": out["fbiou"]["mean"]})
  if jax.process_index() == 0:
    evaluator_lib.write_json(os.path.join(workdir, "final_metrics.json"), summary)
  return summary
