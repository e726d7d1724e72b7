"""Who may call the endpoint, and what each caller may use.

Keys come from three places: `serve.api_keys_env` (comma-separated) and `serve.api_keys_file` (one
per line) give keys that may use everything; `serve.api_keys` entries give keys (by their sha256,
so the config holds no secret) limited to some models and knowledge bases. An entry of the first
two may be a key's digest, `sha256:<64 hex>`, instead of the key: `lorag deploy` sends the replicas
only digests, so no key travels or is stored in plain text on the cluster. A request outside its
key's scope is a 403; a missing or wrong key a 401. An endpoint on a host beyond loopback refuses
to start without keys unless the config says `auth: none`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorag.config import ConfigError, LoragConfig
from lorag.schemas import APIError


@dataclass(frozen=True)
class Scope:
    """What one key may use; None: everything."""

    models: frozenset[str] | None = None
    knowledge_bases: frozenset[str] | None = None

    def check_model(self, model: str) -> None:
        """Raises APIError 403 unless the key may use `model` (an adapter name or the base model's)."""
        if self.models is not None and model not in self.models:
            raise APIError(403, f"this API key may not use model {model!r} (it may use: {sorted(self.models)})", type="permission_error", code="model_not_allowed")

    def check_kb(self, kb: str) -> None:
        if self.knowledge_bases is not None and kb not in self.knowledge_bases:
            raise APIError(403, f"this API key may not read knowledge base {kb!r}", type="permission_error", code="kb_not_allowed")


EVERYTHING = Scope()
DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-fA-F]{64}")


def api_keys(cfg: LoragConfig) -> frozenset[str]:
    """The unscoped keys: `api_keys_env` (comma-separated) and `api_keys_file` (one per line), as
    this process sees them (a replica gets them through its deployment's environment); each a key
    or a key's digest (`as_digest`).

    Raises:
        RuntimeError: keys are missing where the config requires them (`auth_problem`).
    """
    if cfg.serve.auth == "none":
        return frozenset()
    keys = os.environ.get(cfg.serve.api_keys_env, "").split(",")
    if cfg.serve.api_keys_file:
        try:
            keys += Path(cfg.serve.api_keys_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"serve.api_keys_file: cannot read {cfg.serve.api_keys_file} ({e.strerror or e}): fix the path, "
                              f"or leave it unset and give the keys in ${cfg.serve.api_keys_env}") from None
    found = frozenset(k.strip() for k in keys if k.strip() and not k.strip().startswith("#"))
    if problem := auth_problem(cfg, found):
        raise RuntimeError(problem)
    return found


def key_scopes(cfg: LoragConfig) -> dict[str, Scope]:
    """sha256 hex of every accepted key -> its scope; empty when the endpoint needs no key.

    Raises:
        RuntimeError: as `api_keys`.
    """
    if cfg.serve.auth == "none":
        return {}
    scopes = {as_digest(k)[len(DIGEST_PREFIX):].lower(): EVERYTHING for k in api_keys(cfg)}
    for entry in cfg.serve.api_keys:
        scopes.setdefault(entry.sha256, Scope(
            frozenset(entry.models) if entry.models is not None else None,
            frozenset(entry.knowledge_bases) if entry.knowledge_bases is not None else None,
        ))
    return scopes


def authorize(scopes: dict[str, Scope], header: str | None) -> Scope:
    """The scope of the key in an `Authorization: Bearer <key>` header.

    Raises:
        APIError: 401 when keys are required and the header has none of them.
    """
    if not scopes:
        return EVERYTHING
    scheme, _, key = (header or "").partition(" ")
    scope = scopes.get(digest(key.strip())) if scheme.lower() == "bearer" else None
    if scope is None:  # a lookup by digest: the time taken says nothing about the key
        raise APIError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key")
    return scope


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def as_digest(key: str) -> str:
    """`sha256:<hex>` of a key (a digest stays as it is): what the endpoint needs to accept the key,
    and nothing that can be sent as one."""
    return key if _DIGEST.fullmatch(key) else DIGEST_PREFIX + digest(key)


def auth_problem(cfg: LoragConfig, keys: frozenset[str]) -> str | None:
    """Why the endpoint must not start with these keys, or None: `auth: api_keys` with no key, or a
    host beyond loopback with no key and no explicit `auth: none`."""
    sv = cfg.serve
    if keys or sv.api_keys or sv.auth == "none":
        return None
    where = f"${sv.api_keys_env}" + (f" or {sv.api_keys_file}" if sv.api_keys_file else "")
    if sv.auth == "api_keys":
        return f"serve.auth is api_keys but no API key was found in {where} (as this replica sees it): set {sv.api_keys_env}, or list keys in serve.api_keys"
    if not _loopback(sv.host):
        return (f"serve.host {sv.host} exposes the endpoint beyond this machine, but no API key was found in {where}: "
                f"set {sv.api_keys_env} (lorag deploy passes it to the replicas), or say `serve.auth: none` to serve without keys")
    return None


def _loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")
