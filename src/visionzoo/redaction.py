"""Credentials out of what visionzoo writes: a tracking URI may carry them
(``https://user:token@host``), and config.yaml, checkpoints, the report, the trackers'
parameters and every log line show ``https://***@host`` instead. One function, used by every
writer."""

from __future__ import annotations

import copy
import re
from typing import Any

# What stands for the user info (``user:password@``) of a URL wherever visionzoo writes one.
REDACTED = "***"
# scheme://, then the user info: everything up to the authority's last @ (a password may hold an
# unescaped @; / ? # and whitespace end the authority).
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]+@")


def redact_credentials(text: str) -> str:
    """``text`` with the user info of every URL in it replaced by ``***``:
    ``https://user:token@host:5000/x`` becomes ``https://***@host:5000/x``."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def without_credentials(cfg: Any) -> Any:
    """A recipe config as it may be written: a copy whose tracking URI (log.mlflow_uri) has its
    credentials redacted, or ``cfg`` itself when it has none."""
    uri = cfg.log.mlflow_uri
    if not uri or redact_credentials(uri) == uri:
        return cfg
    out = copy.copy(cfg)
    out.log = copy.copy(cfg.log)
    out.log.mlflow_uri = redact_credentials(uri)
    return out
