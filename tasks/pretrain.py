"""`mm1_pretrain`: MM1's mixture over a corpus built with `mm1-data build`.

Tasks `mm1_caption`, `mm1_interleaved`, `mm1_text` and the mixture `mm1_pretrain`
(45:45:10; override with `pipeline.DataConfig.mixture_rates`) read the folder named by
`$MM1_PRETRAIN_DIR` (default ~/.cache/mm1_jax/pretrain). Nothing is read at import: a
missing folder fails when training starts, naming the folder and how to build it.

The tokenizer is `$MM1_SPM_MODEL`, a SentencePiece model that must have `<image>` as a
single piece with id 3 (`mm1_jax.data.tokenizer.IMAGE_ID`, a user-defined symbol when
the model is trained); it defaults to the bundled shapes-world model, which is only fit
for smoke tests. Adding that piece to an existing tokenizer (Llama's, say) is not
automated yet. Task images are decoded at `$MM1_PRETRAIN_IMAGE_SIZE`
(default 378, MM1's resolution); the pipeline resizes to the model's resolution if
it differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import seqio
import tensorflow as tf

from mm1_jax.data import preprocessors as prep
from mm1_jax.data import sources
from mm1_jax.data.tokenizer import DEFAULT_SPM_PATH

DATA_DIR = Path(os.environ.get("MM1_PRETRAIN_DIR", Path.home() / ".cache" / "mm1_jax" / "pretrain"))
VOCABULARY = seqio.SentencePieceVocabulary(os.environ.get("MM1_SPM_MODEL", str(DEFAULT_SPM_PATH)))
IMAGE_SIZE = int(os.environ.get("MM1_PRETRAIN_IMAGE_SIZE", "378"))
OUTPUT_FEATURES = {
    "text": seqio.Feature(VOCABULARY, add_eos=True),
    prep.OUTPUT_IMAGE_KEY: seqio.ContinuousFeature(dtype=tf.uint8, rank=4, required=False),
}

if "mm1_pretrain" not in seqio.MixtureRegistry.names():
  sources.register_corpus("mm1", DATA_DIR, image_size=IMAGE_SIZE, output_features=OUTPUT_FEATURES)
