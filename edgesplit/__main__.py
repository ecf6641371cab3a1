"""`python -m edgesplit ...` is the `edgesplit` command."""

import sys

from edgesplit.cli import main

sys.exit(main())
