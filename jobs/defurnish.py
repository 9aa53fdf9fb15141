"""Remove the furniture from every photo under an input URI.

python jobs/defurnish.py --config configs/defurnish.yaml --input s3://catalogue/raw/ --output s3://catalogue/empty/
python jobs/defurnish.py --config configs/defurnish.yaml --input s3://catalogue/raw/ --output s3://catalogue/empty/ \\
    --dry-run
"""

import argparse
import sys
from pathlib import Path

# `python jobs/defurnish.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, DefurnishConfig, add_config_arguments, config_from_args
from casalimpia.estimate import estimate_lines, read_rates
from casalimpia.pipeline import DONE, JobError, connect, execute, prepare
from casalimpia.progress import Interrupted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo photos already done with the same config")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list and plan, print what the run would do and cost, and stop: no Ray, nothing written",
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, DefurnishConfig, overwrite=True if args.overwrite else None)
        plan = prepare(config, dry_run=args.dry_run)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines() + estimate_lines(plan.config.inpaint, len(plan.todo), read_rates())))
    if args.dry_run:
        print("dry run: nothing started, nothing written")
        return 0
    connect(config.ray.address)
    try:
        summary = execute(plan)
    except Interrupted as interrupted:
        print(f"interrupted: {interrupted}; run the same command again to resume", file=sys.stderr)
        return interrupted.exit_code
    print(f"done: {summary.line()}")
    print(f"manifest: {config.output.rstrip('/')}/_manifest/  report: {config.output.rstrip('/')}/report.html")
    # Only a run where nothing is done, now or before, is a failure; failed photos are in the manifest.
    done = sum(summary.counts.get(status, 0) for status in DONE)
    return 1 if summary.counts.get("failed", 0) and not done else 0


if __name__ == "__main__":
    sys.exit(main())
