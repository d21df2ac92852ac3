"""`python -m nanoseek`: the same as the `nanoseek` command.

Under torchrun (`torchrun --nproc_per_node=N -m nanoseek train ...`) every process runs this; only
rank 0 prints to stdout (errors still reach stderr from every rank)."""

import os
import sys

from .cli import main

if int(os.environ.get("RANK", "0")) != 0:
    sys.stdout = open(os.devnull, "w")

sys.exit(main())
