"""MM1 pre-training: the sharded train step and the training loop.

`train()` is the gin-configured entry point behind `mm1-train`. The train step is
one jax.jit with explicit in/out shardings derived from the parameters' logical axis
names and the mesh rules, so the same code runs on one CPU and on a TPU pod.

The data stack (tensorflow, seqio) and the evaluator are imported inside `train()`,
so this module and the train step import with jax alone.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import signal
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mm1_jax import distributed
from mm1_jax import flops as flops_lib
from mm1_jax import goodput as goodput_lib
from mm1_jax import hardware
from mm1_jax import moe as moe_lib
from mm1_jax import optim
from mm1_jax import paths
from mm1_jax import sharding as sharding_lib
from mm1_jax.checkpoint import Checkpointer
from mm1_jax.contrastive import ImageObjectiveConfig
from mm1_jax.data import loader
from mm1_jax.eval import fewshot, report
from mm1_jax.metrics_writer import MetricWriter
from mm1_jax.model import MM1, MM1Config, cross_entropy_at_targets
from mm1_jax.pretrained import load_pretrained

BATCH_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions", "images")


class TrainState(flax.struct.PyTreeNode):
  """What a checkpoint holds of the model side of a run.

  `nonfinite_total` counts the steps whose loss or gradients were NaN/Inf (their
  updates were skipped); `nonfinite_streak` how many of the newest steps in a row were.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array

  @classmethod
  def create(cls, params: Any, opt_state: Any) -> "TrainState":
    zero = jnp.zeros((), jnp.int32)
    return cls(step=zero, params=params, opt_state=opt_state, nonfinite_total=zero, nonfinite_streak=zero)


def dummy_batch(batch_size: int, seq_len: int, max_images: int, config: MM1Config | ImageObjectiveConfig
                ) -> dict:
  """Zero arrays with the shapes and dtypes of a real batch."""
  s = config.encoder.image_size
  i32 = lambda: np.zeros((batch_size, seq_len), np.int32)  # noqa: E731
  return {"tokens": i32(), "targets": i32(), "loss_weights": np.zeros((batch_size, seq_len), np.float32),
          "segment_ids": np.ones((batch_size, seq_len), np.int32), "positions": i32(),
          "images": np.zeros((batch_size, max_images, s, s, 3), np.uint8)}


def _boxed_params(model: MM1, batch: dict, rng: jax.Array):
  """Fresh parameters, still boxed with their logical axis names."""
  return model.init(rng, batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])["params"]


def _boxed_state_fn(model: MM1, tx: optax.GradientTransformation, batch: dict):
  def boxed_init(rng):
    params = _boxed_params(model, batch, rng)
    return TrainState.create(params, tx.init(params))
  return boxed_init


def abstract_train_state(model: MM1, tx: optax.GradientTransformation, batch: dict,
                         mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, TrainState]:
  """(TrainState of jax.ShapeDtypeStructs carrying their shardings, the shardings),
  with nothing allocated: what an ahead-of-time compile for another machine needs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: nothing is placed on the mesh
    boxed = jax.eval_shape(_boxed_state_fn(model, tx, batch), key)
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def init_train_state(model: MM1, tx: optax.GradientTransformation, batch: dict, rng: jax.Array,
                     mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, TrainState]:
  """Initialises parameters and optimizer state directly in their shardings.

  Returns:
    (state, shardings): shardings is a TrainState of NamedShardings.
  """
  boxed_init = _boxed_state_fn(model, tx, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(boxed_init, rng)
    shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
    state = jax.jit(lambda r: nn.meta.unbox(boxed_init(r)), out_shardings=shardings)(rng)
  return state, shardings


def init_param_shardings(model: MM1, batch: dict, mesh: jax.sharding.Mesh, rules):
  """(abstract params, their NamedShardings), without materialising anything."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: _boxed_params(model, batch, jax.random.PRNGKey(0)))
  # Unboxed outside the mesh context: unboxing there would apply sharding constraints eagerly.
  return nn.meta.unbox(boxed), sharding_lib.logical_shardings(boxed, mesh, rules)


