"""seqio task and mixture registrations. Importing this package registers them all."""

from tasks import shapes  # noqa: F401
from tasks import pretrain  # noqa: F401
from tasks import benchmarks  # noqa: F401
