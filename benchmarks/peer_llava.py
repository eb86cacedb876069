"""The PyTorch peer of `bench_small`: Hugging Face transformers' LLaVA (CLIP vision tower,
2-layer MLP projector, Llama decoder) at the same shapes, precision and thread count.

Measures what `benchmarks.run` measures for mm1_jax: full train steps (forward,
backward, AdamW) and batched greedy decoding with the KV cache (`generate`). Random
weights: speed does not depend on them. Prints one JSON object.

  python benchmarks/peer_llava.py [--short] [--threads N] [--json_out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# bench_small (gin/models/bench_small.gin) and the suite's batch shapes.
FULL = dict(image_size=224, patch_size=14, vit_width=384, vit_depth=6, vit_heads=6, vit_mlp=1536,
            width=512, depth=8, heads=8, mlp=1408, vocab=32000,
            batch=8, seq_len=512, decode_batch=8, prompt_text=256, new_tokens=64)
SHORT = dict(image_size=28, patch_size=14, vit_width=32, vit_depth=1, vit_heads=2, vit_mlp=64,
             width=32, depth=2, heads=2, mlp=64, vocab=512,
             batch=2, seq_len=16, decode_batch=2, prompt_text=8, new_tokens=4)
IMAGE_TOKEN_ID = 3


def build(s: dict):
  import transformers as T

  vision = T.CLIPVisionConfig(hidden_size=s["vit_width"], num_hidden_layers=s["vit_depth"],
                              num_attention_heads=s["vit_heads"], intermediate_size=s["vit_mlp"],
                              image_size=s["image_size"], patch_size=s["patch_size"])
  text = T.LlamaConfig(hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["heads"], intermediate_size=s["mlp"], vocab_size=s["vocab"],
                       tie_word_embeddings=False, max_position_embeddings=4096)
  n_patches = (s["image_size"] // s["patch_size"]) ** 2
  config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=n_patches, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, projector_hidden_act="gelu")
  config._attn_implementation = "sdpa"
  model = T.LlavaForConditionalGeneration(config)
  return model, n_patches


def _inputs(torch, s: dict, batch: int, text_len: int, n_patches: int, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  text = torch.randint(5, s["vocab"], (batch, text_len), generator=g)
  image = torch.full((batch, n_patches), IMAGE_TOKEN_ID)
  ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)  # BOS-like token, the image, then text
  pixels = torch.randn(batch, 3, s["image_size"], s["image_size"], generator=g)
  return ids, pixels


def train(model, torch, s: dict, n_patches: int, steps: int, warmup: int) -> dict:
  ids, pixels = _inputs(torch, s, s["batch"], s["seq_len"] - n_patches, n_patches)
  labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  model.train()
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {"step_s_median": median, "step_s_min": min(times), "steps": steps,
          "tokens_per_s": s["batch"] * s["seq_len"] / median, "final_loss": float(loss)}


def decode(model, torch, s: dict, n_patches: int, repeats: int) -> dict:
  ids, pixels = _inputs(torch, s, s["decode_batch"], s["prompt_text"], n_patches, seed=1)
  model.eval()

  def generate(n):
    return model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

  times, prefill_times = [], []
  with torch.inference_mode():
    for i in range(repeats + 1):  # the first is a warm-up
      t = time.perf_counter()
      out = generate(s["new_tokens"])
      if i:
        times.append(time.perf_counter() - t)
      t = time.perf_counter()
      generate(1)  # the prompt's prefill and its first token: the time not spent on new tokens
      if i:
        prefill_times.append(time.perf_counter() - t)
  new = out.shape[1] - ids.shape[1]
  median = statistics.median(times)
  return {"seconds_median": median, "prefill_s_median": statistics.median(prefill_times), "new_tokens": int(new),
          "prompt_positions": int(ids.shape[1]), "tokens_per_s": s["decode_batch"] * new / median}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--short", action="store_true", help="tiny sizes: only checks that it runs")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  p.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; short 2)")
  p.add_argument("--only", choices=("train", "decode"), default=None)
  p.add_argument("--json_out", default=None)
  args = p.parse_args(argv)
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  s = SHORT if args.short else FULL
  steps = args.steps or (2 if args.short else 5)
  model, n_patches = build(s)
  record = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
            "params": sum(x.numel() for x in model.parameters()), "shapes": s,
            "attention": model.config._attn_implementation}
  if args.only in (None, "train"):
    record["train"] = train(model, torch, s, n_patches, steps, warmup=1 if args.short else 2)
  if args.only in (None, "decode"):
    record["decode"] = decode(model, torch, s, n_patches, repeats=1 if args.short else 3)
  print(json.dumps(record, indent=1))
  if args.json_out:
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
  return record


if __name__ == "__main__":
  main()
