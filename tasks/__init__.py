"""seqio task and mixture registrations. Importing this package registers them all.

A corpus built with `mm1-data build` is registered by the run that reads it: its folder
and tokenizer are gin values (`mm1_jax.data.sources.Corpus`, DATA_DIR and TOKENIZER in
gin/runs/pretrain.gin).
"""

from tasks import shapes  # noqa: F401
from tasks import eval_tasks  # noqa: F401  (after shapes: as before, registration order kept)
