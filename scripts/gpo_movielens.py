"""Measure GPO on held-out MovieLens users (docs/gpo.md): meta-train, evaluate, print the tables as Markdown.

    python scripts/gpo_movielens.py runs/gpo-movielens            # train (about 8 min on 2 CPU cores), evaluate
    python scripts/gpo_movielens.py runs/gpo-movielens --evaluate  # evaluate an existing run again

The same as `prospect gpo train --data movielens-users --model smollm2 -o DIR` then `prospect gpo evaluate DIR`
with every default, callable before the command is wired into the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from prospect.cli import quiet_libraries
from prospect.online.gpo import GPOEvalConfig, GPOTrainConfig, run_evaluate, run_train
from prospect.online.gpo_data import result_tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="the run directory")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate an existing run")
    args = parser.parse_args()
    quiet_libraries()
    if not args.evaluate:
        run_train(GPOTrainConfig(), args.run)
    print(result_tables(run_evaluate(args.run, GPOEvalConfig()), markdown=True))


if __name__ == "__main__":
    main()
