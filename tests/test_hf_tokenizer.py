"""`mm1-convert import` of a decoder brings its tokenizer: `<image>` added where it is
missing, the embedding grown to match, and a model.gin a run can include as it is.

Tokenizers are trained here (a byte-level BPE tokenizer.json with the `tokenizers`
package, as Llama 3 and Qwen ship; a SentencePiece model with byte fallback, as Llama 2
and Mistral ship) beside tiny random transformers checkpoints."""

import dataclasses
import io
import json

import gin
import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mm1_jax.data import vocabulary  # noqa: E402
from mm1_jax.hf import cli  # noqa: E402

TEXT = ["a red circle on the left of a blue square.", "Question: what colour is the triangle? Answer: green",
        "three small shapes\nand a large one", "the quick brown fox jumps over the lazy dog 0123456789"]
MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)


def make_bpe_tokenizer(folder, vocab_size=300, extra_special=()):
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json naming EOS) trained on TEXT."""
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>",
                                                                      *extra_special],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXT * 20, trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>",
                                                            "bos_token": "<|begin_of_text|>"}))
  return tok


def make_sentencepiece(folder, vocab_size=340):
  """A SentencePiece model like Llama 2's: BPE, byte fallback, identity normalisation."""
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "tokenizer.model").write_bytes(model.getvalue())
  return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def save_llm(kind, folder, vocab_size, **overrides):
  torch.manual_seed(0)
  config_cls, model_cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                           "mistral": (T.MistralConfig, T.MistralForCausalLM)}[kind]
  model = model_cls(config_cls(vocab_size=vocab_size, **(MODEL | overrides)))
  model.save_pretrained(str(folder))
  return model


