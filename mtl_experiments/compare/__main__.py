"""``python -m mtl_experiments.compare``: the ``mtl-compare`` CLI."""

import sys

from mtl_experiments.compare.cli import main

sys.exit(main())
