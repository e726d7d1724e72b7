"""Build the knowledge bases of a lorag config as a Ray Job.

Local:    python -m jobs.ingest --config examples/quickstart/lorag.yaml
Cluster:  ray job submit --working-dir . -- python -m jobs.ingest --config examples/quickstart/lorag.yaml
          (or: lorag submit ingest -c examples/quickstart/lorag.yaml --address http://HOST:8265)
Override: python -m jobs.ingest --config F --kb tidewell-handbook --set knowledge_bases.0.top_k=4
"""

from jobs import check_names, job_parser, parse_config
from lorag.cluster import connect
from lorag.data import ingest
from lorag.errors import run_job


def main() -> None:
    parser = job_parser(__doc__, "knowledge_bases.0.top_k=4")
    parser.add_argument("--kb", action="append", help="only this knowledge base (repeatable; default: all)")
    args, cfg = parse_config(parser)
    check_names(parser, cfg.knowledge_base, args.kb)
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
