r"""Search the LoRA training hyperparameters with Ray Tune: every trial a full training run, ASHA early stopping.

python jobs/tune.py --config configs/tune.yaml --input s3://rooms/empty/ --output s3://models/sweeps/ \
    --set train.data.library=s3://rooms/mask-library/

--input sets train.data.rooms, --output sets train.storage (the sweep folder's parent). Starting a
sweep with the same name and storage resumes it: finished trials are kept, the others continue.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/tune.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, TuneConfig, add_config_arguments, config_from_args
from casalimpia.pipeline import JobError, connect
from casalimpia.tuning import prepare, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, TuneConfig, input_key="train.data.rooms", output_key="train.storage")
        plan = prepare(config)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    searched = ", ".join(config.search_space())
    print(
        f"{'resuming' if plan.resuming else 'starting'} sweep {plan.sweep_uri}: {config.samples} sample(s) of "
        f"{searched}; {config.scheduler} on {config.metric} ({config.mode}), {config.train.epochs} epochs per trial"
    )
    connect(config.train.ray.address)
    try:
        summary = run(plan)
    except JobError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary.interrupted:
        print(f"interrupted after {summary.seconds:.1f}s: run the same command again to resume {summary.sweep_uri}")
        return 130
    print(summary.table())
    print(f"done in {summary.seconds:.1f}s; results: {summary.sweep_uri}/results.parquet")
    if summary.best is None:
        print("no trial reported a finite metric: see the errors above", file=sys.stderr)
        return 1
    print(f"best trial {summary.best['trial']}: {config.metric}={summary.best['best']:.4f}")
    print(f"its LoRA: {summary.best['lora']}  best config: {summary.best_config_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
