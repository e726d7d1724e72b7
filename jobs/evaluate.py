"""LoRA, RAG or both, as a Ray Job: answer an evaluation set with every variant and write the report.

Local:    python -m jobs.evaluate --config examples/quickstart/lorag.yaml --dataset examples/quickstart/eval.jsonl
Cluster:  lorag submit eval -c F -d D   (or: ray job submit --working-dir . -- python -m jobs.evaluate --config F --dataset D)
JSON answers: --response-format examples/quickstart/answer_schema.json (a response_format or a bare JSON schema).
The report is printed, so it is in the job's logs; its files go to --out (default <workdir>/eval, a
local directory of the node the job runs on) and into each compared adapter's version in the
adapter store (`<store>/<name>/v<N>/eval/<timestamp>/`), which every node reaches.
"""

import sys
import tempfile
from pathlib import Path

from jobs import job_parser, parse_config
from lorag.errors import run_job
from lorag.evaluation import evaluate
from lorag.report import report_markdown, store_reports, write_report
from lorag.storage import is_uri


def main() -> None:
    parser = job_parser(__doc__, "serve.max_batch_size=16")
    parser.add_argument("--dataset", required=True, help="the JSONL evaluation set")
    parser.add_argument("--adapter", action="append", help="only this adapter, name or name@vN (repeatable; default: every trained one)")
    parser.add_argument("--out", default=None, help="where eval.json, eval.md and eval.png go (default: <workdir>/eval)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer in tokens")
    parser.add_argument("--response-format", default=None, help="a JSON file, an OpenAI response_format or a bare JSON schema, that every answer follows")
    args, cfg = parse_config(parser)
    try:
        result = evaluate(cfg, args.dataset, args.adapter, args.max_tokens, response_format=args.response_format,
                          progress=lambda done, total: print(f"{done}/{total} answers", flush=True) if done % 20 == 0 or done == total else None)
    except (FileNotFoundError, ValueError) as e:  # a bad dataset, adapter or response format: one line, as `lorag eval` says it
        sys.exit(f"error: {e}")
    print(report_markdown(result))  # so the report is also in the job's logs (`lorag jobs logs ID`)
    with tempfile.TemporaryDirectory() as tmp:  # a URI workdir: the files still reach the adapter store
        out = args.out or (Path(cfg.workdir) / "eval" if not is_uri(cfg.workdir) else tmp)
        written = write_report(result, out)
        if out != tmp:
            print("written: " + ", ".join(map(str, written)))
        for location in store_reports(cfg, result, written):
            print(f"stored with the adapter: {location}")


if __name__ == "__main__":
    run_job(main)  # a config or setup mistake is one line, not a traceback
