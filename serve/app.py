"""The lorag Serve application: `import_path: serve.app:app`.

`app` is a Serve application builder: Serve calls it with the `args` of serve/config.yaml.

    serve run serve/config.yaml
    serve run serve.app:app config=examples/quickstart/lorag.yaml
    LORAG_CONFIG=path/to/lorag.yaml serve run serve.app:app
"""

import os

from pydantic import BaseModel

from lorag.config import load_config
from lorag.serving import build_app


class AppArgs(BaseModel):
    config: str | None = None


def app(args: AppArgs):
    path = args.config or os.environ.get("LORAG_CONFIG")
    if not path:
        raise ValueError("no lorag config: pass `config=PATH` (serve/config.yaml args) or set LORAG_CONFIG")
    return build_app(load_config(path))
