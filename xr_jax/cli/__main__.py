import sys

from xr_jax.cli import main

sys.exit(main())
