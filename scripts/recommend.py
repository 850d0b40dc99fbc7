"""Top-K recommendations from a trained model; a thin CLI over ``mtl_experiments.recommend`` (also installed as the
console script ``mtl-recommend``).

Loads the model from an MLflow run (its best checkpoint) or a checkpoint file, scores every catalogue item for each
user with every task and ranks them by a fusion of the task scores (default: the product of binary-task
probabilities). Users the dataset does not know are scored as new users from their features.

    python scripts/recommend.py --run-id <run id> --users 12,57 --k 10 --exclude-seen
    python scripts/recommend.py --checkpoint outputs/.../checkpoints/last.ckpt --users 99999 \\
        --user-features age_bucket=2,region=5,activity_level=3,user_activity=0.4 \\
        --fusion sum --weights click=1,watch_time=0.5
"""

from __future__ import annotations

import sys

from mtl_experiments.recommend import main

if __name__ == "__main__":
    sys.exit(main())
