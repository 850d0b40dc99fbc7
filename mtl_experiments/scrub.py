"""Secrets never reach a file, a tag or the console: credentials in URIs (``scheme://user:password@host``) and the
values of keys named like a secret (``password``, ``token``, ``secret``, ``api_key``, ``credentials``).

``redact`` cleans one string; ``scrub`` a whole config or container (keys and values, recursively); ``scrub_file``
rewrites a YAML file Hydra wrote (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, ``multirun.yaml``) in
place. The preferred way to pass credentials is the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``), which no file of a run ever holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URI
# a key part named like a secret: password, db_password, access_token, client_secret, api_key (not num_tokens)
SECRET_WORD = r"(?:pass|passwd|password|token|secret|api_?key|credentials?)"
SECRET_KEY = re.compile(rf"(?:^|_){SECRET_WORD}(?:_|$)", re.IGNORECASE)
# key=value in an override or a log line, where the key's last dotted part is named like a secret
SECRET_ASSIGNMENT = re.compile(
    rf"(?P<key>(?<![\w])(?:[\w+~/-]+\.)*(?:\w+_)?{SECRET_WORD}(?:_\w+)?)(?P<sep>=)(?P<value>[^\s,'\"}}\]]+)",
    re.IGNORECASE,
)


def is_secret_key(key: Any) -> bool:
    """Whether a config key (its last dotted part) is named like a secret."""
    return isinstance(key, str) and bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact(text: Any) -> Any:
    """``scheme://user:password@host`` -> ``scheme://***@host`` and ``...password=x`` -> ``...password=***``;
    anything that is not a string is returned as it is."""
    if not isinstance(text, str):
        return text
    text = USERINFO.sub(MASK + "@", text)
    return SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


def scrub(value: Any, key: Any = None) -> Any:
    """A copy of a plain container with every secret masked: values of secret-named keys, and credentials in
    every string."""
    if is_secret_key(key) and value is not None and not isinstance(value, Mapping | list | tuple):
        return MASK
    if isinstance(value, Mapping):
        return {k: scrub(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return redact(value)


def scrub_yaml(cfg: Any) -> str:
    """A config (DictConfig or container) as resolved YAML with its secrets masked."""
    from omegaconf import DictConfig, OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_yaml(OmegaConf.create(scrub(container)))


def scrub_file(path: str | os.PathLike) -> bool:
    """Rewrite a YAML file with its secrets masked (only if it held any). Returns whether it changed.

    Text-level, so the file keeps its layout and anything OmegaConf could not re-read (``${...}``) stays as it is:
    lines ``<secret-named key>: value`` get ``***`` as value, credentials in URIs and ``key=value`` overrides are
    masked."""
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text()
    out = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(\s*(?:- )?)([\w.+~/-]+)(\s*:\s*)(\S.*?)(\s*)$", line)
        if m and is_secret_key(m[2]) and m[4] not in ("null", "{}", "[]", "''", '""', MASK, f"'{MASK}'"):
            line = f"{m[1]}{m[2]}{m[3]}'{MASK}'{m[5]}"  # quoted: a bare *** is a YAML alias
        out.append(redact(line))
    new = "".join(out)
    if new == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)
    return True
