"""``python -m napari_cell2location`` (and ``torchrun ... -m napari_cell2location fit ...``): the command line."""

import sys

from ._cli import main

sys.exit(main())
