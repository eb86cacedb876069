"""`python -m mm1_jax COMMAND [flags]`: the mm1-* commands without their console scripts."""

import sys

from mm1_jax import console

sys.exit(console.main())
