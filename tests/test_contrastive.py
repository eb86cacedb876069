"""The contrastive (CLIP / SigLIP) objective: the losses against loop references, what the
text tower reads, rows left out, learning on a fixed batch, the gin files and the hand-over
of the trunk to MM1."""

import dataclasses
import functools
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import checkpoint, contrastive, decoder, flops, gin_checks, gin_files, optim, train, vit
from mm1_jax import params as params_lib
from mm1_jax.contrastive import ContrastiveConfig
from helpers.handover import encoder_loaded_into

ENC = vit.ViTConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                    scan_layers=False)  # 2 x 2 = 4 patches
TEXT = decoder.DecoderConfig(vocab_size=64, width=32, depth=1, num_heads=2, num_kv_heads=2, head_dim=16,
                             mlp_dim=64, scan_layers=False)
CONFIG = ContrastiveConfig(encoder=ENC, text=TEXT, embed_dim=16, pool="map", pool_heads=2)
IMG = 3  # the `<image>` placeholder
# The programs here run a few times each: XLA's backend optimisations would cost more
# compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
  """jax.jit compiled with FAST_COMPILE, once per argument shapes."""
  compiled = {}

  def call(*args):
    leaves = jax.tree.leaves(args)
    key = jax.tree.structure(args), tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)
    if key not in compiled:
      compiled[key] = jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)
    return compiled[key](*args)
  return call


def _batch(rows, images, seq_len=12, size=8):
  """rows: token lists (0 is padding), then empty rows up to `size` (one compiled shape for
  most tests); images: uint8[len(rows), 16, 16, 3]."""
  tokens = np.zeros((size, seq_len), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
  seg = (tokens != 0).astype(np.int32)
  pixels = np.zeros((size, 1, 16, 16, 3), np.uint8)
  pixels[:len(rows), 0] = images
  return {"tokens": tokens, "targets": np.zeros_like(tokens), "loss_weights": seg.astype(np.float32),
          "segment_ids": seg, "positions": np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32),
          "images": pixels}


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


CAPTIONS = [[10, 11, 12, 13], [20, 21], [30, 31, 32], [40, 41, 42, 43, 44], [50, 51, 52]]


@functools.lru_cache(maxsize=None)
def _siglip_params():
  b = _batch([[IMG] + c for c in CAPTIONS], _images(len(CAPTIONS)))
  init = _jit(CONFIG.build().init)
  return nn.meta.unbox(init(jax.random.PRNGKey(0), b["tokens"], b["images"], b["segment_ids"],
                            b["positions"])["params"])


def _params(loss="siglip"):
  """The same towers for either loss (CLIP has no bias)."""
  params = dict(_siglip_params())
  if loss == "clip":
    del params["logit_bias"]
  return params


@functools.lru_cache(maxsize=None)
def _apply(config=CONFIG):
  """(params, batch) -> (loss, metrics, (image embeddings, caption embeddings, valid rows))."""
  def run(m, b):
    return (*m.loss(b, jax.random.PRNGKey(0)), m(b["tokens"], b["images"], b["segment_ids"], b["positions"]))
  model = config.build()
  return _jit(lambda p, b: model.apply({"params": p}, b, method=run))


# --- the losses against references computed pair by pair ----------------------------------

def _siglip_reference(img, txt, valid, t, b):
  idx = [i for i in range(len(valid)) if valid[i]]
  total = 0.0
  for i in idx:
    for j in idx:
      z = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-z * (t * float(np.dot(img[i], txt[j])) + b)))
  return total / len(idx)


def _clip_reference(img, txt, valid, s):
  idx = [i for i in range(len(valid)) if valid[i]]
  total = 0.0
  for i in idx:
    row = [s * float(np.dot(img[i], txt[j])) for j in idx]
    col = [s * float(np.dot(img[j], txt[i])) for j in idx]
    own = s * float(np.dot(img[i], txt[i]))
    total += 0.5 * (math.log(sum(math.exp(v) for v in row)) - own)
    total += 0.5 * (math.log(sum(math.exp(v) for v in col)) - own)
  return total / len(idx)