def _mm1_loss(params, *, model: MM1, batch: dict, z_loss: float,
              logit_positions: int | None = None) -> tuple[jax.Array, dict]:
  """MM1's next-token loss, plus the sparse layers' load-balance and router z-losses.
  `logit_positions`: the LM head only at positions with loss (`cross_entropy_at_targets`)."""
  moe_config = model.config.decoder.moe
  hidden, stats = model.apply({"params": params}, batch["tokens"], batch["images"],
                              batch["segment_ids"], batch["positions"], hidden=True,
                              mutable=[moe_lib.AUX_COLLECTION])
  head = lambda h: model.apply({"params": params}, h, method=MM1.head)  # noqa: E731
  loss, metrics = cross_entropy_at_targets(hidden, head, batch["targets"], batch["loss_weights"], z_loss,
                                           logit_positions)
  if moe_config is not None:
    moe_stats = moe_lib.summarize_aux(stats.get(moe_lib.AUX_COLLECTION, {}))
    loss += (moe_config.load_balance_weight * moe_stats["load_balance"]
             + moe_config.router_z_weight * moe_stats["router_z"])
    metrics.update({f"moe_{k}": v for k, v in moe_stats.items()}, total_loss=loss)
  return loss, metrics


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, z_loss: float = 0.0, seed: int = 0,
               logit_positions: int | None = None) -> tuple[TrainState, dict]:
  """One optimizer step. `model` is MM1, or an encoder pre-training objective (`mm1_jax.aim`,
  `mm1_jax.contrastive`) whose `loss(batch, rng)` is used; that rng is a function of `seed`
  and the step, so a resumed run draws what the uninterrupted one would have.
  `logit_positions` applies to MM1 only (`cross_entropy_at_targets`)."""
  if isinstance(model, MM1):
    loss_fn = functools.partial(_mm1_loss, model=model, batch=batch, z_loss=z_loss,
                                logit_positions=logit_positions)
  else:
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    loss_fn = lambda params: model.apply({"params": params}, batch, rng, method="loss")  # noqa: E731

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A NaN/Inf loss or gradient skips the update: parameters and optimizer moments stay
  # as they were (the select fuses into the update, it costs no extra pass), the step
  # and with it the data position still advance, and the fault is counted.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  bad = (~finite).astype(jnp.int32)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         nonfinite_total=state.nonfinite_total + bad,
                         nonfinite_streak=(state.nonfinite_streak + 1) * bad)
  # The rate this step's update applies: the optimizer's schedule counts applied updates only
  # (a skipped step keeps the old optimizer state), so after skips it trails the step.
  applied = state.step - state.nonfinite_total
  metrics = dict(aux, grad_norm=grad_norm, learning_rate=schedule(applied),
                 update_skipped=bad,
                 nonfinite_total=new_state.nonfinite_total, nonfinite_streak=new_state.nonfinite_streak)
  return new_state, metrics


