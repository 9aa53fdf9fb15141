"""Cut the furniture masks and margin rings of every photo under an input URI: the mask library for training.

python jobs/masks.py --config configs/masks.yaml --input s3://catalogue/furnished/ --output s3://models/mask-library/
"""

import argparse
import sys
from pathlib import Path

# `python jobs/masks.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, MaskLibraryConfig, add_config_arguments, config_from_args
from casalimpia.pipeline import DONE, JobError, connect
from casalimpia.progress import Interrupted
from casalimpia.training.library import execute, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo photos already done with the same config")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, MaskLibraryConfig, overwrite=True if args.overwrite else None)
        plan = prepare(config)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines()))
    connect(config.ray.address)
    try:
        summary = execute(plan)
    except Interrupted as interrupted:
        print(f"interrupted: {interrupted}; run the same command again to resume", file=sys.stderr)
        return interrupted.exit_code
    print(f"done: {summary.line()}")
    print(f"index: {config.output.rstrip('/')}/_manifest/")
    # Only a run where nothing is done, now or before, is a failure; failed photos are in the index.
    done = sum(summary.counts.get(status, 0) for status in DONE)
    return 1 if summary.counts.get("failed", 0) and not done else 0


if __name__ == "__main__":
    sys.exit(main())
