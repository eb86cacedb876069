"""Checkpoints, imported parts, init_from sources and eval reports in a Cloud Storage
bucket: a gcp-storage-emulator (PyPI) serves the JSON API on 127.0.0.1 for the test.

The emulator's variables: fsspec/gcsfs (what etils.epath uses with EPATH_USE_TF=false)
reads STORAGE_EMULATOR_HOST; tensorstore (orbax's array writer) reads
TENSORSTORE_GCS_HTTP_URL and takes any token from GOOGLE_AUTH_TOKEN_FOR_TESTING;
array_record's reader (google-cloud-cpp) reads CLOUD_STORAGE_EMULATOR_ENDPOINT."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import gcs_emulator

from mm1_jax import paths, pretrained
from mm1_jax.checkpoint import Checkpointer, load_params, save_params
from mm1_jax.eval import report

BUCKET = "mm1-test"
pytestmark = pytest.mark.slow  # each worker starts an emulator process


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.running(BUCKET) as url:
    yield url


def objects(emulator: str, prefix: str) -> list[str]:
  """What really reached the bucket (a path mistaken for a local one would write a local
  "gs:" folder instead)."""
  return gcs_emulator.object_names(emulator, BUCKET, prefix)


@pytest.fixture
def bucket(emulator, monkeypatch, request, tmp_path):
  monkeypatch.chdir(tmp_path)  # a relative "gs:" folder, were one made, lands here and is checked
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", emulator)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test")
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", emulator)  # google-cloud-cpp (array_record's reader)
  yield f"gs://{BUCKET}/{request.node.name}"
  assert not (tmp_path / "gs:").exists()


def test_paths_keep_buckets_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.path("gs://b/run/x")) == "gs://b/run/x" and paths.is_remote("gs://b/run")
  assert str(paths.path("run/x")) == str(tmp_path / "run" / "x") and not paths.is_remote("run/x")


def test_text_written_to_a_bucket_reads_back(bucket, emulator):
  target = paths.path(bucket) / "eval" / "step_3.json"
  paths.write_text_atomic(target, json.dumps({"step": 3}))
  paths.write_text_atomic(target, json.dumps({"step": 4}))  # replaced whole
  assert json.loads(target.read_text()) == {"step": 4}
  assert [p.name for p in (paths.path(bucket) / "eval").glob("step_*.json")] == ["step_3.json"]
  assert objects(emulator, "test_text_written_to_a_bucket_reads_back/") == [
      "test_text_written_to_a_bucket_reads_back/eval/step_3.json"]  # no temporary object left


def test_checkpoints_save_and_restore_in_a_bucket(bucket, emulator):
  state = {"w": jax.numpy.arange(6.0).reshape(2, 3), "step": jax.numpy.int32(7)}
  ckpt = Checkpointer(f"{bucket}/checkpoints", save_every=1)
  assert ckpt.save(5, state, {"batches_consumed": 5}, force=True)
  ckpt.close()
  assert any(n.startswith("test_checkpoints_save_and_restore_in_a_bucket/checkpoints/5/state/")
             for n in objects(emulator, "test_checkpoints_save_and_restore_in_a_bucket/"))
  again = Checkpointer(f"{bucket}/checkpoints")
  assert again.all_steps() == [5]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, data = again.restore(5, abstract)
  again.close()
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["step"]) == 7 and data == {"batches_consumed": 5}


def test_imported_parts_load_from_a_bucket_as_init_from_sources(bucket, emulator):
  tree = {"decoder": {"embedding": {"embedding": np.arange(12.0, dtype=np.float32).reshape(4, 3)}}}
  save_params(tree, paths.path(bucket) / "llm" / "params")
  assert objects(emulator, "test_imported_parts_load_from_a_bucket_as_init_from_sources/llm/params/")
  np.testing.assert_array_equal(load_params(f"{bucket}/llm")["decoder"]["embedding"]["embedding"],
                                tree["decoder"]["embedding"]["embedding"])
  # The scheme's colon is not a part list; a part list after the folder still is.
  assert pretrained.parse_source(f"{bucket}/llm") == (f"{bucket}/llm", None)
  assert pretrained.parse_source(f"{bucket}/llm:decoder") == (f"{bucket}/llm", ("decoder",))


def test_eval_report_is_written_to_a_bucket(bucket, emulator):
  out = paths.path(bucket) / "eval"
  for step, score in ((10, 0.5), (20, 0.3)):
    paths.write_text_atomic(out / f"step_{step}.json", json.dumps(
        {"step": step, "results": {"shapes_vqa/0shot/accuracy": score}}))
  regressions = report.find_regressions(out, 0.05)
  written = report.write_report(out, regressions, 0.05)
  text = written.read_text()
  assert "shapes_vqa/0shot/accuracy" in text and "step 20" in text and "Regressions" in text
  assert (out / "plots" / "shapes_vqa__0shot__accuracy.png").read_bytes()[:4] == b"\x89PNG"
  prefix = "test_eval_report_is_written_to_a_bucket/eval/"
  assert {prefix + "report.md", prefix + "plots/shapes_vqa__0shot__accuracy.png"} <= set(objects(emulator, prefix))


def test_an_llm_imported_into_a_bucket_gives_its_vocabulary_from_there(bucket, emulator, tmp_path, capsys):
  """mm1-convert import --out=gs://...: weights, model.gin and the tokenizer land in the
  bucket, and the TOKENIZER it names loads (through a local copy) as the same vocabulary."""
  pytest.importorskip("transformers")
  from test_hf_tokenizer import make_bpe_tokenizer, save_llm

  from mm1_jax.data import vocabulary
  from mm1_jax.hf import cli

  src = tmp_path / "hf"
  tok = make_bpe_tokenizer(src)
  save_llm("llama", src, tok.get_vocab_size())
  assert cli.main(["import", "--kind=llama", f"--src={src}", f"--out={bucket}/llm"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  prefix = "test_an_llm_imported_into_a_bucket_gives_its_vocabulary_from_there/llm/"
  names = set(objects(emulator, prefix))
  assert {prefix + "model.gin", prefix + "vocabulary.gin", prefix + "tokenizer/tokenizer.json"} <= names
  assert f"TOKENIZER = '{bucket}/llm/tokenizer'" in (paths.path(bucket) / "llm" / "model.gin").read_text()
  vocab = vocabulary.load(f"{bucket}/llm/tokenizer")
  assert vocabulary.special_ids(vocab).image == summary["tokenizer"]["image_id"]
  assert vocab.decode(vocab.encode("a red circle")) == "a red circle"
  assert load_params(f"{bucket}/llm")["decoder"]["embedding"]["embedding"].shape[0] % 128 == 0


def _losses(workdir) -> dict[int, float]:
  """Loss by step from a run's metrics.jsonl, which must log each step once."""
  records = [json.loads(line) for line in (paths.path(workdir) / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in records}
  assert len(losses) == len(records), [r["step"] for r in records]
  return losses


def test_a_run_in_a_bucket_stops_on_sigterm_resumes_bitwise_and_is_evaluated_there(bucket, emulator, tmp_path):
  """mm1-train --workdir=gs://...: checkpoints, metrics, config, goodput and loader state in
  the bucket; SIGTERM saves and stops, the same command resumes with the same losses bit for
  bit as an uninterrupted local run; mm1-eval evaluates it and writes its report there."""
  import signal

  from test_train import REPO, SMALL, _env, _mm1_train

  run = f"{bucket}/run"
  flags = ["--gin.TRAIN_STEPS=500", "--gin.CHECKPOINT_EVERY=1000", "--gin.EVALUATION=None"]
  cmd = [sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
         f"--workdir={run}", *SMALL, *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # SIGTERM once two steps are logged, wherever the third is
    lines.append(line)
    if sum(s.startswith("step ") for s in lines) >= 2:
      break
  proc.send_signal(signal.SIGTERM)
  output = "".join(lines) + proc.stdout.read()
  proc.wait(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert "received SIGTERM" in output
  stopped_at = Checkpointer(f"{run}/checkpoints").all_steps()[-1]
  assert 2 <= stopped_at < 500
  assert f"stopped at step {stopped_at}; newest checkpoint: step {stopped_at}." in output, output[-3000:]
  names = set(objects(emulator, f"{bucket.split('/')[-1]}/run/"))
  prefix = f"{bucket.split('/')[-1]}/run/"
  assert {prefix + n for n in ("config.gin", "metrics.jsonl", "goodput.json")} <= names, sorted(names)
  assert any(n.startswith(prefix + "tensorboard/events.out.tfevents") for n in names), sorted(names)
  assert any(n.startswith(f"{prefix}checkpoints/{stopped_at}/state/") for n in names), sorted(names)

  out = _mm1_train(run, *flags, "--stop_after_steps=2")  # the same command resumes
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"resumed from {run}/checkpoints/{stopped_at}" in out.stdout, out.stdout[-3000:]
  goodput = json.loads((paths.path(run) / "goodput.json").read_text())
  assert len(goodput["attempts"]) == 2 and goodput["attempts"][0]["exit"]["code"] == 128 + signal.SIGTERM

  straight = tmp_path / "straight"
  out = _mm1_train(straight, *flags, f"--stop_after_steps={stopped_at + 2}")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  got, want = _losses(run), _losses(straight)
  assert sorted(got) == sorted(want) == list(range(1, stopped_at + 3))
  assert got == want  # bit for bit: model, optimizer, step and loader position came back from the bucket

  out = subprocess.run([sys.executable, "-m", "mm1_jax.cli", "eval", f"--workdir={run}", "--watch", "--shots=0",
                        "--gin_file=gin/experiments/quickstart.gin",
                        "--num_queries=4"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  step = stopped_at + 2
  result = json.loads((paths.path(run) / "eval" / f"step_{step}.json").read_text())
  assert result["step"] == step and "shapes_vqa/0shot/accuracy" in result["results"]
  assert f"step {step}" in (paths.path(run) / "eval" / "report.md").read_text()
  assert not (REPO / "gs:").exists()  # nothing went to a local folder named after the bucket


def test_a_corpus_built_into_a_bucket_feeds_the_loader_the_same_batches_as_a_local_one(bucket, emulator, tmp_path):
  """mm1-data build --out=gs://...: the Beam workers' shards, the TFDS metadata and
  build.json land in the bucket, and the grain loader reads them from there (array_record
  opens gs:// itself), batch for batch what the same build gives from a local folder."""
  from test_formats import make_webdataset

  from mm1_jax.data import build, loader, pipeline, sources

  wds = make_webdataset(tmp_path / "wds", 10)
  (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"plain text {i}"}) for i in range(5)))
  batches = {}
  for name, out in (("local", str(tmp_path / "corpus")), ("bucket", f"{bucket}/corpus")):
    report = build.build("webdataset", wds, out, progress=False, num_shards=2)
    assert report["written"] == {"caption": 10} and report["out"] == out
    build.build("text", tmp_path / "t.jsonl", out, progress=False, num_shards=1)
    sources.Corpus(data_dir=out, vocabulary="shapes_sp", prefix=f"bkt{name}", image_size=32,
                   kinds=("caption", "text"), rates={"caption": 3.0, "text": 1.0}).register()
    cfg = pipeline.DataConfig(mixture_or_task_name=f"bkt{name}_pretrain", batch_size=2, seq_len=64,
                              max_images=2, module_imports=())
    stream = loader.make_loader(cfg, tokens_per_image=4, image_size=32)
    batches[name] = [next(stream) for _ in range(3)]
  prefix = "test_a_corpus_built_into_a_bucket_feeds_the_loader_the_same_batches_as_a_local_one/corpus/"
  names = set(objects(emulator, prefix))
  caption = prefix + "mm1_caption/1.0.0/"
  assert {prefix + "build.json", caption + "dataset_info.json", caption + "metadata.json",
          caption + "mm1_caption-train_webdataset.array_record-00000-of-00002",
          caption + "mm1_caption-train_webdataset.array_record-00001-of-00002",
          prefix + "mm1_text/1.0.0/mm1_text-train_text.array_record-00000-of-00001"} <= names, sorted(names)
  assert not [n for n in names if ".staging-" in n or ".tmp" in n]  # staged shards were moved and removed
  assert json.loads((paths.path(bucket) / "corpus" / "build.json").read_text()).keys() == {
      "caption/train_webdataset", "text/train_text"}
  for got, want in zip(batches["bucket"], batches["local"]):
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert (batches["bucket"][0]["images"] > 0).any()
