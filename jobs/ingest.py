"""Build the knowledge bases of a lorag config as a Ray Job.

Local:    python -m jobs.ingest --config examples/quickstart/lorag.yaml
Cluster:  ray job submit --working-dir . -- python -m jobs.ingest --config examples/quickstart/lorag.yaml
          (or: lorag submit ingest -c examples/quickstart/lorag.yaml --address http://HOST:8265)
Override: python -m jobs.ingest --config F --kb tidewell-handbook --set knowledge_bases.0.top_k=4
"""

import argparse

from lorag.cluster import connect
from lorag.config import load_config
from lorag.errors import run_job
from lorag.data import ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the lorag.yaml")
    parser.add_argument("--kb", action="append", help="only this knowledge base (repeatable; default: all)")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. knowledge_bases.0.top_k=4")
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    connect()
    for name in args.kb or [kb.name for kb in cfg.knowledge_bases]:
        r = ingest(cfg, name, progress=lambda chunks, done, total, name=name: print(f"{name}: {chunks} chunks written ({done}/{total} documents)", flush=True))
        if r.rebuilt:
            print(f"rebuilt {name} from scratch: {r.rebuilt}")
        for path, reason in r.failed:
            print(f"skipped {path}: {reason}")
        print(
            f"{r.knowledge_base}: {r.documents} documents ({r.skipped} unchanged, {len(r.failed)} failed), "
            f"{r.chunks_written} chunks upserted, {r.chunks_removed} stale removed, {r.entities} in {r.uri} ({r.seconds:.1f} s)"
        )


if __name__ == "__main__":
    run_job(main)  # a config or setup mistake is one line, not a traceback
