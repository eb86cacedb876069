"""Few-shot prompts, greedy KV-cache decoding, the evaluator and the mm1-eval command."""

import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import sharding
from mm1_jax.data import vocabulary
from mm1_jax.data import shapes_world
from mm1_jax.eval import fewshot, metrics, report
from mm1_jax.model import MM1


def _ex(i, **kw):
  return {"id": f"s{i}", "image": bytes([i]) * 16, **kw}


def test_prompt_templates():
  demos = [_ex(1, question="how many circles are there?", answers=["2"] * 10)]
  query = _ex(2, question="what colour is the square?", answers=["red"] * 10)
  text = fewshot.build_prompt(fewshot.TEMPLATES["vqa"], demos, query)
  assert text == ("<image>Question: how many circles are there? Answer: 2\n"
                  "<image>Question: what colour is the square? Answer:")
  text = fewshot.build_prompt(fewshot.TEMPLATES["caption"], [_ex(1, caption="a red circle.")], _ex(2, caption="x"))
  assert text == "<image>a red circle.\n<image>"
  text = fewshot.build_prompt(("<image>Q: {question} A: {answer}\n", "<image>Q: {question} A:"), demos, query)
  assert text == "<image>Q: how many circles are there? A: 2\n<image>Q: what colour is the square? A:"


def test_demos_are_seeded_and_never_the_query_image():
  support = [_ex(i) for i in range(10)]
  query = dict(support[3], id="q")  # another record with the same image bytes
  a = fewshot.choose_demos(support, query, 4, seed=0, index=7)
  b = fewshot.choose_demos(support, query, 4, seed=0, index=7)
  assert [d["id"] for d in a] == [d["id"] for d in b]
  assert all(d["id"] != "s3" for d in a) and len({d["id"] for d in a}) == 4
  assert [d["id"] for d in fewshot.choose_demos(support, query, 4, seed=0, index=8)] != [d["id"] for d in a]
  with pytest.raises(ValueError, match="support split"):
    fewshot.choose_demos(support, query, 10, seed=0, index=0)
  # Benchmark records: same image_id (another question on the same COCO image) is excluded.
  support = [{"id": f"q{i}", "image_id": str(i // 3)} for i in range(30)]
  for index in range(20):
    demos = fewshot.choose_demos(support, {"id": "x", "image_id": "4"}, 8, seed=1, index=index)
    assert all(d["image_id"] != "4" for d in demos) and len({d["id"] for d in demos}) == 8
  # Unusable demonstrations (unreadable images) are passed over.
  demos = fewshot.choose_demos(support, {"id": "x", "image_id": "4"}, 5, seed=1, index=0,
                               usable=lambda r: int(r["id"][1:]) % 2 == 0)
  assert all(int(d["id"][1:]) % 2 == 0 for d in demos)


@pytest.mark.slow
def test_greedy_decoding_matches_step_by_step_full_forward(tiny_config):
  m = MM1(tiny_config)
  ids = vocabulary.special_ids(vocabulary.load("shapes_sp"))
  rng = np.random.default_rng(0)
  q = tiny_config.tokens_per_image
  prompt = np.concatenate([[ids.image] * q, rng.integers(5, 200, 6)]).astype(np.int32)
  images = rng.integers(0, 256, (1, 1, 64, 64, 3)).astype(np.uint8)
  seq = jnp.asarray(prompt)[None]
  params = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(1), seq, images, jnp.ones_like(seq),
                                jnp.arange(seq.shape[1])[None]))["params"]
  # Reference: re-run the whole sequence for every new token.
  ref = []
  forward = jax.jit(m.apply)
  for _ in range(5):
    t = seq.shape[1]
    logits = forward({"params": params}, seq, images, jnp.ones_like(seq), jnp.arange(t)[None])
    tok = int(jnp.argmax(logits[0, -1].at[jnp.asarray(ids.banned)].set(-jnp.inf)))
    ref.append(tok)
    if tok in ids.stops:
      break
    seq = jnp.concatenate([seq, jnp.asarray([[tok]], jnp.int32)], axis=1)
  # Batched, left-padded, with a KV cache.
  pad = 3
  tokens = np.concatenate([np.zeros(pad, np.int32), prompt])[None].repeat(2, 0)
  valid = np.concatenate([np.zeros(pad, bool), np.ones(len(prompt), bool)])[None].repeat(2, 0)
  out = fewshot._generate(params, tokens, valid, images.repeat(2, 0), model=m, max_new=5, ids=ids)
  assert np.asarray(out[0, :len(ref)]).tolist() == ref
  assert np.array_equal(out[0], out[1])


@pytest.mark.slow
def test_evaluator_reports_every_task_and_shot(tiny_config, tmp_path):
  mesh_cfg = sharding.MeshConfig()
  mesh = sharding.make_mesh(mesh_cfg)
  m = MM1(tiny_config)
  cfg = fewshot.FewShotConfig(shots=(0, 2), num_queries=8, batch_size=8, max_new_tokens=6,
                              train_mixture="mm1_shapes_pretrain")
  evaluator = fewshot.Evaluator(cfg, m, mesh, mesh_cfg.rules)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), dummy, jnp.zeros((1, 1, 64, 64, 3), jnp.uint8),
                                jnp.ones_like(dummy), dummy))["params"]
  results = evaluator.evaluate_and_write(params, 7, tmp_path)
  for key in ("shapes_caption/0shot/cider", "shapes_caption/2shot/cider", "shapes_vqa/0shot/accuracy",
              "shapes_vqa/2shot/accuracy"):
    assert key in results and 0.0 <= results[key] <= 10.0
  # Shapes-world questions carry their answer type; accuracy is also reported per type.
  types = {k.rsplit("/", 1)[1] for k in results if k.startswith("shapes_vqa/0shot/accuracy/")}
  assert types and types <= {"number", "colour", "shape"}
  saved = json.loads((tmp_path / "eval" / "step_7.json").read_text())
  assert saved["step"] == 7 and saved["results"] == results
  # The corpus generator keeps eval images out of training; the check finds none.
  assert saved["info"]["shapes_vqa"]["train_overlap"] == 0
  samples = json.loads((tmp_path / "eval" / "step_7_samples.json").read_text())
  assert len(samples["shapes_vqa/2shot"]) == 8 and "question" in samples["shapes_vqa/2shot"][0]
  assert "| shapes_vqa/2shot/accuracy" in report.comparison_table(tmp_path / "eval")