def make_train_step(model: nn.Module, tx, schedule, state_shardings, batch_shardings, z_loss: float = 0.0,
                    seed: int = 0, logit_positions: int | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=z_loss, seed=seed,
                           logit_positions=logit_positions)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def global_batch(local: dict, shardings: dict) -> dict:
  """Host-local numpy batch -> global jax arrays laid out by `shardings`."""
  return {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in BATCH_KEYS}


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks between steps; a second SIGINT aborts."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _DataStream:
  """The training batches, and where the loader's position is kept across restarts.

  One process: the grain loader's state goes into each checkpoint's data record.
  Several processes: each keeps its own state in <workdir>/loader_state/step_<N>/
  host_<i>.json, written when checkpoint N is started (orbax writes the data record
  from one process only). A resumed run restores that state, or, if it is missing (the
  tf.data loader, or a checkpoint from before), re-reads the consumed batches:
  deterministic, only slower.
  """

  def __init__(self, data, model: MM1Config, host: tuple[int, int], workdir: paths.PathLike, start: int,
               batches_consumed: int, data_state: dict):
    from mm1_jax.data import pipeline  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

    self.host, self.dir = host, workdir / "loader_state"
    kw = dict(tokens_per_image=model.tokens_per_image, image_size=model.encoder.image_size,
              shard_index=host[0], num_shards=host[1])
    self.grain = data.loader == "grain"
    if not self.grain:
      self._tf_stats = collections.Counter()  # counted as the tf.data pipeline reads (restarts anew on resume)
      self.batches = pipeline.iterate(pipeline.make_dataset(data, start_batch=batches_consumed,
                                                            stats=self._tf_stats, **kw))
      return
    self.batches = loader.make_loader(data, **kw)
    state = data_state.get("loader") if host[1] == 1 else self._read(start)
    if state is not None:
      self.batches.set_state(state)
    else:
      for _ in range(batches_consumed):
        next(self.batches)

  def __next__(self):
    return next(self.batches)

  def skipped(self) -> dict[str, int]:
    return self.batches.skipped() if self.grain else {}

  def stats(self) -> dict[str, int]:
    """Long documents split into several sequences, and the pieces they gave."""
    return self.batches.stats() if self.grain else dict(self._tf_stats)

  def record(self) -> dict:
    """The loader's part of the checkpoint's data record."""
    return {"loader": self.batches.get_state()} if self.grain and self.host[1] == 1 else {}

  def saved(self, step: int, kept: list[int]) -> None:
    """Called when checkpoint `step` was started: keeps this host's state beside it."""
    if not self.grain or self.host[1] == 1:
      return
    paths.write_text_atomic(self.dir / f"step_{step}" / f"host_{self.host[0]}.json",
                            json.dumps(self.batches.get_state()))
    for old in self.dir.glob(f"step_*/host_{self.host[0]}.json"):  # this host's states of checkpoints gone
      n = int(old.parent.name.split("_")[1])
      if n < step and n not in kept:
        old.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # the last host out removes the (local) folder
          old.parent.rmdir()

  def _read(self, step: int) -> dict | None:
    path = self.dir / f"step_{step}" / f"host_{self.host[0]}.json"
    return json.loads(path.read_text()) if step and path.exists() else None


class NonfiniteError(FloatingPointError):
  """`streak` train steps in a row, the newest `step`, had a NaN/Inf loss or gradient."""

  def __init__(self, step: int, streak: int, loss: float, grad_norm: float):
    first = step - streak + 1
    steps = f"step {step}" if streak == 1 else f"steps {first}..{step}"
    super().__init__(f"stopping at step {step}: loss or gradients were NaN/Inf at {streak} consecutive "
                     f"{steps} (last loss {loss}, gradient norm {grad_norm})")
    self.step, self.streak = step, streak


class _NonfiniteGuard:
  """Reads each step's fault counters one step late, so the host never waits on the
  device; reports skipped steps and raises NonfiniteError after `limit` in a row."""

  def __init__(self, limit: int, echo: Callable[[str], None]):
    self.limit, self.echo = limit, echo
    self.pending: tuple[int, dict] | None = None

  def check_previous(self) -> None:
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    keys = ("nonfinite_streak", "nonfinite_total", "loss", "grad_norm")
    streak, total, loss, grad_norm = jax.device_get(tuple(metrics[k] for k in keys))
    if not streak:  # a finite step resets the streak
      return
    self.echo(f"step {step}: loss {float(loss)}, gradient norm {float(grad_norm)}: update skipped "
              f"({int(streak)} in a row, {int(total)} in this run)")
    if self.limit and streak >= self.limit:
      raise NonfiniteError(step, int(streak), float(loss), float(grad_norm))


def _hang_watchdog(factor: float, min_seconds: float, warmup: int, workdir: paths.PathLike,
                   ledger: goodput_lib.Ledger) -> goodput_lib.HangWatchdog:
  """The watchdog of the step loop: on a hang, stacks to stderr and <workdir>/hang_host<i>.txt,
  a hang record in the goodput ledger, then exit code EXIT_HANG."""
  index = jax.process_index()

  def on_hang(info: dict) -> None:
    goodput_lib.dump_stacks(info, workdir / f"hang_host{index}.txt", index)
    ledger.finish(goodput_lib.EXIT_HANG, "hang", lock_timeout=10, **info)

  return goodput_lib.HangWatchdog(factor, min_seconds, warmup=max(1, warmup), on_hang=on_hang)


