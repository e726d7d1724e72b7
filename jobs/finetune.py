"""Train the LoRA adapters of a lorag config as a Ray Job (Ray Train + DeepSpeed): all of them, or --adapter ones.

Local:    python -m jobs.finetune --config examples/quickstart/lorag.yaml
Cluster:  ray job submit --working-dir . -- python -m jobs.finetune --config examples/quickstart/lorag.yaml --adapter tidewell-support
          (or: lorag submit train -c examples/quickstart/lorag.yaml --address http://HOST:8265)
Override: python -m jobs.finetune --config F --adapter NAME --set adapters.NAME.train.max_steps=5
"""

import argparse

from lorag.cli import train_summary
from lorag.cluster import connect
from lorag.config import load_config
from lorag.errors import run_job
from lorag.train import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the lorag.yaml")
    parser.add_argument("--adapter", action="append", help="only this adapter (a name under `adapters:`; repeatable; default: all)")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. adapters.NAME.train.max_steps=5")
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    names = args.adapter or [a.name for a in cfg.adapters]
    if not names:
        parser.error(f"{args.config} defines no adapters")
    for name in names:  # fail on a wrong name before Ray starts
        try:
            cfg.adapter(name)
        except KeyError as e:
            parser.error(e.args[0])
    connect()
    for name in names:
        result = train_adapter(cfg, name)
        print(train_summary(result.adapter, result.version, result.path, result.metrics), flush=True)


if __name__ == "__main__":
    run_job(main)  # a config or setup mistake is one line, not a traceback
