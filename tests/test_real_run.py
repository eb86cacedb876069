"""The README's real MM1 path, run verbatim on tiny locally made Hugging Face checkpoints.

The test makes what a real run downloads: a CLIP vision tower, an LLM with its tokenizer
(a Llama with a byte-level BPE tokenizer.json, a Mistral with a SentencePiece
tokenizer.model, both trained here on shapes-world text), captions as webdataset tars,
interleaved documents as OBELICS rows, text documents as JSONL and LLaVA conversations,
all from shapes-world scenes. It then extracts the README's `<!-- real-run -->` block and
runs it with bash: import, build, pre-train, few-shot evaluation, fine-tuning, export.
Checked afterwards: the loss fell; the evaluation decoded its answers with the imported
tokenizer; the exported decoder, loaded by transformers, generates what mm1_jax generates.
"""

from __future__ import annotations

import io
import dataclasses
import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

from mm1_jax.data import shapes_world  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 7  # not the bundled corpus's: no training image is an evaluation image

# Sizes for a 2-core CPU; the README's commands are otherwise unchanged.
TRAIN_FLAGS = ("--gin.TRAIN_STEPS=30 --gin.BATCH_SIZE=8 --gin.SEQ_LEN=128 --gin.MAX_IMAGES=4 "
               "--gin.PEAK_LR=3e-3 --gin.WARMUP_STEPS=5 --gin.LOG_EVERY=1 --gin.CHECKPOINT_EVERY=30")
SFT_FLAGS = ("--gin.TRAIN_STEPS=10 --gin.BATCH_SIZE=8 --gin.SEQ_LEN=128 --gin.MAX_IMAGES=4 "
             "--gin.PEAK_LR=1e-3 --gin.WARMUP_STEPS=2 --gin.LOG_EVERY=1 --gin.CHECKPOINT_EVERY=10")
EVAL_FLAGS = ("--benchmarks=shapes_caption,shapes_vqa --shots=0,2 --num_queries=8 "
              "--gin.fewshot.FewShotConfig.batch_size=8 --gin.fewshot.FewShotConfig.max_new_tokens=12")
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def readme_block() -> str:
  text = (REPO / "README.md").read_text()
  m = re.search(r"<!-- real-run -->\s*```bash\n(.*?)```", text, re.S)
  assert m, "README.md has no <!-- real-run --> bash block"
  return m.group(1)


# ----------------------------------------------------------------------------- corpus


def _png(image: np.ndarray) -> bytes:
  return shapes_world.encode_png(image)


def _tar(path: Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path, n: int = 160) -> dict[str, Path]:
  """Shapes-world scenes in the formats real corpora ship in."""
  out = {k: root / k for k in ("captions", "documents", "text", "conversations")}
  for folder in out.values():
    folder.mkdir(parents=True)
  members = {}
  for i in range(n):
    ex = shapes_world.caption_example(SEED, i)
    members[f"{i:05d}.png"] = _png(ex["image"])
    members[f"{i:05d}.txt"] = ex["caption"].encode()
  _tar(out["captions"] / "shard-00000.tar", members)

  (out["documents"] / "pics").mkdir()
  rows = []
  for i in range(n // 2):
    ex = shapes_world.interleaved_example(SEED, i)
    texts, images, pieces = [], [], ex["text"].split("<image>")
    for j, piece in enumerate(pieces):
      if piece.strip():
        texts.append(piece.strip())
        images.append(None)
      if j < len(ex["images"]):
        name = f"pics/{i}_{j}.png"
        (out["documents"] / name).write_bytes(_png(ex["images"][j]))
        texts.append(None)
        images.append(name)
    rows.append({"texts": texts, "images": images})
  (out["documents"] / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  (out["text"] / "text.jsonl").write_text(
      "".join(json.dumps({"text": shapes_world.text_example(SEED, i)["text"]}) + "\n" for i in range(n // 2)))

  (out["conversations"] / "images").mkdir()
  records = []
  for i in range(n):
    ex = shapes_world.chat_example(SEED, i)
    names = []
    for j, image in enumerate(ex["images"]):
      names.append(f"{i}_{j}.png")
      (out["conversations"] / "images" / names[-1]).write_bytes(_png(image))
    records.append({"id": ex["id"], "image": names, "conversations": ex["conversations"]})
  (out["conversations"] / "llava.json").write_text(json.dumps(records))
  return out


# ----------------------------------------------------------------------------- checkpoints


def corpus_text(n: int = 300) -> list[str]:
  """Shapes-world text to train the tokenizers on, without `<image>` (import adds it)."""
  return [line.replace("<image>", "") for line in shapes_world.all_text(SEED + 1, n)]


def make_clip(folder: Path) -> None:
  """Trained at 32 px with 8 px patches; imported at 64 px: an 8 x 8 grid, which MM1-tiny's
  C-Abstractor pools to 16 tokens."""
  torch.manual_seed(0)
  T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8)
                    ).save_pretrained(str(folder))


def make_llama(folder: Path) -> None:
  """A Llama with a byte-level BPE tokenizer.json (as Llama 3 ships) without `<image>`."""
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus_text(), trainer)
  folder.mkdir(parents=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>",
                                                            "bos_token": "<|begin_of_text|>"}))
  torch.manual_seed(1)
  T.LlamaForCausalLM(T.LlamaConfig(vocab_size=tok.get_vocab_size(), **LLM)).save_pretrained(str(folder))


