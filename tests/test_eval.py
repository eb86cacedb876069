"""Few-shot prompts, greedy KV-cache decoding, the evaluator and the mm1-eval command."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import sharding
from mm1_jax.data.tokenizer import IMAGE_ID, NEWLINE_ID, PAD_ID
from mm1_jax.eval import fewshot, report
from mm1_jax.model import MM1


def _ex(i, **kw):
  return {"id": f"s{i}", "image": np.full((64, 64, 3), i, np.uint8), **kw}


def test_prompt_templates():
  demos = [_ex(1, question="how many circles are there?", answers=["2"] * 10)]
  query = _ex(2, question="what colour is the square?", answers=["red"] * 10)
  text, images = fewshot.build_prompt("vqa", demos, query)
  assert text == ("<image>Question: how many circles are there? Answer: 2\n"
                  "<image>Question: what colour is the square? Answer:")
  assert len(images) == 2 and images[1] is query["image"]
  text, _ = fewshot.build_prompt("caption", [_ex(1, caption="a red circle.")], _ex(2, caption="x"))
  assert text == "<image>a red circle.\n<image>"


def test_demos_are_seeded_and_never_the_query():
  support = [_ex(i) for i in range(10)]
  query = dict(support[3])
  a = fewshot.choose_demos(support, query, 4, seed=0, index=7)
  b = fewshot.choose_demos(support, query, 4, seed=0, index=7)
  assert [d["id"] for d in a] == [d["id"] for d in b]
  assert all(d["id"] != "s3" for d in a) and len({d["id"] for d in a}) == 4
  with pytest.raises(ValueError, match="support split"):
    fewshot.choose_demos(support, query, 10, seed=0, index=0)


def test_greedy_decoding_matches_step_by_step_full_forward(tiny_config):
  m = MM1(tiny_config)
  rng = np.random.default_rng(0)
  q = tiny_config.tokens_per_image
  prompt = np.concatenate([[IMAGE_ID] * q, rng.integers(5, 200, 6)]).astype(np.int32)
  images = rng.integers(0, 256, (1, 1, 64, 64, 3)).astype(np.uint8)
  seq = jnp.asarray(prompt)[None]
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(1), seq, images, jnp.ones_like(seq),
                                jnp.arange(seq.shape[1])[None]))["params"]
  # Reference: re-run the whole sequence for every new token.
  ref = []
  for _ in range(5):
    t = seq.shape[1]
    logits = m.apply({"params": params}, seq, images, jnp.ones_like(seq), jnp.arange(t)[None])
    tok = int(jnp.argmax(logits[0, -1].at[jnp.asarray([PAD_ID, IMAGE_ID])].set(-jnp.inf)))
    ref.append(tok)
    if tok in (1, NEWLINE_ID):
      break
    seq = jnp.concatenate([seq, jnp.asarray([[tok]], jnp.int32)], axis=1)
  # Batched, left-padded, with a KV cache.
  pad = 3
  tokens = np.concatenate([np.zeros(pad, np.int32), prompt])[None].repeat(2, 0)
  valid = np.concatenate([np.zeros(pad, bool), np.ones(len(prompt), bool)])[None].repeat(2, 0)
  out = fewshot._generate(params, tokens, valid, images.repeat(2, 0), model=m, max_new=5)
  assert np.asarray(out[0, :len(ref)]).tolist() == ref
  assert np.array_equal(out[0], out[1])


def test_evaluator_reports_every_task_and_shot(tiny_config, tmp_path):
  mesh_cfg = sharding.MeshConfig()
  mesh = sharding.make_mesh(mesh_cfg)
  m = MM1(tiny_config)
  cfg = fewshot.FewShotConfig(shots=(0, 2), num_queries=8, batch_size=8, max_new_tokens=6)
  evaluator = fewshot.Evaluator(cfg, m, mesh, mesh_cfg.rules)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), dummy, jnp.zeros((1, 1, 64, 64, 3), jnp.uint8),
                                jnp.ones_like(dummy), dummy))["params"]
  results = evaluator.evaluate_and_write(params, 7, tmp_path)
  for key in ("caption/0shot/cider", "caption/2shot/cider", "vqa/0shot/accuracy", "vqa/2shot/accuracy"):
    assert key in results and 0.0 <= results[key] <= 10.0
  saved = json.loads((tmp_path / "eval" / "step_7.json").read_text())
  assert saved == {"step": 7, "results": results}
  samples = json.loads((tmp_path / "eval" / "step_7_samples.json").read_text())
  assert len(samples["vqa/2shot"]) == 8 and "question" in samples["vqa/2shot"][0]
  assert "| vqa/2shot/accuracy" in report.comparison_table(tmp_path / "eval")


def test_comparison_table(tmp_path):
  for step, score in ((0, 0.1), (50, 0.7)):
    (tmp_path / f"step_{step}.json").write_text(json.dumps({"step": step, "results": {"vqa/0shot/accuracy": score}}))
  table = report.comparison_table(tmp_path)
  assert "step 0" in table and "step 50" in table and "+0.600" in table


def test_mm1_eval_command_on_saved_checkpoints(tmp_path):
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  common = ["--gin_file=gin/runs/quickstart.gin", f"--workdir={tmp_path}",
            "--gin.fewshot.FewShotConfig.num_queries=4", "--gin.fewshot.FewShotConfig.batch_size=4",
            "--gin.fewshot.FewShotConfig.shots=(0,)", "--gin.fewshot.FewShotConfig.max_new_tokens=4"]
  repo = __import__("pathlib").Path(__file__).resolve().parent.parent
  out = subprocess.run([sys.executable, "-m", "mm1_jax.cli", "train", *common, "--gin.TRAIN_STEPS=2",
                        "--gin.BATCH_SIZE=4", "--gin.EVALUATION=None"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not (tmp_path / "eval").exists()
  out = subprocess.run([sys.executable, "-m", "mm1_jax.cli", "eval", *common, "--steps=all"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  saved = sorted(p.name for p in (tmp_path / "eval").glob("step_?.json"))
  assert saved == ["step_1.json", "step_2.json"]  # orbax keeps the first step and the last
  assert "caption/0shot/cider" in out.stdout