def test_the_siglip_and_clip_losses_match_pairwise_references():
  # Rows 0-4 are pairs; row 5 is text without an image, row 6 an image slot without a
  # placeholder (its pixels are not zero), row 7 padding: none may count, as image or caption.
  rows = [[IMG] + c for c in CAPTIONS] + [[60, 61, 62], [7, 8]]
  batch = _batch(rows, _images(7, seed=1))
  params = dict(_params(), logit_scale=jnp.float32(math.log(10.0)), logit_bias=jnp.float32(-3.0))
  loss, metrics, embedded = _apply()(params, batch)
  img, txt, valid = (np.asarray(x, np.float64) for x in embedded)
  assert valid.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
  valid = valid.astype(bool)
  # SigLIP, its bias away from -10 so that it must enter the logits.
  assert float(loss) == pytest.approx(_siglip_reference(img, txt, valid, 10.0, -3.0), rel=1e-4)
  assert float(metrics["logit_scale"]) == pytest.approx(10.0, rel=1e-5)
  assert float(metrics["num_pairs"]) == 5
  # CLIP, its scale capped at 100.
  clip = dataclasses.replace(CONFIG, loss="clip")
  for log_scale, scale in ((math.log(20.0), 20.0), (math.log(500.0), 100.0)):
    loss, metrics, _ = _apply(clip)(dict(_params("clip"), logit_scale=jnp.float32(log_scale)), batch)
    assert float(loss) == pytest.approx(_clip_reference(img, txt, valid, scale), rel=1e-4), scale
    assert float(metrics["logit_scale"]) == pytest.approx(scale, rel=1e-5)


def test_retrieval_accuracy_counts_rows_whose_own_pair_scores_highest():
  # Rows: images, columns: captions; pair 3 is not valid, so neither its row nor its column
  # may beat a valid pair's score.
  sim = jnp.array([[0.9, 0.1, 0.35, 0.95],
                   [0.5, 0.4, 0.1, 0.0],
                   [0.3, 0.2, 0.3, 0.0],
                   [0.0, 0.99, 0.0, 1.0]])
  i2t, t2i = contrastive.retrieval_accuracy(sim, jnp.array([True, True, True, False]))
  # Image -> caption: row 0 right, row 1 wrong (0.5 > 0.4), row 2 a tie with its own: right.
  # Caption -> image: column 0 right, column 1 right, column 2 wrong (0.35 > 0.3).
  assert float(i2t) == pytest.approx(2 / 3) and float(t2i) == pytest.approx(2 / 3)


# --- what the text tower reads ------------------------------------------------------------

def test_placeholders_padding_positions_and_rows_without_an_image_do_not_change_the_loss():
  images = _images(5, seed=2)
  params = _params()
  loss, m, _ = _apply()(params, _batch([[IMG] + c for c in CAPTIONS], images))
  # The placeholder after the caption or inside it, other positions (and with them other
  # padding); then rows without an image: text only, and a slot holding pixels whose text
  # has no placeholder.
  moved = [c + [IMG] for c in CAPTIONS[:2]] + [CAPTIONS[2][:1] + [IMG] + CAPTIONS[2][1:]] + \
      [[IMG] + c for c in CAPTIONS[3:]]
  other = _batch(moved + [[60, 61], [62, 63, 9]], np.concatenate([images, _images(2, seed=3)]))
  other["positions"] = np.random.default_rng(0).integers(0, 12, other["positions"].shape).astype(np.int32)
  loss2, m2, _ = _apply()(params, other)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
  for k in ("i2t_accuracy", "t2i_accuracy", "num_pairs", "positive_similarity", "negative_similarity"):
    assert float(m2[k]) == pytest.approx(float(m[k]), rel=1e-5, abs=1e-6), k


def test_the_caption_embedding_is_read_at_its_last_token():
  valid, positions, last = contrastive.text_inputs(
      jnp.array([[IMG, 10, 11, 12, 0, 0], [5, 6, IMG, 0, 0, 0], [IMG, 0, 0, 0, 0, 0]]),
      jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]), IMG)
  assert np.asarray(last).tolist() == [3, 1, 0]
  assert np.asarray(positions)[0, 1:4].tolist() == [0, 1, 2] and np.asarray(positions)[1, :2].tolist() == [0, 1]
  assert np.asarray(valid).sum(1).tolist() == [3, 2, 0]
  # Through the model: changing the last caption token moves the embedding (not so if it
  # were read earlier), so does dropping it (not so if it were read at the first token),
  # and changing an id in the padding (segment 0) does not (as it would if it were read at
  # the row's end).
  params = _params()
  rows = [[IMG, 10, 11, 12], [IMG, 10, 11, 13], [IMG, 10, 11], [IMG, 10, 11, 12]]
  batch = _batch(rows, _images(4))
  batch["tokens"][3, 6] = 40  # an id in the padding
  _, txt, _ = (np.asarray(x) for x in _apply()(params, batch)[2])
  assert np.abs(txt[0] - txt[1]).max() > 1e-3 and np.abs(txt[0] - txt[2]).max() > 1e-3
  np.testing.assert_allclose(txt[3], txt[0], atol=1e-6)


