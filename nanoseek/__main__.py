"""`python -m nanoseek`: the same as the `nanoseek` command."""

import sys

from .cli import main

sys.exit(main())
