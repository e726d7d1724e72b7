"""Thin Ray Job entrypoints: `python -m jobs.ingest`, `python -m jobs.finetune`, `python -m jobs.evaluate`,
and the command line they share (`job_parser`, `parse_config`, `check_names`): --config and --set mean
what they mean to `lorag`, and a mistake is one line before Ray starts.

Importing this package puts the project's `platform/` first on sys.path, so a job started from a
copy of the project imports lorag from that copy: `ray job submit --working-dir .` uploads the
project and Ray puts the copy's root on the path, but not `platform/`. The job's workers get the
same path from `lorag.cluster.connect` (or from `lorag submit`'s runtime_env).
"""

import argparse
import os
import sys

_PLATFORM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
if _PLATFORM not in sys.path:
    sys.path.insert(0, _PLATFORM)


def job_parser(doc: str, set_example: str) -> argparse.ArgumentParser:
    """A job's command line: `doc` (the job module's docstring, with its run commands) as the help, and
    --config and --set as every `lorag` command takes them. The job adds its own options, then calls
    `parse_config`.

    Args:
        doc: the help text, usually the job module's `__doc__`.
        set_example: an override this job is often run with, shown in --set's help, e.g. `knowledge_bases.0.top_k=4`.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the lorag.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a config value, e.g. {set_example} (repeatable)")
    return parser


def parse_config(parser: argparse.ArgumentParser):
    """Parse the job's command line and load its config with the --set overrides, as `lorag` does: a
    mistake in the file or an override raises `ConfigError`, which `lorag.errors.run_job` prints as one
    line per field (exit 2).

    Returns:
        (the parsed arguments, the `LoragConfig`).
    """
    from lorag.config import load_config

    args = parser.parse_args()
    return args, load_config(args.config, args.set)


def check_names(parser: argparse.ArgumentParser, lookup, names) -> None:
    """Before Ray starts: exit 2 (argparse's usage error) naming the first of `names`, given with --kb or
    --adapter, that `lookup` (`cfg.knowledge_base`, `cfg.adapter`) does not know."""
    for name in names or []:
        try:
            lookup(name)
        except KeyError as e:
            parser.error(e.args[0])