# --- learning ------------------------------------------------------------------------------

def test_a_few_steps_on_matching_pairs_learn_to_retrieve_them():
  n = 8
  rng = np.random.default_rng(0)
  captions = [[IMG] + rng.integers(10, 64, 3).tolist() for _ in range(n)]
  batch = {k: jnp.asarray(v) for k, v in _batch(captions, _images(n, seed=4)).items()}
  model = CONFIG.build()
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(peak_lr=3e-3, warmup_steps=0, weight_decay=0.0), 40)
  params = _params()
  state = train.TrainState.create(params, tx.init(params))
  step = _jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule))
  first = None
  for _ in range(40):
    state, metrics = step(state, batch)
    first = first or metrics
  assert float(metrics["loss"]) < 0.5 * float(first["loss"]), (first["loss"], metrics["loss"])
  assert float(first["i2t_accuracy"]) <= 0.5
  assert float(metrics["i2t_accuracy"]) == float(metrics["t2i_accuracy"]) == 1.0
  # The image pooling and projection learned (the trunk alone cannot tell the images apart).
  assert not np.allclose(state.params["image_proj"]["kernel"], params["image_proj"]["kernel"])


# --- gin files, FLOPs, the hand-over to MM1 ------------------------------------------------

def _gin_model(files, bindings=()):
  gin.clear_config(clear_constants=True)
  gin_checks.parse(files, list(bindings), [str(gin_files.root())])
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  data = gin.query_parameter("train.train.data").scoped_configurable_fn()
  gin.clear_config(clear_constants=True)
  return config, data


def test_model_flops_agree_with_the_compiler():
  batch = _batch([[IMG] + c for c in CAPTIONS[:4]] * 2, _images(8))
  args = (batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
  model = CONFIG.build()
  xla = jax.jit(lambda p: model.apply({"params": p}, *args)).lower(_params()).cost_analysis()["flops"]
  # What the compiled forward computes: every position of the 8 x 12 rows (one a placeholder)
  # through the text tower, the full 12 x 12 attention matrix of each row.
  ours = flops.forward_flops(_params(), CONFIG, flops.Work(tokens=8 * 12, images=8, attention_pairs=8 * 12 * 12))
  assert 0.8 < ours / xla < 1.25, (ours, xla)


def test_experiment_builds_and_its_trunk_starts_mm1(tmp_path):
  config, data = _gin_model(["gin/experiments/contrastive_pretrain.gin"])
  assert isinstance(config, ContrastiveConfig) and config.loss == "siglip" and config.tokens_per_image == 1
  assert data.mixture_or_task_name == "mm1_shapes_caption" and data.max_images == 1 and not data.pack
  assert data.batch_size >= 64  # contrastive losses learn from the batch's other pairs
  clip, _ = _gin_model(["gin/experiments/contrastive_pretrain.gin"], ["CONTRASTIVE_LOSS = 'clip'"])
  assert clip.loss == "clip" and clip.initial_logit_scale == pytest.approx(math.log(1 / 0.07))
  mm1_config, _ = _gin_model(["gin/experiments/quickstart.gin"])
  assert config.encoder == mm1_config.encoder  # the quickstart takes the trunk as it is

  # A checkpoint of the objective, as mm1-train writes it; its encoder loads into MM1.
  rng = np.random.default_rng(0)
  abstract = params_lib.abstract_params(config)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
  assert {"encoder", "image_pool", "image_proj", "text", "text_proj", "logit_scale", "logit_bias"} == set(params)
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.save(1, train.TrainState.create(params, {}), {}, force=True)
  ckpt.close()

  loaded = encoder_loaded_into(mm1_config, tmp_path / "checkpoints")
  for a, b in zip(jax.tree.leaves(loaded["encoder"]), jax.tree.leaves(params["encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.asarray(loaded["decoder"]["embedding"]["embedding"]).any()  # the text tower stays behind
