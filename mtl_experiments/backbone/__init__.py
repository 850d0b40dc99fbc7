"""Backbones: one file per backbone, named like its ``conf/backbone/<name>.yaml``; the contract is base.py."""
