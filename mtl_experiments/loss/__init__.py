"""Loss weighting methods: one file per method, named like its ``conf/loss/<name>.yaml``; contract in base.py."""
