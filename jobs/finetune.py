"""Train one LoRA adapter of a lorag config as a Ray Job (Ray Train + DeepSpeed).

Local:    python -m jobs.finetune --config examples/quickstart/lorag.yaml --adapter tidewell-support
Cluster:  ray job submit --working-dir . -- python -m jobs.finetune --config examples/quickstart/lorag.yaml --adapter tidewell-support
Override: python -m jobs.finetune --config F --adapter NAME --set adapters.NAME.train.max_steps=5
"""

import argparse

from lorag.cli import train_summary
from lorag.cluster import connect
from lorag.config import load_config
from lorag.train import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the lorag.yaml")
    parser.add_argument("--adapter", required=True, help="the adapter to train (a name under `adapters:`)")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. adapters.NAME.train.max_steps=5")
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    cfg.adapter(args.adapter)  # fail on a wrong name before Ray starts
    connect()
    result = train_adapter(cfg, args.adapter)
    print(train_summary(result.adapter, result.version, result.path, result.metrics))


if __name__ == "__main__":
    main()
