"""``python -m vlprune.cli``: the `vlprune` command."""

import sys

from vlprune.cli import main

sys.exit(main())
