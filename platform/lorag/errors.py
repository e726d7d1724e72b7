"""The user's mistakes, each as one line: the one place that turns an exception into what to fix.

Every `lorag` command (`lorag.cli.main`) and every Ray Job entrypoint (`jobs.*`, through `run_job`)
ends here when something raises: a mistake a user can fix (a config field, a missing model, Milvus
or storage out of reach, a wrong Ray address or token, a step run out of order) prints one
`error:` line that names the field or variable to change, and the process exits 2 for a bad
config or command line, 1 for the rest, without a traceback. Anything else is a bug in lorag and
keeps its traceback.

Errors come wrapped: a Ray task's or actor's error arrives as `RayTaskError` (its `cause` is the
original), Ray Train's as `TrainingFailedError` around the worker's, and lorag's own wrappers
chain with `raise ... from`. `explain` walks that chain to the first error it knows.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterator

AWS_HINT = ("S3 endpoint and credentials come from the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(AWS_ENDPOINT_URL for a server other than AWS, AWS_REGION), or run where the node's own identity has access")
MODEL_HINT = "the config's `base_model` or `embedder`"
MILVUS_HINT = "check the knowledge base's `uri` (and `token`) in the config, and that the Milvus server is up"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps: Ray's `cause`, `__cause__`, `__context__` (each once)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def explain(exc: BaseException) -> tuple[str, int] | None:
    """(one line naming what to fix, exit code) for a mistake a user can fix; None for a bug."""
    from lorag.cluster import ClusterError
    from lorag.config import ConfigError
    from lorag.examples import DatasetError
    from lorag.models import ModelNotFoundError

    for e in causes(exc):
        text = _first_lines(e)
        if isinstance(e, ConfigError):
            return text, 2
        if isinstance(e, (ClusterError, DatasetError)):
            return text, 1
        if isinstance(e, ModelNotFoundError):
            return f"{text} (set {MODEL_HINT})", 1
        if isinstance(e, ConnectionError) and "Milvus" in text:
            return text if MILVUS_HINT in text else f"{text}; {MILVUS_HINT}", 1
        if isinstance(e, LookupError) and "run `lorag kb ingest` first" in text:
            return text, 1
        if type(e).__name__ == "AuthenticationError":  # ray.exceptions.AuthenticationError: joining a cluster in-process
            return f"the Ray cluster refused this process's auth token ({text}): set RAY_AUTH_TOKEN to the head's ~/.ray/auth_token", 1
        if isinstance(e, ValueError) and text.startswith("cannot open storage location"):
            return text, 1
        if isinstance(e, OSError) and ("AWS Error" in text or "S3" in text):
            return f"the config's `storage` (or --store) is out of reach: {text}. {AWS_HINT}", 1
    return None


def _first_lines(e: BaseException, limit: int = 6) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return "\n".join(lines[:limit]) or type(e).__name__


def exit_if_known(e: Exception, report: Callable[[str], None]) -> None:
    """In an `except` block: for a known mistake, `report` its line and exit with its code; else
    re-raise the error being handled (a bug keeps its traceback)."""
    known = explain(e)
    if known is None:
        raise
    report(known[0])
    sys.exit(known[1])


def run_job(main: Callable[[], None]) -> None:
    """Run a Ray Job entrypoint's `main`: a known mistake is one `error:` line on stderr and exit
    2 (config) or 1, never a traceback in the job's logs (nor gRPC's own log lines: see `lorag.cli`)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        exit_if_known(e, lambda line: print(f"error: {line}", file=sys.stderr, flush=True))