def _import(src, out, capsys, *extra):
  assert cli.main(["import", "--kind=" + ("mistral" if (src / "tokenizer.model").exists() else "llama"),
                   f"--src={src}", f"--out={out}", *extra]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _gin_bindings(path):
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_file(str(path))
    return (gin.query_parameter("%TOKENIZER"), gin.get_bindings("mm1_jax.model.MM1Config"),
            gin.get_bindings("mm1_jax.decoder.DecoderConfig"))
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize("kind", ["bpe_json", "sentencepiece"])
def test_import_adds_image_piece_and_grows_the_embedding(tmp_path, capsys, kind):
  src = tmp_path / "hf"
  if kind == "bpe_json":
    original = make_bpe_tokenizer(src)
    pieces = original.get_vocab_size()
    encode_original = lambda t: original.encode(t, add_special_tokens=False).ids  # noqa: E731
    model = save_llm("llama", src, pieces)
  else:
    original = make_sentencepiece(src)
    pieces = original.get_piece_size()
    encode_original = original.encode
    model = save_llm("mistral", src, pieces, sliding_window=64)
  out = tmp_path / "imported"
  summary = _import(src, out, capsys)
  tok = summary["tokenizer"]
  assert tok["image_token_added"] and tok["image_id"] == pieces and tok["pieces"] == pieces + 1

  # Text round-trips: the imported vocabulary encodes text as the original did, and decodes it back.
  vocab = vocabulary.load(out / "tokenizer")
  for text in TEXT:
    assert list(vocab.encode(text)) == list(encode_original(text))
    assert vocab.decode(vocab.encode(text)) == text
  ids = vocabulary.special_ids(vocab)
  assert ids.image == pieces and list(vocab.encode("a<image>b")).count(pieces) == 1
  assert any("\n" in vocab.decode([s]) for s in ids.stops)  # answers stop at a newline piece

  # The embedding grew to a multiple of 128 with the new rows at the mean of the old ones.
  params = cli.load_params(out)["decoder"]
  emb = params["embedding"]["embedding"]
  ref = model.model.embed_tokens.weight.detach().numpy()
  assert emb.shape == (128 * -(-(pieces + 1) // 128), ref.shape[1]) and tok["embedding_rows_added"] == emb.shape[0] - pieces
  np.testing.assert_array_equal(emb[:pieces], ref)
  np.testing.assert_allclose(emb[pieces:], np.broadcast_to(ref.mean(0), emb[pieces:].shape), rtol=1e-6)
  head = params["lm_head"]["kernel"]
  np.testing.assert_allclose(head[:, pieces], model.lm_head.weight.detach().numpy().mean(0), rtol=1e-5, atol=1e-7)

  # model.gin names the tokenizer and the image id, beside the grown decoder shape.
  tokenizer, mm1, dec = _gin_bindings(out / "model.gin")
  assert tokenizer == str((out / "tokenizer").absolute())
  assert mm1["image_token_id"] == pieces and dec["vocab_size"] == emb.shape[0]
  # vocabulary.gin: the same three, nothing else of the decoder (a pod keeps its dtype, remat).
  tokenizer, mm1, dec = _gin_bindings(out / "vocabulary.gin")
  assert (tokenizer, mm1["image_token_id"], dec) == (str((out / "tokenizer").absolute()), pieces,
                                                      {"vocab_size": emb.shape[0]})


def test_a_tokenizer_that_has_image_keeps_its_ids(tmp_path, capsys):
  src = tmp_path / "hf"
  original = make_bpe_tokenizer(src, extra_special=("<image>",))
  save_llm("llama", src, 128 * 3)  # padded embedding, as Qwen ships: no growth needed
  summary = _import(src, tmp_path / "imported", capsys)
  tok = summary["tokenizer"]
  assert not tok["image_token_added"] and tok["image_id"] == original.token_to_id("<image>")
  assert tok["embedding_rows_added"] == 0


def test_no_tokenizer_is_a_clear_error(tmp_path, capsys):
  src = tmp_path / "hf"
  save_llm("llama", src, 96)
  assert cli.main(["import", "--kind=llama", f"--src={src}", f"--out={tmp_path / 'x'}"]) == 2
  assert "--tokenizer=none" in capsys.readouterr().err
  assert cli.main(["import", "--kind=llama", f"--src={src}", f"--out={tmp_path / 'y'}", "--tokenizer=none"]) == 0


def test_a_vocabulary_without_image_piece_is_refused(tmp_path):
  make_bpe_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="is not one piece"):
    vocabulary.load(tmp_path / "tokenizer.json")


def test_a_model_that_does_not_fit_the_vocabulary_is_refused(tmp_path, capsys, tiny_config):
  """A run whose model file still says image_token_id = 3 (the shapes-world id) while the
  imported vocabulary places <image> elsewhere stops before training, naming the fix."""
  src = tmp_path / "hf"
  make_bpe_tokenizer(src)
  save_llm("llama", src, 96)
  summary = _import(src, tmp_path / "imported", capsys)
  ids = vocabulary.special_ids(vocabulary.load(tmp_path / "imported" / "tokenizer"))
  with pytest.raises(ValueError, match=f"image_token_id = {summary['tokenizer']['image_id']}"):
    vocabulary.check_model(ids, tiny_config, "the imported vocabulary")
  fits = dataclasses.replace(tiny_config, image_token_id=ids.image,
                             decoder=dataclasses.replace(tiny_config.decoder, vocab_size=384))
  with pytest.raises(ValueError, match="vocab_size >= "):  # 128 rows, more pieces
    vocabulary.check_model(ids, dataclasses.replace(fits, decoder=dataclasses.replace(fits.decoder, vocab_size=128)),
                           "the imported vocabulary")
  vocabulary.check_model(ids, fits, "the imported vocabulary")


def test_hf_vocabulary_in_tf_data_and_grain_workers(tmp_path):
  """The tf.data path encodes as Python does, decoding stops at EOS (no EOS or padding text),
  and the vocabulary survives pickling (grain worker processes rebuild it)."""
  import pickle

  import tensorflow as tf

  make_bpe_tokenizer(tmp_path, extra_special=("<image>",))
  vocab = vocabulary.load(tmp_path / "tokenizer.json")
  encoded = list(tf.data.Dataset.from_tensor_slices(TEXT).map(vocab.encode_tf).as_numpy_iterator())
  assert [list(e) for e in encoded] == [list(vocab.encode(t)) for t in TEXT]
  ids = list(vocab.encode(TEXT[0]))
  assert vocab.decode(ids + [vocab.eos_id, ids[0], ids[1]]) == TEXT[0]
  rows = tf.constant([ids + [vocab.eos_id, 0, 0], ids[:3] + [vocab.eos_id] + [0] * (len(ids) - 1)])
  assert [t.decode() for t in vocab.decode_tf(rows).numpy()] == [TEXT[0], vocab.decode(ids[:3])]
  again = pickle.loads(pickle.dumps(vocab))
  assert again == vocab and list(again.encode(TEXT[2])) == list(vocab.encode(TEXT[2]))