def test_scores_are_broken_down_by_answer_type():
  targets = [["2"] * 10, ["red"] * 10, ["blue"] * 10, ["circle"] * 10]
  preds = ["2", "red", "green", "square"]
  types = ["number", "colour", "colour", None]  # the last record has no type
  got = fewshot.score([metrics.vqa_metric], "b/0shot", targets, preds, types)
  assert got == {"b/0shot/accuracy": 0.5, "b/0shot/accuracy/number": 1.0, "b/0shot/accuracy/colour": 0.5}
  assert fewshot.score([metrics.vqa_metric], "b/0shot", targets, preds, [None] * 4) == {"b/0shot/accuracy": 0.5}
  assert "b/0shot/accuracy/yes_no" in fewshot.score([metrics.vqa_metric], "b/0shot", targets, preds,
                                                    ["yes/no"] * 4)


def test_shapes_questions_have_answer_types():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    for q, a in shapes_world.questions(shapes_world.sample_scene(rng), rng):
      t = shapes_world.answer_type(q)
      seen.add(t)
      assert (t == "number") == a.isdigit() and (t == "colour") == (a in shapes_world.COLOURS)
      assert (t == "shape") == (a in shapes_world.SHAPES)
  assert seen == {"number", "colour", "shape"}
  with pytest.raises(ValueError, match="not a shapes-world question"):
    shapes_world.answer_type("is it raining?")


def test_per_type_breakdowns_are_reported_but_not_gated(tmp_path):
  for step, (overall, shape) in ((0, (0.50, 0.40)), (50, (0.50, 0.20))):
    (tmp_path / f"step_{step}.json").write_text(json.dumps({"step": step, "results": {
        "vqa/0shot/accuracy": overall, "vqa/0shot/accuracy/shape": shape}}))
  assert "| vqa/0shot/accuracy/shape" in report.comparison_table(tmp_path)
  assert report.find_regressions(tmp_path, 0.05) == []  # the shape subset halved; the headline held


def test_comparison_table(tmp_path):
  for step, score in ((0, 0.1), (50, 0.7)):
    (tmp_path / f"step_{step}.json").write_text(json.dumps({"step": step, "results": {"vqa/0shot/accuracy": score}}))
  table = report.comparison_table(tmp_path)
  assert "step 0" in table and "step 50" in table and "+0.600" in table


@pytest.mark.slow
def test_mm1_eval_command_and_watch_mode(tmp_path, monkeypatch):
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  common = ["--gin_file=gin/experiments/quickstart.gin", f"--workdir={tmp_path}",
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
  assert "shapes_caption/0shot/cider" in out.stdout

  # Nightly mode, in this process: the run's own config.gin gives the model; the workdir
  # is the checkpoint folder's parent.
  import gin

  from mm1_jax import cli

  def watch(*extra):
    gin.clear_config(clear_constants=True)
    try:
      return cli.main_eval(["--gin_file=gin/eval/fewshot.gin", f"--checkpoint_dir={tmp_path / 'checkpoints'}",
                            "--watch", "--shots=0", "--num_queries=4", "--gin.fewshot.FewShotConfig.batch_size=8",
                            "--gin.fewshot.FewShotConfig.max_new_tokens=4", *extra])
    finally:
      gin.clear_config(clear_constants=True)

  monkeypatch.chdir(repo)
  eval_dir = tmp_path / "eval"
  assert watch() == 0  # both steps already evaluated: nothing new, report and scalars written
  report_md = (eval_dir / "report.md").read_text()
  assert "No regressions" in report_md and "![shapes_vqa/0shot/accuracy](plots/" in report_md
  assert (eval_dir / "plots" / "shapes_vqa__0shot__accuracy.png").stat().st_size > 1000
  assert list((eval_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((eval_dir / "watch_state.json").read_text())["tensorboard_steps"] == [1, 2]

  # A regression: step 1 made to look better than step 2 can be, step 2's results removed.
  step1 = json.loads((eval_dir / "step_1.json").read_text())
  step1["results"] = {k: (v if k.endswith("tokens_per_s") else 100.0) for k, v in step1["results"].items()}
  (eval_dir / "step_1.json").write_text(json.dumps(step1))
  (eval_dir / "step_2.json").unlink()
  assert watch() == 3
  assert (eval_dir / "step_2.json").exists()  # re-evaluated: it had no results
  assert "## Regressions" in (eval_dir / "report.md").read_text()
  assert watch() == 0  # nothing new to judge on the next night

  # A broken checkpoint is recorded, reported and not retried.
  shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "3")
  for f in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  assert watch() == 4
  assert "3" in json.loads((eval_dir / "watch_state.json").read_text())["failed"]
  assert "could not be evaluated" in (eval_dir / "report.md").read_text()
  assert watch() == 0
