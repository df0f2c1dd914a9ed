"""`python -m eval ...`: the same as `vlp eval ...`."""

import sys

from eval.cli import main

sys.exit(main())
