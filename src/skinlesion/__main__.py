"""``python -m skinlesion`` (also ``torchrun -m skinlesion train ...``)."""

import sys

from skinlesion.cli import main

sys.exit(main())
