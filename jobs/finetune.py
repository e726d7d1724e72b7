"""Train the LoRA adapters of a lorag config as a Ray Job (Ray Train + DeepSpeed): all of them, or --adapter ones.

Local:    python -m jobs.finetune --config examples/quickstart/lorag.yaml
Cluster:  ray job submit --working-dir . -- python -m jobs.finetune --config examples/quickstart/lorag.yaml --adapter tidewell-support
          (or: lorag submit train -c examples/quickstart/lorag.yaml --address http://HOST:8265)
Override: python -m jobs.finetune --config F --adapter NAME --set adapters.NAME.train.max_steps=5
"""

from jobs import check_names, job_parser, parse_config
from lorag.cluster import connect
from lorag.errors import run_job
from lorag.train import train_adapter, train_summary


def main() -> None:
    parser = job_parser(__doc__, "adapters.NAME.train.max_steps=5")
    parser.add_argument("--adapter", action="append", help="only this adapter (a name under `adapters:`; repeatable; default: all)")
    args, cfg = parse_config(parser)
    names = args.adapter or [a.name for a in cfg.adapters]
    if not names:
        parser.error(f"{args.config} defines no adapters")
    check_names(parser, cfg.adapter, names)
    connect()
    for name in names:
        result = train_adapter(cfg, name)
        print(train_summary(result.adapter, result.version, result.path, result.metrics), flush=True)


if __name__ == "__main__":
    run_job(main)  # a config or setup mistake is one line, not a traceback
