"""Compare tracked runs across methods, backbones and seeds; a thin CLI over ``mtl_experiments.compare``
(also installed as the console script ``mtl-compare``).

Groups runs that differ only by seed and prints a Markdown table: the configuration choices that vary,
per-task test metrics as mean ± std over seeds, Δm% against the single-task runs of the same data
(Maninis et al., CVPR 2019; positive = better than single-task) and gradient-conflict summaries.

    python scripts/compare_runs.py --latest-sweep --out comparison/
    python scripts/compare_runs.py --experiment mtl-experiments --tag loss=cagrad --metrics auroc
    python scripts/compare_runs.py --tracking-uri http://127.0.0.1:5000 --parent <run id> --log-to-parent
"""

from __future__ import annotations

import sys

from mtl_experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