def make_mistral(folder: Path) -> None:
  """A Mistral with a SentencePiece tokenizer.model (BPE, byte fallback, as Mistral ships)
  and a sliding window shorter than the training sequences."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_text()), model_writer=model, vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  folder.mkdir(parents=True)
  (folder / "tokenizer.model").write_bytes(model.getvalue())
  size = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
  torch.manual_seed(2)
  T.MistralForCausalLM(T.MistralConfig(vocab_size=size, sliding_window=32, **LLM)).save_pretrained(str(folder))


# ----------------------------------------------------------------------------- the run

MAKE_LLM = {"llama": make_llama, "mistral": make_mistral}


def run_readme_block(tmp_path: Path, kind: str) -> tuple[Path, str]:
  """Makes the inputs and runs the README's block with bash; returns ($WORK, its output)."""
  data = make_corpus(tmp_path / "data")
  make_clip(tmp_path / "hf_clip")
  MAKE_LLM[kind](tmp_path / "hf_llm")
  work = tmp_path / "work"
  env = dict(os.environ)
  # One CPU device (conftest's 8 simulated devices are for in-process sharding tests).
  xla_flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env.update(
      CLIP=str(tmp_path / "hf_clip"), LLM=str(tmp_path / "hf_llm"), LLM_KIND=kind, IMAGE_SIZE="64",
      CAPTIONS=str(data["captions"]), DOCUMENTS=str(data["documents"] / "docs.jsonl"),
      TEXTS=str(data["text"]), CONVERSATIONS=str(data["conversations"] / "llava.json"),
      CONVERSATION_IMAGES=str(data["conversations"] / "images"), WORK=str(work),
      MODEL_FILE="gin/models/mm1_tiny.gin", TRAIN_FLAGS=TRAIN_FLAGS, SFT_FLAGS=SFT_FLAGS,
      EVAL_FLAGS=EVAL_FLAGS, MM1_DIGEST_CACHE=str(tmp_path / "digests"))
  t0 = time.monotonic()
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{out[-6000:]}"
  print(f"README block for {kind}: {time.monotonic() - t0:.0f} s")
  return work, out


def losses(run: Path) -> list[float]:
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


def run_config(path: Path) -> tuple[object, str, object]:
  """(the MM1 model config, TOKENIZER, the few-shot evaluator's vocabulary) of a run's
  config.gin, as mm1-eval and mm1-convert export read it."""
  import gin

  from mm1_jax import gin_files

  gin.clear_config(clear_constants=True)
  try:
    gin.add_config_file_search_path(str(gin_files.root()))
    gin.parse_config_file(str(path))
    return (gin.query_parameter("%MODEL").scoped_configurable_fn(), gin.query_parameter("%TOKENIZER"),
            gin.query_parameter("fewshot.FewShotConfig.vocabulary").scoped_configurable_fn())
  finally:
    gin.clear_config(clear_constants=True)


def composed_model(work: Path, model_file: str):
  """The MM1 config mm1-train builds from the README's pre-training files with `model_file`."""
  import gin

  from mm1_jax import gin_checks, gin_files

  gin.clear_config(clear_constants=True)
  try:
    gin_checks.parse(["gin/experiments/from_pretrained.gin", model_file, str(work / "clip" / "model.gin"),
                      str(work / "llm" / "model.gin")],
                     [f"INIT_ENCODER = '{work / 'clip'}'", f"INIT_DECODER = '{work / 'llm'}'"],
                     gin_files.search_paths([]))
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)


