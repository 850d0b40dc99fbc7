"""Datasets: one file per dataset (named like its ``conf/data/<name>.yaml``) plus the shared contract in base.py."""
