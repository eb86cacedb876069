"""The former name of `tasks.eval_tasks` (the few-shot benchmarks' seqio tasks), kept so
that existing imports keep working."""

import sys

from tasks import eval_tasks

sys.modules[__name__] = eval_tasks