def mm1_greedy(work: Path, prompt: list[int], new: int) -> tuple[list[int], np.ndarray]:
  """Greedy KV-cache decoding as mm1-eval does it (text only, no stop ids), with the
  fine-tuned run's model config and newest parameters. Returns (tokens, the logits after
  the prompt)."""
  import jax.numpy as jnp

  from mm1_jax import checkpoint, decoder
  from mm1_jax.data import vocabulary
  from mm1_jax.eval import fewshot
  from mm1_jax.model import MM1

  config = run_config(work / "sft" / "config.gin")[0]
  steps = checkpoint.Checkpointer(work / "sft" / "checkpoints").all_steps()
  params = checkpoint.load_checkpoint_params(work / "sft" / "checkpoints", steps[-1])
  model = MM1(config)
  ids = vocabulary.SpecialIds(image=config.image_token_id, eos=0, pad=0, stops=(), banned=(),
                              size=config.decoder.vocab_size)
  tokens = jnp.asarray([prompt], jnp.int32)
  valid = jnp.ones_like(tokens, bool)
  size = config.encoder.image_size
  images = jnp.zeros((1, 1, size, size, 3), jnp.uint8)  # one empty slot: no <image> in the prompt
  out = fewshot._generate(params, tokens, valid, images, model=model, max_new=new, ids=ids)
  logits, _ = model.apply({"params": params}, tokens, images, valid,
                          decoder.init_cache(config.decoder, 1, len(prompt)), method=MM1.prefill)
  return [int(t) for t in np.asarray(out)[0]], np.asarray(logits)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_readme_real_run(tmp_path, kind):
  work, out = run_readme_block(tmp_path, kind)

  # The imported parts were loaded: the CLIP and the LLM into pre-training, the whole
  # pre-trained model into fine-tuning.
  assert f"initialised encoder from {work / 'clip'}" in out and f"initialised decoder from {work / 'llm'}" in out
  assert f"initialised decoder from {work / 'pretrain' / 'checkpoints'}" in out

  # The run's model: the imported encoder and decoder whatever the model file; for a real
  # run's MODEL_FILE (gin/models/mm1_3b.gin) the same checkpoint shapes, with MM1-3B's
  # connector and its own execution choices (compute dtype, remat, layer scan).
  tiny, tokenizer, eval_vocab = run_config(work / "pretrain" / "config.gin")
  big = composed_model(work, "gin/models/mm1_3b.gin")
  execution = dict(dtype="float32", remat_policy="none", scan_layers=True)
  same = lambda c: dataclasses.replace(c, **{k: v for k, v in execution.items() if hasattr(c, k)})  # noqa: E731
  assert (same(big.encoder), same(big.decoder), big.image_token_id) == (
      same(tiny.encoder), same(tiny.decoder), tiny.image_token_id)
  assert big.decoder.dtype == "bfloat16" != tiny.decoder.dtype  # mm1_3b's compute dtype survives the import
  assert tiny.encoder.width == 64 and tiny.decoder.width == 64  # the tiny checkpoints' widths
  assert big.connector.num_tokens == 144 and tiny.connector.num_tokens == 16

  # (a) Pre-training learns: the mean loss of the last 5 steps is well below the first 5's.
  pre = losses(work / "pretrain")
  assert len(pre) == 30 and np.mean(pre[-5:]) < 0.8 * np.mean(pre[:5]), pre
  # Fine-tuning starts from it: its first loss is far below a fresh model's (ln of the vocabulary).
  sft = losses(work / "sft")
  assert sft[0] < 0.8 * pre[0], (sft, pre)

  # (b) Few-shot evaluation ran with the imported vocabulary (the run's config names it, and
  # the evaluator refuses a vocabulary whose <image> id differs from the model's), and its
  # answers are text of that tokenizer.
  from mm1_jax.data import vocabulary

  vocab = vocabulary.load(work / "llm" / "tokenizer")
  assert tokenizer == str(work / "llm" / "tokenizer") and eval_vocab == vocab, (tokenizer, eval_vocab)
  samples = json.loads((work / "pretrain" / "eval" / "step_30_samples.json").read_text())
  assert set(samples) == {"shapes_caption/0shot", "shapes_caption/2shot", "shapes_vqa/0shot", "shapes_vqa/2shot"}
  predictions = [s["prediction"] for group in samples.values() for s in group]
  assert len(predictions) == 32 and any(predictions), samples
  for p in predictions:
    assert vocab.decode(vocab.encode(p)) == p and "<image>" not in p and "\ufffd" not in p, p

  # (c) The exported LLM, loaded by transformers, generates what mm1_jax generates.
  hf_dir = work / "hf"
  assert (hf_dir / ("tokenizer.json" if kind == "llama" else "tokenizer.model")).is_file()
  hf = T.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
  assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[kind]
  # Longer than the Mistral's 32-token window, so that the window matters.
  text = "".join(shapes_world.text_example(SEED, 1000 + i)["text"] for i in range(2))
  prompt = list(vocab.encode(text + "Question: how many circles are there? Answer:"))
  assert len(prompt) > 40
  new = 8
  ours, ours_logits = mm1_greedy(work, prompt, new)
  with torch.no_grad():
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    theirs_logits = hf(torch.tensor([prompt])).logits[0, -1].numpy()
  np.testing.assert_allclose(ours_logits, theirs_logits, atol=1e-4, rtol=1e-4)
  assert ours == theirs, (ours, theirs)
