"""Train and test one configuration: ``python train.py [group=option ...] [key=value ...]``.

Configs live in ``conf/`` (``conf/train.yaml`` is the root); ``python train.py --help`` lists the groups
and their options. ``-m`` sweeps, e.g. ``python train.py -m loss=equal,fixed seed=0,1,2``.
"""

from mtl_experiments.cli import main

if __name__ == "__main__":
    main()
