"""`python -m vlp ...` is the `vlp` command (what launchers run in every process)."""

import sys

from vlp.app.cli import main

sys.exit(main())
