"""The options the commands share (--config, --set, --address, --token), how they become a config,
and `field_option`: an option that mirrors a config field takes its bounds and help from that field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import BaseModel

from lorag.cli.console import console, fail
from lorag.config import ConfigError, LoragConfig, load_config

ConfigOpt = typer.Option(Path("lorag.yaml"), "--config", "-c", help="The lorag.yaml to use.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value, e.g. --set serve.port=8001 or --set adapters.support-bot.train.max_steps=5 (repeatable).")
# Commands that run Ray in this process (ingest, train, serve) take no cluster address: `--address` is a
# cluster's dashboard URL, for the commands that send work there (submit, jobs, deploy). Given one anyway,
# they say which command to use instead. To join a cluster in-process from one of its nodes: RAY_ADDRESS=auto.
AddressOpt = typer.Option(None, "--address", hidden=True)
ClusterAddressOpt = typer.Option(None, "--address", help="The cluster's dashboard address (Ray Jobs and Serve APIs), e.g. http://HOST:8265. Default: cluster.address of the config, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS.")
TokenOpt = typer.Option(None, "--token", help="The cluster's Ray auth token. Default: $RAY_AUTH_TOKEN, else the file in $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (copy the head's).")

FIELD_DEFAULT: Any = object()  # field_option's default: the config field's own default


def field_option(model: type[BaseModel], name: str, *param_decls: str, default: Any = FIELD_DEFAULT,
                 help: Optional[str] = None, note: str = "") -> Any:
    """A `typer.Option` for a value that a config field also holds: its min and max are the field's
    `ge`/`le`, so the command line accepts exactly what the config does, and its help is the field's
    description (or `help`, where the command uses the value differently) followed by `note`.

    Args:
        model: the config model, e.g. `KnowledgeBaseConfig`.
        name: the field, e.g. `top_k`.
        param_decls: the option's flags, e.g. "-k".
        default: the option's default (default: the field's).
        help: replaces the field's description as the option's help.
        note: appended to the help, e.g. where the default comes from.

    Raises:
        TypeError: the field has a bound an option cannot express (an exclusive `gt`/`lt`).
    """
    field = model.model_fields[name]
    bounds: dict[str, Any] = {}
    for constraint in field.metadata:
        if getattr(constraint, "gt", None) is not None or getattr(constraint, "lt", None) is not None:
            raise TypeError(f"{model.__name__}.{name}: an exclusive bound (gt/lt) has no option equivalent; give the field ge/le")
        for bound, key in (("ge", "min"), ("le", "max")):
            if getattr(constraint, bound, None) is not None:
                bounds[key] = getattr(constraint, bound)
    text = " ".join(t for t in (help or field.description or "", note) if t)
    return typer.Option(field.default if default is FIELD_DEFAULT else default, *param_decls, help=text, **bounds)


def load(path: Path, overrides: Optional[list[str]]) -> LoragConfig:
    """The config of `--config` with the `--set` overrides; a mistake is one line per field, exit 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def check_names(lookup: Callable[[str], Any], names: Optional[list[str]]) -> None:
    """Fail on a wrong --kb/--adapter name before Ray starts."""
    for name in names or []:
        try:
            lookup(name)
        except KeyError as e:
            fail(str(e.args[0]), 2)