def train(*, workdir: str, model: MM1Config | ImageObjectiveConfig = MM1Config(), data=None,
          optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
          mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig(),
          train_steps: int = 1000, log_every: int = 10, checkpoint_every: int = 100,
          keep_checkpoints: int = 3, evaluation=None, eval_every: int = 0, z_loss: float = 0.0,
          seed: int = 0, peak_flops_per_device: float | None = None, progress: bool = True,
          init_from: Sequence[str] = (), stop_after_steps: int = 0,
          max_consecutive_nonfinite: int = 5, eval_at_start: bool = True, hang_factor: float = 20.0,
          hang_min_seconds: float = 600.0, hang_warmup_steps: int = 5,
          logit_positions: int | None = None) -> int:
  """Pre-trains MM1, or an image encoder with `model` an `mm1_jax.aim` or
  `mm1_jax.contrastive` objective config;
  resumes from the newest checkpoint in `<workdir>/checkpoints`.

  Args:
    workdir: where checkpoints, metrics.jsonl, tensorboard/ and eval/ go.
    model: the MM1 composite config.
    data: a `mm1_jax.data.pipeline.DataConfig` (default: the bundled mixture).
    optimizer: AdamW / schedule settings.
    mesh: mesh shape and logical-axis rules.
    train_steps: total optimizer steps.
    log_every: steps between metric records.
    checkpoint_every: steps between checkpoints (one is always written at the end).
    keep_checkpoints: newest checkpoints kept.
    evaluation: a `mm1_jax.eval.fewshot.FewShotConfig`; runs at step 0 (unless
      `eval_at_start` is False), every `eval_every` steps (0: never in between) and at the end.
    z_loss: weight of the output log-partition penalty.
    seed: parameter-initialisation seed.
    peak_flops_per_device: the MFU denominator, per device; None takes the device's own
      (`mm1_jax.hardware.device_peak`).
    progress: show a progress bar.
    init_from: directories of pre-trained parts (`mm1-convert import` outputs or
      another run's checkpoints/), loaded into a fresh run; ignored on resume.
      `DIR:encoder` takes only the named parts (an AIM / AIMv2 / CLIP / SigLIP trunk).
    stop_after_steps: end this run after that many steps, with a checkpoint, exit
      code 0 (time-sliced jobs: the same command continues); 0 runs to train_steps.
    max_consecutive_nonfinite: a step whose loss or gradients are NaN/Inf is skipped
      and counted; this many in a row stop the run (exit code 3).
    hang_factor: the hang watchdog: once `hang_warmup_steps` steps are done, a step that
      runs longer than max(hang_min_seconds, hang_factor x the median of the last 50
      steps) dumps every thread's stack (stderr and <workdir>/hang_host<i>.txt) and ends
      the process with exit code 75 (`goodput.EXIT_HANG`); 0 disables it. Checkpoint
      saves and evaluations are not timed by it.
    hang_min_seconds: the shortest deadline the watchdog gives a step.
    hang_warmup_steps: steps of each process before the watchdog arms (the first compiles).
    logit_positions: run the LM head only at positions with loss, up to this many a row
      (`model.cross_entropy_at_targets`; a batch with a fuller row takes the full head, and
      the step's metric `logits_full_head` is 1, seen on logged steps). None: the head at
      every position. The loss is the same either way (up to summation order); the MFU's
      useful FLOPs still count the head at every position.
  Returns:
    0 when train_steps were reached (or stop_after_steps); 3 when stopped by
    non-finite steps; 128 + signal number when stopped by a signal. A hang ends the
    process with 75 from the watchdog thread. Goodput is kept in <workdir>/goodput.json
    (`mm1_jax.goodput`) and logged as goodput and badput_* with the metrics.
  """
  from mm1_jax.data import pipeline, vocabulary  # noqa: PLC0415  (they load tensorflow, seqio)

  data = data or pipeline.DataConfig()
  if isinstance(model, MM1Config):  # before compiling anything: the data's ids must fit the model
    source = pipeline.get_mixture_or_task(data)
    vocabulary.check_model(pipeline.special_ids_of(source), model, f"the vocabulary of {source.name!r}")
  workdir_path = paths.path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  # Process 0 keeps the run's goodput ledger; the others count their own attempt only.
  ledger = goodput_lib.Ledger(workdir_path, write=jax.process_index() == 0,
                              started=goodput_lib.process_start_time())
  device_mesh = sharding_lib.make_mesh(mesh)
  rules = mesh.rules
  if data.batch_size % sharding_lib.batch_divisor(device_mesh, rules):
    raise ValueError(f"batch_size {data.batch_size} does not split over the mesh {device_mesh.shape}")

  mm1 = model.build()
  tx, schedule = optim.make_optimizer(optimizer, train_steps)
  example = dummy_batch(data.batch_size, data.seq_len, data.image_slots, model)
  batch_shardings = {k: sharding_lib.batch_sharding(device_mesh, rules, v.ndim) for k, v in example.items()}
  state, state_shardings = init_train_state(mm1, tx, example, jax.random.PRNGKey(seed), device_mesh, rules)
  step_fn = make_train_step(mm1, tx, schedule, state_shardings, batch_shardings, z_loss, seed, logit_positions)

  ckpt = Checkpointer(workdir_path / "checkpoints", save_every=checkpoint_every,
                      max_to_keep=keep_checkpoints, remove_partial=jax.process_index() == 0)
  start = ckpt.latest_step() or 0
  batches_consumed = 0
  data_state = {}
  if start:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_shardings)
    state, data_state = ckpt.restore(start, abstract)
    batches_consumed = int(data_state.get("batches_consumed", start))
    print(f"resumed from {ckpt.directory}/{start} ({batches_consumed} batches consumed)")
  elif init_from:
    state = state.replace(params=load_pretrained(state.params, state_shardings.params, init_from, model))
  ledger.begin(start)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  slot_flops = flops_lib.train_flops_per_step(state.params, model, data.batch_size, data.seq_len,
                                              data.image_slots)
  count_useful = flops_lib.useful_flops_counter(state.params, model)
  if peak_flops_per_device is None:
    try:
      device_peak = hardware.device_peak()
      peak_flops_per_device = device_peak.flops_per_s
      print(f"MFU peak: {device_peak.derivation}")
    except (ValueError, RuntimeError) as e:  # an unknown device: no MFU rather than a wrong one
      print(f"MFU not reported: {e}")
  peak = peak_flops_per_device * device_mesh.size if peak_flops_per_device else float("nan")
  print(f"model: {n_params / 1e6:.2f}M parameters, {slot_flops / 1e9:.1f} GFLOPs per step with every "
        f"token and image slot filled; mesh {dict(device_mesh.shape)}")

  evaluator = None
  if evaluation is not None:
    evaluator = fewshot.Evaluator(evaluation, mm1, device_mesh, rules)

  def run_eval(step):
    if evaluator is not None and not (workdir_path / "eval" / f"step_{step}.json").exists():
      with ledger.timed("eval"):
        evaluator.evaluate_and_write(state.params, step, workdir_path)

  if start == 0 and eval_at_start:
    run_eval(0)

  host = jax.process_index(), jax.process_count()
  batches = _DataStream(data, model, host, workdir_path, start, batches_consumed, data_state)
  echo = tqdm.write if progress else print
  writer = MetricWriter(workdir_path, echo=echo, files=host[0] == 0)  # one writer of the run's files
  q = model.tokens_per_image
  step = start
  t_last, seqs, images, tokens, useful_flops = time.perf_counter(), 0, 0, 0, 0.0
  exit_code = 0
  guard = _NonfiniteGuard(max_consecutive_nonfinite, echo)
  watchdog = _hang_watchdog(hang_factor, hang_min_seconds, hang_warmup_steps, workdir_path, ledger)
  ledger.loop_started()
  try:
    with _StopRequest() as stop, jax.set_mesh(device_mesh), nn.logical_axis_rules(rules):
      bar = tqdm(total=train_steps, initial=start, desc="train", unit="step", disable=not progress,
                 dynamic_ncols=True)
      watchdog.start()
      while step < train_steps:
        watchdog.begin(step + 1)
        t_iteration = time.perf_counter()
        with ledger.timed("data"):
          local = next(batches)
          inputs = global_batch(local, batch_shardings)
        if step == start and host[1] > 1:  # every process compiles before any enters the step's collectives
          step_fn = distributed.compile_together(step_fn, state, inputs, name="train step")
        state, metrics = step_fn(state, inputs)
        step += 1
        # The previous step's fault counters, read while this step runs (no stall).
        guard.check_previous()
        guard.pending = (step, metrics)
        batches_consumed += 1
        seqs += local["tokens"].shape[0] * host[1]
        tokens += local["tokens"].size * host[1]
        images += int((local["tokens"] == model.image_token_id).sum()) // q * host[1]
        # MFU counts real tokens, images and causal pairs (hosts' batches are alike in shape;
        # this host's share stands for each host's).
        useful_flops += count_useful(local) * host[1]
        bar.update()
        if step % log_every == 0 or step == train_steps:
          metrics = jax.device_get(metrics)
          # Records skipped so far, by reason (grain loader).
          metrics.update({f"data_skipped_{k}": v for k, v in batches.skipped().items()})
          metrics.update({f"data_{k}": v for k, v in batches.stats().items()})
          dt = time.perf_counter() - t_last
          steps_done = seqs / data.batch_size
          metrics.update({"tokens_per_s": tokens / dt, "images_per_s": images / dt,
                          "step_time_s": dt / steps_done, "mfu": useful_flops / dt / peak,
                          "mfu_slots": slot_flops * steps_done / dt / peak})
          if host[0] == 0:
            ledger.flush()
            metrics.update(ledger.metrics())
          writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.3f}")
          t_last, seqs, images, tokens, useful_flops = time.perf_counter(), 0, 0, 0, 0.0
        sliced = bool(stop_after_steps) and step - start >= stop_after_steps and step < train_steps
        # Read the stop flag once: a signal that lands after the save below is acted on
        # after the next step's save, never by stopping without one.
        stopping = stop.signum
        watchdog.end()  # checkpoints and evaluations are not timed by the watchdog
        with ledger.timed("checkpoint"):
          saved = ckpt.save(step, state, dict(batches_consumed=batches_consumed, **batches.record()),
                            force=stopping is not None or sliced or step == train_steps)
          if saved:
            batches.saved(step, ckpt.all_steps())
        if saved:
          ledger.checkpoint(step)
          ledger.flush()
          writer.sync()  # a bucket workdir: its metrics reach the checkpoint just started
        if eval_every and step % eval_every == 0 and step != train_steps:
          run_eval(step)
        # Goodput: this iteration's time less its data, checkpoint and evaluation time (the
        # host runs ahead of the device, so the step's time is wherever it waits for it);
        # the first compiles.
        ledger.step(step, time.perf_counter() - t_iteration, compile=step == start + 1)
        if stopping is not None:
          exit_code = 128 + stopping
          break
        if sliced:
          break
      guard.check_previous()
      bar.close()
  except NonfiniteError as e:
    watchdog.stop()
    with ledger.timed("checkpoint"):
      ckpt.wait()
    ledger.finish(3, "non-finite steps", step=e.step)
    newest = ckpt.latest_step()
    print(f"error: {e}\nUpdates at those steps were skipped, so parameters are those of step "
          f"{e.step - e.streak}. Newest checkpoint: step {newest}. Lower the learning rate or "
          f"inspect the data of those steps, then run the same command to resume from it.",
          file=sys.stderr, flush=True)
    return 3
  except BaseException as e:  # a crash: say so in the ledger, then let it propagate
    watchdog.stop()
    ledger.finish(1, f"error: {type(e).__name__}", step=step)
    raise
  finally:  # also on errors: let in-flight async saves finish so no checkpoint is half-written
    watchdog.stop()
    try:
      with ledger.timed("checkpoint"):
        ckpt.close()  # raises the error of a save that failed
    finally:
      writer.close()  # the metrics reach the workdir either way
  if exit_code or step < train_steps:
    ledger.finish(exit_code, f"stopped by {signal.Signals(exit_code - 128).name}" if exit_code else
                  "stop_after_steps reached", step=step)
    print(goodput_lib.describe(ledger.summary()))
    newest = Checkpointer(ckpt.directory).latest_step()  # read back from disk
    if newest != step:  # the forced save above did not land: say so rather than claim it did
      print(f"warning: stopped at step {step} but the newest checkpoint is step {newest} "
            f"(steps on disk: {ckpt.all_steps()})", file=sys.stderr, flush=True)
    print(f"stopped at step {step}; newest checkpoint: step {newest}. Run the same command to resume.")
    return exit_code
  run_eval(step)
  if evaluator is not None:
    print(report.comparison_table(workdir_path / "eval"))
  ledger.finish(0, "done", step=step)
  print(goodput_lib.describe(ledger.summary()))
  if host[0] == 0:
    paths.write_text_atomic(workdir_path / "train_done.json", json.dumps({"step": step}))
  return 0
