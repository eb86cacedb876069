"""The former name of `mm1_jax.eval.readers` (the few-shot benchmark readers), kept so
that existing imports keep working."""

import sys

from mm1_jax.eval import readers

sys.modules[__name__] = readers
