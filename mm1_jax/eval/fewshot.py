"""k-shot captioning and VQA evaluation with batched greedy KV-cache decoding.

Prompts interleave k demonstrations (image + answer) drawn with a fixed seed from the
benchmark's support split, never showing the query's own image, then the query image.
The default templates (each overridable in gin, per kind or per benchmark):

  caption  <image>{caption}\\n ... <image>                       -> "{caption}"
  vqa      <image>Question: {question} Answer: {answer}\\n ... <image>Question: {question} Answer:
  text     {question} {answer}\\n ... {question}                  (no image: the question is the
                                                               prompt text, e.g. "Question: how many
                                                               corners does a square have? Answer:")

With `chat_template` set (fine-tuned models), each demonstration is a user turn and an
assistant reply and the query ends in the assistant prefix (`mm1_jax.data.chat`):

  caption  user: <image>\ndescribe the picture.\nassistant:    -> " {caption}"
  vqa      user: <image>\n{question}\nassistant:                -> " {answer}"

Generation stops at EOS or a newline. Each benchmark's own seqio metric functions score
the predictions. Results go to <workdir>/eval/step_<N>.json as
{"step": N, "results": {"<benchmark>/<k>shot/<metric>": value, ...}, "info": {...}}
(plus a samples file); "info" holds skip and train-overlap counts. Where the test records
carry an "answer_type" (VQAv2 annotations; the shapes-world questions: number, colour,
shape), each metric is also reported per type as "<benchmark>/<k>shot/<metric>/<type>".

Text benchmarks have no image; their prompts fill one blank image slot that no `<image>`
id refers to, as text-only training rows do, so the image leaves the logits unchanged.
A "perplexity" benchmark is not prompted: each test document ("text", EOS appended) is
scored teacher-forced by the full forward pass and the results are the mean negative
log-likelihood per predicted token over all its documents and its exp,
"<benchmark>/0shot/nll" and "<benchmark>/0shot/perplexity" (lower is better), computed
once whatever `shots` holds (demonstrations mean nothing there) and over the whole test
split whatever `num_queries` is. The softmax is over the vocabulary's ids (embedding rows
past it excluded, as in decoding), so perplexity depends on the tokenizer: compare it only
between runs that share one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from mm1_jax import decoder as decoder_lib
from mm1_jax import paths
from mm1_jax import sharding as sharding_lib
from mm1_jax import splash
from mm1_jax.data import highres
from mm1_jax.data.images import decode_image
from mm1_jax.data.tokenizer import SHAPES
from mm1_jax.eval import readers as readers_lib
from mm1_jax.eval import overlap
from mm1_jax.model import MM1

TEMPLATES = {
    "caption": ("<image>{caption}\n", "<image>"),
    "vqa": ("<image>Question: {question} Answer: {answer}\n", "<image>Question: {question} Answer:"),
    "text": ("{question} {answer}\n", "{question}"),
}
# Benchmark kinds whose records have no image.
TEXT_KINDS = ("text", "perplexity")
# With a chat template: (the user's turn, the assistant's reply) of a demonstration; the
# query is the user's turn alone.
CHAT_TEMPLATES = {
    "caption": ("<image>\ndescribe the picture.", "{caption}"),
    "vqa": ("<image>\n{question}", "{answer}"),
    "text": ("{question}", "{answer}"),
}


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """Attributes:
    benchmarks: names in `mm1_jax.eval.readers.BENCHMARKS` (coco, nocaps, textcaps,
      vqav2, textvqa, vizwiz, okvqa, gqa; shapes_caption, shapes_vqa for the bundled corpus,
      and its text-only shapes_text_ppl and shapes_textqa).
    shots: numbers of demonstrations (perplexity benchmarks are scored once, as "0shot").
    num_queries: test examples scored per benchmark (None: the whole test split;
      perplexity benchmarks always score the whole test split).
    batch_size: prompts decoded together (a multiple of the mesh's batch shards).
    max_new_tokens: decoding budget per answer.
    seed: demonstration sampling seed.
    templates: {kind or benchmark name: (demonstration, query)} overriding `TEMPLATES`.
    data_root: folder holding <benchmark>/ folders in their shipped layout (default
      $MM1_EVAL_DATA, else ~/data/mm1_eval).
    files: {"<benchmark>.<split>.<role>": path} for files outside that layout.
    module_imports: modules that register the benchmarks' seqio tasks.
    corpora: built corpora (`mm1_jax.data.sources.Corpus`) registered as tasks too, so
      that `train_mixture` can name one.
    vocabulary: the run's seqio Vocabulary (its VOCABULARY), or what
      `mm1_jax.data.vocabulary.load` takes (a bundled model's name, a SentencePiece
      model, a tokenizer.json, a folder): prompts are encoded and answers decoded with
      it, and its ids place the images and end the answers.
    train_mixture: the training mixture; when set, eval images are checked against its
      images by content hash and overlaps are reported.
    drop_train_overlap: also leave overlapping queries out of the scores.
    image_cache: decoded images kept in memory (demonstrations recur across queries).
    chat_template: a `mm1_jax.data.chat.ChatTemplate` for fine-tuned models: prompts are
      conversations, `templates` then give (user turn, reply) per kind (`CHAT_TEMPLATES`).
    subimages: `mm1_jax.data.highres.SubImages` when the model was trained on sub-images.
    num_samples: predictions written per benchmark and shot count to the samples file
      (None: every query's, for error analysis by question).
  """

  benchmarks: tuple[str, ...] = ("shapes_caption", "shapes_vqa")
  shots: tuple[int, ...] = (0, 4)
  num_queries: int | None = 128
  batch_size: int = 32
  max_new_tokens: int = 24
  seed: int = 0
  templates: Mapping[str, tuple[str, str]] | None = None
  data_root: str | None = None
  files: Mapping[str, str] | None = None
  module_imports: tuple[str, ...] = ("tasks",)
  corpora: tuple[Any, ...] = ()
  vocabulary: Any = SHAPES
  train_mixture: str | None = None
  drop_train_overlap: bool = False
  image_cache: int = 4096
  chat_template: Any = None
  subimages: Any = None
  num_samples: int | None = 8


def load_split(task_name: str, split: str, module_imports=("tasks",)) -> list[dict]:
  """Records of a registered eval task as Python dicts: strings, lists of strings, and
  "image" (encoded bytes) or "image_path". Images are decoded later, when used."""
  import seqio  # noqa: PLC0415  (seqio: only when reading eval tasks)

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
    if not rec.get("image"):
      rec.pop("image", None)
    out.append(rec)
  return out


def image_key(rec: dict) -> str:
  """What identifies a record's image: its benchmark image id, else a hash of its bytes.
  A record without an image is identified by its question, so that a demonstration
  never gives away the query's own question and answer."""
  if rec.get("image_id"):
    return str(rec["image_id"])
  if "image" in rec:
    return hashlib.sha1(bytes(rec["image"])).hexdigest()
  if "image_path" in rec:
    return str(rec["image_path"])
  return "question:" + rec["question"] if rec.get("question") else str(rec["id"])


def build_prompt(template: tuple[str, str], demos: list[dict], query: dict, chat_template=None) -> str:
  """The prompt text: demonstrations then the query. With a chat template, `template` is
  (user turn, reply) and the prompt is a conversation ending in the assistant prefix."""
  first, second = template
  fill = lambda t, ex: t.format(caption=ex.get("caption", ""), question=ex.get("question", ""),  # noqa: E731
                                answer=(ex.get("answers") or [""])[0])
  if chat_template is None:
    return "".join(fill(first, d) for d in demos) + fill(second, query)
  turns = []
  for d in demos:
    turns += [{"from": "human", "value": fill(first, d)}, {"from": "gpt", "value": fill(second, d)}]
  return chat_template.prompt(turns + [{"from": "human", "value": fill(first, query)}])


def choose_demos(support: list[dict], query: dict, k: int, seed: int, index: int,
                 usable=lambda rec: True) -> list[dict]:
  """k demonstrations, fixed per (seed, query index), never showing the query's image.

  Draws a few more candidates than needed (cheap on a large support split), drops the
  ones with the query's image or that are not `usable`, and falls back to a full pass
  when too few remain."""
  if k == 0:
    return []
  own = image_key(query)
  rng = np.random.default_rng([seed, index])
  n = len(support)
  candidates = rng.choice(n, size=min(n, 2 * k + 8), replace=False)
  if len(candidates) < n:
    candidates = np.concatenate([candidates, rng.permutation(n)])
  picked, seen = [], set()
  for i in candidates:
    i = int(i)
    if i in seen:
      continue
    seen.add(i)
    if image_key(support[i]) != own and usable(support[i]):
      picked.append(support[i])
      if len(picked) == k:
        return picked
  raise ValueError(f"{k} shots requested but the support split has {len(picked)} usable examples")


def _generate(params, tokens, valid, images, *, model: MM1, max_new: int, ids):
  """Greedy decoding. tokens int32[B, P] left-padded, valid bool[B, P] -> int32[B, max_new].

  `ids` (`vocabulary.SpecialIds`): answers end at a stop id, the banned ids and the
  embedding rows past the vocabulary are never generated; finished rows repeat EOS."""
  b, p = tokens.shape
  cache = decoder_lib.init_cache(model.config.decoder, b, p + max_new)
  logits, cache = model.apply({"params": params}, tokens, images, valid, cache, method=MM1.prefill)
  kv_valid = jnp.pad(valid, ((0, 0), (0, max_new)))
  next_pos = valid.sum(axis=1).astype(jnp.int32)
  rows = model.config.decoder.vocab_size
  allowed = (jnp.arange(rows) < ids.size).at[jnp.asarray(ids.banned, jnp.int32)].set(False)
  stops = jnp.asarray(ids.stops, jnp.int32)

  def body(i, carry):
    logits, cache, kv_valid, out, done = carry
    tok = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(jnp.int32)
    tok = jnp.where(done, ids.eos, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stops)
    kv_valid = kv_valid.at[:, p + i].set(True)
    logits, cache = model.apply({"params": params}, tok, next_pos + i, kv_valid, cache, p + i,
                                method=MM1.decode_step)
    return logits, cache, kv_valid, out, done

  out = jnp.zeros((b, max_new), jnp.int32)
  done = jnp.zeros((b,), bool)
  _, _, _, out, _ = jax.lax.fori_loop(0, max_new, body, (logits, cache, kv_valid, out, done))
  return out


def token_nll(logits: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
  """Negative log-likelihood of each target, float32[B, T], the softmax taken over the
  vocabulary's ids only (embedding rows past `vocab_size` are padding, never targets)."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _score(params, tokens, targets, weights, segment_ids, images, *, model: MM1, vocab_size: int):
  """Teacher-forced scoring of right-padded documents: (summed NLL float32[B], scored
  targets float32[B]) per row. The full training forward pass, one document a row."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits = model.apply({"params": params}, tokens, images, segment_ids, positions)
  nll = token_nll(logits, targets, vocab_size)
  return (nll * weights).sum(axis=1), weights.sum(axis=1)


class _ImageCache:
  """Decoded images (shorter side resized, centre crop, as in training; or sub-images),
  least recently used dropped first. Unreadable images give None and are counted by path."""

  def __init__(self, size: int, capacity: int, subimages=None):
    self.size, self.capacity, self.subimages = size, capacity, subimages
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self.failed: dict[str, str] = {}

  def __call__(self, rec: dict) -> np.ndarray | None:
    key = rec.get("image_path") or image_key(rec)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    if key in self.failed:
      return None
    try:
      data = rec["image"] if "image" in rec else Path(rec["image_path"]).read_bytes()
      pixels = decode_image(bytes(data), self.size, self.subimages)
    except (OSError, ValueError, SyntaxError) as e:  # missing, truncated or not an image
      self.failed[key] = f"{type(e).__name__}: {e}"
      return None
    self._cache[key] = pixels
    if len(self._cache) > self.capacity:
      self._cache.popitem(last=False)
    return pixels


@dataclasses.dataclass
class _Benchmark:
  spec: readers_lib.Benchmark
  template: tuple[str, str]
  support: list[dict]
  test: list[dict]
  metric_fns: list
  overlap: list[str] = dataclasses.field(default_factory=list)  # test ids whose image is in training
  skipped: int = 0  # test queries whose image could not be read
  scored_tokens: int = 0  # perplexity: predicted tokens over the test documents


def benchmark_specs(config: FewShotConfig) -> list:
  """The configured benchmarks' specs; ValueError naming the known ones for an unknown name."""
  for m in config.module_imports:  # they register the benchmarks' tasks
    importlib.import_module(m)
  return [readers_lib.get(n) for n in config.benchmarks]


def score(metric_fns, key: str, targets: list, preds: list[str], answer_types: list[str | None]
          ) -> dict[str, float]:
  """{key}/{metric} for each metric function, and {key}/{metric}/{type} over the queries of
  each answer type where the records carry one (VQAv2's yes/no, number, other; a "/" in a
  type becomes "_", so keys keep three separators: ".../accuracy/yes_no")."""
  out = {}
  groups = collections.defaultdict(list)
  for i, t in enumerate(answer_types):
    if t:
      groups[t.replace("/", "_")].append(i)
  for fn in metric_fns:
    for metric, value in fn(targets, preds).items():
      out[f"{key}/{metric}"] = float(value)
    for t, idx in sorted(groups.items()):
      for metric, value in fn([targets[i] for i in idx], [preds[i] for i in idx]).items():
        out[f"{key}/{metric}/{t}"] = float(value)
  return out


class Evaluator:
  """Runs the configured few-shot benchmarks on a set of parameters."""

  def __init__(self, config: FewShotConfig, model: MM1, mesh: jax.sharding.Mesh, rules):
    import seqio  # noqa: PLC0415  (seqio: only when reading eval tasks)

    self.config = config
    self.model = model
    self.mesh = mesh
    self.rules = rules
    from mm1_jax.data import vocabulary  # noqa: PLC0415  (seqio, tensorflow: only when evaluating)

    self.vocab = vocabulary.load(config.vocabulary)
    self.ids = vocabulary.special_ids(self.vocab)
    vocabulary.check_model(self.ids, model.config, f"the evaluation vocabulary {self.vocab!r}")
    if config.batch_size % sharding_lib.batch_divisor(mesh, rules):
      raise ValueError(f"eval batch_size {config.batch_size} does not split over mesh {mesh.shape}")
    readers_lib.configure(config.data_root, config.files)
    specs = benchmark_specs(config)  # fails early on unknown names
    defaults = CHAT_TEMPLATES if config.chat_template is not None else TEMPLATES
    templates = {**defaults, **(config.templates or {})}
    self.images = _ImageCache(model.config.encoder.image_size, config.image_cache, config.subimages)
    self.k = highres.per_image(config.subimages)  # image slots per image
    self.benchmarks: dict[str, _Benchmark] = {}
    for spec in specs:
      if spec.kind not in TEMPLATES and spec.kind != "perplexity":
        raise ValueError(f"benchmark {spec.name}: unknown kind {spec.kind!r}")
      test = load_split(spec.task, "test", config.module_imports)
      if spec.kind == "perplexity":  # scored, not prompted: no template, no demonstrations
        self.benchmarks[spec.name] = _Benchmark(spec, ("", ""), [], test, [])
        continue
      support = []
      if any(config.shots):
        support_task = readers_lib.get(spec.support_from).task if spec.support_from else spec.task
        support = load_split(support_task, "support", config.module_imports)
      task = seqio.get_mixture_or_task(spec.task)
      self.benchmarks[spec.name] = _Benchmark(
          spec, tuple(templates.get(spec.name, templates[spec.kind])), support, test,
          list(task.predict_metric_fns))
    if config.train_mixture:
      from mm1_jax.data import sources  # noqa: PLC0415  (sources loads tensorflow, seqio)

      sources.register_all(config.corpora)
      self._check_train_overlap(config.train_mixture)
    self._generate = jax.jit(functools.partial(_generate, model=model, max_new=config.max_new_tokens,
                                               ids=self.ids))
    self._score = jax.jit(functools.partial(_score, model=model, vocab_size=self.ids.size))

  def _check_train_overlap(self, mixture: str) -> None:
    """Image benchmarks only: the corpus writer keeps held-out text documents out of the
    training documents."""
    if all(b.spec.kind in TEXT_KINDS for b in self.benchmarks.values()):
      return
    train = overlap.train_image_digests(mixture)
    for name, b in self.benchmarks.items():
      if b.spec.kind in TEXT_KINDS:
        continue
      b.overlap = [q["id"] for q in b.test if overlap.record_digest(q) in train]
      if b.overlap:
        print(f"WARNING: {len(b.overlap)} of {len(b.test)} {name} test images are in the training "
              f"mixture {mixture!r} (e.g. {b.overlap[:3]})"
              + ("; left out of the scores" if self.config.drop_train_overlap else ""))
      if self.config.drop_train_overlap:
        dropped = set(b.overlap)
        b.test = [q for q in b.test if q["id"] not in dropped]

  def _encode(self, text: str) -> np.ndarray:
    ids = np.asarray(self.vocab.encode(text), np.int32)
    q = self.model.config.tokens_per_image * self.k
    return np.repeat(ids, np.where(ids == self.ids.image, q, 1))

  def _decode_batch(self, params, prompts: list[tuple[str, list[np.ndarray]]], n_images: int
                    ) -> tuple[list[str], int]:
    """Greedy answers to a batch of prompts. A prompt's images fill its first image slots;
    text prompts (no images) leave their slot blank (`n_images` is then 1)."""
    bs = self.config.batch_size
    size = self.model.config.encoder.image_size
    encoded = [self._encode(t) for t, _ in prompts]
    p = -(-max(len(e) for e in encoded) // 32) * 32  # bucket lengths to limit recompiles
    tokens = np.full((bs, p), self.ids.pad, np.int32)
    valid = np.zeros((bs, p), bool)
    images = np.zeros((bs, n_images * self.k, size, size, 3), np.uint8)
    for i in range(bs):
      j = min(i, len(prompts) - 1)  # fill a short last batch with copies, dropped below
      e = encoded[j]
      tokens[i, p - len(e):], valid[i, p - len(e):] = e, True
      if prompts[j][1]:
        pixels = np.stack(prompts[j][1])  # [n, S, S, 3], or [n, K, S, S, 3] with sub-images
        pixels = pixels.reshape((-1,) + pixels.shape[-3:])
        images[i, :len(pixels)] = pixels
    put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim))  # noqa: E731
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      out = self._generate(params, put(tokens), put(valid), put(images))
    # The rows are sharded over the batch axes, across processes on a pod: every process
    # gathers all of them (each then scores the same predictions).
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    texts, generated = [], 0
    for row in out[:len(prompts)]:
      stop = np.flatnonzero(np.isin(row, self.ids.stops))
      answer = row[:stop[0]] if stop.size else row
      generated += len(answer)
      text = self.vocab.decode(answer.tolist())
      if stop.size and row[stop[0]] != self.ids.eos:  # a newline piece may start with text ("." + "\n")
        text += self.vocab.decode([int(row[stop[0]])]).split("\n", 1)[0]
      texts.append(text.strip())
    return texts, generated

  def _score_documents(self, params, docs: list[dict]) -> tuple[float, int, list[float]]:
    """Teacher-forced NLL of documents, `batch_size` at a time, batch-sharded like decoding:
    (summed NLL, predicted tokens, NLL per token of each document). Each document is its
    text encoded with the run's vocabulary and EOS appended, one to a row, right-padded,
    with one blank image slot; every token after the first is predicted (no BOS: as in
    training). A document holding `<image>` is refused (its image's tokens would be missing)."""
    bs = self.config.batch_size
    size = self.model.config.encoder.image_size
    put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim))  # noqa: E731
    images = np.zeros((bs, self.k, size, size, 3), np.uint8)
    every = [np.append(np.asarray(self.vocab.encode(d["text"]), np.int32), self.ids.eos) for d in docs]
    with_images = [d["id"] for d, e in zip(docs, every) if (e == self.ids.image).any()]
    if with_images:  # an <image> id would need its image's tokens spliced in: not a text document
      raise ValueError(f"perplexity scores text-only documents; {len(with_images)} hold <image> "
                       f"(e.g. {with_images[:3]})")
    # One length for all batches (one compile), a multiple of 32, or of the splash kernel's
    # tile where the decoder attends through it.
    mult = splash.LANES if self.model.config.decoder.attention_impl == "splash" else 32
    t = -(-max(len(e) - 1 for e in every) // mult) * mult
    total, count, per_doc = 0.0, 0, []
    for s in range(0, len(docs), bs):
      chunk, encoded = docs[s:s + bs], every[s:s + bs]
      tokens = np.full((bs, t), self.ids.pad, np.int32)
      targets = np.full((bs, t), self.ids.pad, np.int32)
      weights = np.zeros((bs, t), np.float32)
      segment_ids = np.zeros((bs, t), np.int32)
      for i, e in enumerate(encoded):  # rows past the last document stay padding, weight 0
        n = len(e) - 1
        tokens[i, :n], targets[i, :n] = e[:-1], e[1:]
        weights[i, :n] = 1.0
        segment_ids[i, :n] = 1
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        nll, n_tok = self._score(params, put(tokens), put(targets), put(weights), put(segment_ids), put(images))
      nll = np.asarray(multihost_utils.process_allgather(nll, tiled=True), np.float64)[:len(chunk)]
      n_tok = np.asarray(multihost_utils.process_allgather(n_tok, tiled=True), np.float64)[:len(chunk)]
      total += float(nll.sum())
      count += int(n_tok.sum())
      per_doc += (nll / np.maximum(n_tok, 1)).tolist()
    return total, count, per_doc

  def _perplexity(self, params, name: str, b: _Benchmark, bar) -> tuple[dict[str, float], list[dict]]:
    """{name}/0shot/nll (mean per predicted token over every test document) and
    {name}/0shot/perplexity (its exp), and a few documents with their own NLL."""
    t0 = time.perf_counter()
    total, count, per_doc = self._score_documents(params, b.test)
    bar.update(-(-len(b.test) // self.config.batch_size))
    if not count:
      raise ValueError(f"{name}: the test documents have no tokens to score")
    b.scored_tokens = count
    nll = total / count
    key = f"{name}/0shot"
    results = {f"{key}/nll": nll, f"{key}/perplexity": float(np.exp(nll)),
               f"{key}/score_tokens_per_s": count / (time.perf_counter() - t0)}
    n = self.config.num_samples
    samples = [{"id": d["id"], "text": d["text"], "nll": v} for d, v in zip(b.test[:n], per_doc[:n])]
    return results, samples

  def _queries(self, b: _Benchmark) -> list[dict]:
    """The scored queries: the first num_queries test records whose image decodes (text
    benchmarks: the first num_queries; perplexity: every test document)."""
    if b.spec.kind == "perplexity":
      return list(b.test)
    limit = self.config.num_queries or len(b.test)
    if b.spec.kind in TEXT_KINDS:
      return b.test[:limit]
    out, b.skipped = [], 0
    for q in b.test:
      if len(out) == limit:
        break
      if self.images(q) is None:
        b.skipped += 1
      else:
        out.append(q)
    return out

  def evaluate(self, params, progress: bool = True) -> tuple[dict[str, float], dict[str, list]]:
    c = self.config
    results, samples = {}, {}
    queries = {name: self._queries(b) for name, b in self.benchmarks.items()}
    n_batches = sum(-(-len(q) // c.batch_size) * (1 if self.benchmarks[name].spec.kind == "perplexity"
                                                   else len(c.shots)) for name, q in queries.items())
    bar = tqdm(total=n_batches, desc="eval", unit="batch", disable=not progress, leave=False)
    for name, b in self.benchmarks.items():
      qs = queries[name]
      if not qs:
        if b.spec.kind in TEXT_KINDS:
          raise ValueError(f"{name}: the test split is empty")
        raise ValueError(f"{name}: none of the test images could be read "
                         f"(e.g. {next(iter(self.images.failed.items()), None)})")
      if b.spec.kind == "perplexity":
        scores, samples[f"{name}/0shot"] = self._perplexity(params, name, b, bar)
        results.update(scores)
        continue
      text_only = b.spec.kind in TEXT_KINDS
      usable = (lambda rec: True) if text_only else (lambda rec: self.images(rec) is not None)  # noqa: E731
      targets = [q["references"] if b.spec.kind == "caption" else q["answers"] for q in qs]
      for k in c.shots:
        t0 = time.perf_counter()
        preds, generated = [], 0
        for s in range(0, len(qs), c.batch_size):
          prompts = []
          for i, q in enumerate(qs[s:s + c.batch_size], start=s):
            demos = choose_demos(b.support, q, k, c.seed, i, usable)
            prompts.append((build_prompt(b.template, demos, q, c.chat_template),
                            [] if text_only else [self.images(d) for d in demos + [q]]))
          texts, n = self._decode_batch(params, prompts, 1 if text_only else k + 1)
          preds += texts
          generated += n
          bar.update()
        key = f"{name}/{k}shot"
        results.update(score(b.metric_fns, key, targets, preds, [q.get("answer_type") for q in qs]))
        results[f"{key}/decode_tokens_per_s"] = generated / (time.perf_counter() - t0)
        samples[key] = [{"id": q["id"], "prediction": p, "targets": t[:5],
                         **({"question": q["question"]} if "question" in q else {}),
                         **({"answer_type": q["answer_type"]} if q.get("answer_type") else {})}
                        for q, p, t in list(zip(qs, preds, targets))[:c.num_samples]]
    bar.close()
    return results, samples

  def info(self) -> dict:
    """Counts that belong beside the scores: unreadable images, train overlaps (image
    benchmarks); the scored tokens (perplexity)."""
    out = {}
    for name, b in self.benchmarks.items():
      if b.spec.kind == "perplexity":
        out[name] = {"test_examples": len(b.test), "scored_tokens": b.scored_tokens}
      elif b.spec.kind in TEXT_KINDS:
        out[name] = {"test_examples": len(b.test)}
      else:
        out[name] = {"test_examples": len(b.test), "skipped_unreadable_images": b.skipped,
                     "train_overlap": len(b.overlap), "train_overlap_ids": b.overlap[:20]}
    return out

  def evaluate_and_write(self, params, step: int, workdir: paths.PathLike) -> dict[str, float]:
    """Evaluates and writes <workdir>/eval/step_<N>.json (a local folder or a bucket) after
    its samples file: a step's results appear whole, and last. Process 0 writes them."""
    results, samples = self.evaluate(params)
    out = paths.path(workdir) / "eval"
    if jax.process_index() == 0:  # every process holds the same results; one writes them
      paths.write_text_atomic(out / f"step_{step}_samples.json", json.dumps(samples, indent=1))
      paths.write_text_atomic(out / f"step_{step}.json", json.dumps(
          {"step": int(step), "results": results, "info": self.info()}, indent=1, sort_keys=True))
    print(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(results.items())
                                           if not k.endswith("tokens_per_s")))
    return results
