"""``python -m mrg.cli …`` (as ``torchrun -m mrg.cli train …`` starts each rank)."""

import sys

from mrg.cli import main

sys.exit(main())
