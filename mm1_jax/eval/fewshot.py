"""k-shot captioning and VQA evaluation with batched greedy KV-cache decoding.

Prompts interleave k demonstrations (image + answer) drawn with a fixed seed from
the benchmark's support split, then the query image:

  caption  <image>{caption}\\n ... <image>                       -> "{caption}"
  vqa      <image>Question: {q} Answer: {a}\\n ... <image>Question: {q} Answer:  -> " {a}"

Generation stops at EOS or a newline. Results go to <workdir>/eval/step_<N>.json as
{"step": N, "results": {"<task>/<k>shot/<metric>": value}} (plus a samples file).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax import decoder as decoder_lib
from mm1_jax import sharding as sharding_lib
from mm1_jax.data.tokenizer import EOS_ID, IMAGE_ID, NEWLINE_ID, PAD_ID
from mm1_jax.eval import metrics
from mm1_jax.model import MM1

TEMPLATES = {
    "caption": ("<image>{caption}\n", "<image>"),
    "vqa": ("<image>Question: {question} Answer: {answer}\n", "<image>Question: {question} Answer:"),
}
METRIC = {"caption": "cider", "vqa": "accuracy"}


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """Attributes:
    tasks: benchmark kinds to run, keys of `task_names`.
    shots: numbers of demonstrations.
    num_queries: test examples scored per task (capped at the split size).
    batch_size: prompts decoded together (a multiple of the mesh's batch shards).
    max_new_tokens: decoding budget per answer.
    seed: demonstration sampling seed.
    task_names: seqio task of each benchmark kind (splits "support" and "test").
    module_imports: modules that register those tasks.
  """

  tasks: tuple[str, ...] = ("caption", "vqa")
  shots: tuple[int, ...] = (0, 4)
  num_queries: int = 128
  batch_size: int = 32
  max_new_tokens: int = 24
  seed: int = 0
  task_names: tuple[tuple[str, str], ...] = (("caption", "mm1_shapes_caption_eval"),
                                             ("vqa", "mm1_shapes_vqa_eval"))
  module_imports: tuple[str, ...] = ("tasks",)


def load_split(task_name: str, split: str, image_size: int, module_imports=("tasks",)) -> list[dict]:
  """Raw records of a registered eval task as Python dicts with decoded uint8 images."""
  import importlib  # noqa: PLC0415

  import seqio  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  for m in module_imports:
    importlib.import_module(m)
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False, num_epochs=1, use_cached=False)
  out = []
  for ex in ds.as_numpy_iterator():
    rec = {}
    for k, v in ex.items():
      if isinstance(v, bytes) and k != "image":
        v = v.decode("utf-8")
      elif isinstance(v, np.ndarray) and v.dtype == object:
        v = [x.decode("utf-8") for x in v]
      rec[k] = v
    img = Image.open(io.BytesIO(rec.pop("image"))).convert("RGB")
    if img.size != (image_size, image_size):
      img = img.resize((image_size, image_size), Image.BICUBIC)
    rec["image"] = np.asarray(img, np.uint8)
    out.append(rec)
  return out


def build_prompt(kind: str, demos: list[dict], query: dict) -> tuple[str, list[np.ndarray]]:
  demo_t, query_t = TEMPLATES[kind]
  fill = lambda t, ex: t.format(caption=ex.get("caption", ""), question=ex.get("question", ""),  # noqa: E731
                                answer=(ex.get("answers") or [""])[0])
  text = "".join(fill(demo_t, d) for d in demos) + fill(query_t, query)
  return text, [d["image"] for d in demos] + [query["image"]]


def choose_demos(support: list[dict], query: dict, k: int, seed: int, index: int) -> list[dict]:
  """k demonstrations, fixed per (seed, query index), never the query's own image."""
  pool = [s for s in support if s["id"] != query["id"] and not np.array_equal(s["image"], query["image"])]
  if k > len(pool):
    raise ValueError(f"{k} shots requested but the support split has {len(pool)} usable examples")
  rng = np.random.default_rng([seed, index])
  return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _generate(params, tokens, valid, images, *, model: MM1, max_new: int):
  """Greedy decoding. tokens int32[B, P] left-padded, valid bool[B, P] -> int32[B, max_new]."""
  b, p = tokens.shape
  cache = decoder_lib.init_cache(model.config.decoder, b, p + max_new)
  logits, cache = model.apply({"params": params}, tokens, images, valid, cache, method=MM1.prefill)
  kv_valid = jnp.pad(valid, ((0, 0), (0, max_new)))
  next_pos = valid.sum(axis=1).astype(jnp.int32)
  banned = jnp.asarray([PAD_ID, IMAGE_ID])

  def body(i, carry):
    logits, cache, kv_valid, out, done = carry
    tok = jnp.argmax(logits.at[:, banned].set(-jnp.inf), axis=-1).astype(jnp.int32)
    tok = jnp.where(done, PAD_ID, tok)
    out = out.at[:, i].set(tok)
    done = done | (tok == EOS_ID) | (tok == NEWLINE_ID)
    kv_valid = kv_valid.at[:, p + i].set(True)
    logits, cache = model.apply({"params": params}, tok, next_pos + i, kv_valid, cache, p + i,
                                method=MM1.decode_step)
    return logits, cache, kv_valid, out, done

  out = jnp.zeros((b, max_new), jnp.int32)
  done = jnp.zeros((b,), bool)
  _, _, _, out, _ = jax.lax.fori_loop(0, max_new, body, (logits, cache, kv_valid, out, done))
  return out


class Evaluator:
  """Runs the configured few-shot benchmarks on a set of parameters."""

  def __init__(self, config: FewShotConfig, model: MM1, mesh: jax.sharding.Mesh, rules):
    from mm1_jax.data import tokenizer  # noqa: PLC0415

    self.config = config
    self.model = model
    self.mesh = mesh
    self.rules = rules
    self.sp = tokenizer.load()
    if config.batch_size % sharding_lib.batch_divisor(mesh, rules):
      raise ValueError(f"eval batch_size {config.batch_size} does not split over mesh {mesh.shape}")
    size = model.config.encoder.image_size
    names = dict(config.task_names)
    self.splits = {}
    for kind in config.tasks:
      if kind not in TEMPLATES:
        raise ValueError(f"unknown eval task {kind!r}; known: {sorted(TEMPLATES)}")
      self.splits[kind] = {s: load_split(names[kind], s, size, config.module_imports)
                           for s in ("support", "test")}
    self._generate = jax.jit(functools.partial(_generate, model=model, max_new=config.max_new_tokens))

  def _encode(self, text: str) -> np.ndarray:
    ids = np.asarray(self.sp.encode(text), np.int32)
    q = self.model.config.tokens_per_image
    return np.repeat(ids, np.where(ids == IMAGE_ID, q, 1))

  def _decode_batch(self, params, prompts: list[tuple[str, list[np.ndarray]]], n_images: int
                    ) -> tuple[list[str], int]:
    bs = self.config.batch_size
    size = self.model.config.encoder.image_size
    encoded = [self._encode(t) for t, _ in prompts]
    p = -(-max(len(e) for e in encoded) // 32) * 32  # bucket lengths to limit recompiles
    tokens = np.full((bs, p), PAD_ID, np.int32)
    valid = np.zeros((bs, p), bool)
    images = np.zeros((bs, n_images, size, size, 3), np.uint8)
    for i in range(bs):
      j = min(i, len(prompts) - 1)  # fill a short last batch with copies, dropped below
      e = encoded[j]
      tokens[i, p - len(e):], valid[i, p - len(e):] = e, True
      images[i, :len(prompts[j][1])] = np.stack(prompts[j][1])
    put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim))  # noqa: E731
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      out = np.asarray(self._generate(params, put(tokens), put(valid), put(images)))
    texts, generated = [], 0
    for row in out[:len(prompts)]:
      stop = np.flatnonzero((row == EOS_ID) | (row == NEWLINE_ID) | (row == PAD_ID))
      row = row[:stop[0]] if stop.size else row
      generated += len(row)
      texts.append(self.sp.decode(row.tolist()).strip())
    return texts, generated

  def evaluate(self, params, progress: bool = True) -> tuple[dict[str, float], dict[str, list]]:
    from tqdm import tqdm  # noqa: PLC0415

    c = self.config
    results, samples = {}, {}
    n_batches = sum(-(-min(c.num_queries, len(s["test"])) // c.batch_size) for s in self.splits.values())
    bar = tqdm(total=n_batches * len(c.shots), desc="eval", unit="batch", disable=not progress, leave=False)
    for kind, splits in self.splits.items():
      queries = splits["test"][:c.num_queries]
      for k in c.shots:
        t0 = time.perf_counter()
        prompts = [build_prompt(kind, choose_demos(splits["support"], q, k, c.seed, i), q)
                   for i, q in enumerate(queries)]
        preds, generated = [], 0
        for s in range(0, len(prompts), c.batch_size):
          texts, n = self._decode_batch(params, prompts[s:s + c.batch_size], k + 1)
          preds += texts
          generated += n
          bar.update()
        if kind == "caption":
          score = metrics.cider({q["id"]: q["references"] for q in queries},
                                {q["id"]: p for q, p in zip(queries, preds)})
        else:
          score = float(np.mean([metrics.vqa_accuracy(p, q["answers"]) for q, p in zip(queries, preds)]))
        key = f"{kind}/{k}shot"
        results[f"{key}/{METRIC[kind]}"] = score
        dt = time.perf_counter() - t0
        results[f"{key}/decode_tokens_per_s"] = generated / dt
        samples[key] = [{"id": q["id"], "prediction": p,
                         "target": q.get("caption") or q["answers"][0],
                         **({"question": q["question"]} if "question" in q else {})}
                        for q, p in zip(queries[:8], preds[:8])]
    bar.close()
    return results, samples

  def evaluate_and_write(self, params, step: int, workdir: str | Path) -> dict[str, float]:
    results, samples = self.evaluate(params)
    out = Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}_samples.json").write_text(json.dumps(samples, indent=1))
    tmp = out / f".step_{step}.json.tmp"
    tmp.write_text(json.dumps({"step": int(step), "results": results}, indent=1, sort_keys=True))
    tmp.rename(out / f"step_{step}.json")
    print(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(results.items())
                                           if not k.endswith("tokens_per_s")))
    return results
