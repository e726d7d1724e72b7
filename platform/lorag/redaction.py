"""Secrets out of what lorag keeps: a config or metadata tree, or its YAML, with every secret redacted.

An adapter version keeps the resolved config that trained it (`lorag.yaml`) and its provenance
(`lorag.json`), and both are read by whoever can read the adapter store: `lorag.adapters` passes
them through here before writing. Secrets are the values of `token` and `password` fields, the
values of `env_vars` entries whose names look like credentials, and the user part of a URL. The
redacted copy keeps every field, so a redacted `lorag.yaml` still loads as a config.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

REDACTED = "<redacted>"
_SECRET_FIELDS = {"token", "password"}
_SECRET_ENV = re.compile(r"(?i).*(token|secret|passw(or)?d|credential|api_?keys?|access_?key|private_?key).*")
_URL_USER = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s]+)@")


def redact_secrets(value: Any) -> Any:
    """A copy of a config or metadata tree with every secret replaced by `"<redacted>"`.

    Secrets are the values of `token` and `password` fields (a knowledge base's Milvus token),
    the values of `env_vars` entries whose names say TOKEN, SECRET, PASSWORD, CREDENTIAL, API_KEY
    or ACCESS_KEY, and the user part of a URL (`http://user:<redacted>@host`). The copy keeps
    every field, so a redacted `lorag.yaml` still loads as a config.
    """
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if key in _SECRET_FIELDS and isinstance(v, str) and v:
                out[key] = REDACTED
            elif key == "env_vars" and isinstance(v, dict):
                out[key] = {k: REDACTED if isinstance(x, str) and x and _SECRET_ENV.fullmatch(str(k)) else redact_secrets(x) for k, x in v.items()}
            else:
                out[key] = redact_secrets(v)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_USER.sub(_redact_url_user, value)
    return value


def redact_yaml(text: str) -> str:
    """`text` with secrets redacted; unchanged (byte for byte) when it holds none.

    Raises:
        ValueError: `text` is not YAML.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"the config to store with the adapter is not YAML: {e}") from e
    clean = redact_secrets(data)
    return text if clean == data else yaml.safe_dump(clean, sort_keys=False)


def _redact_url_user(m: re.Match) -> str:
    user, colon, _ = m.group(2).partition(":")
    return f"{m.group(1)}{user}:{REDACTED}@" if colon else f"{m.group(1)}{REDACTED}@"  # no colon: the user is a token
