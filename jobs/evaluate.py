r"""Compare inpainting set-ups on rooms whose empty truth is known: quality, residual furniture, speed, cost.

python jobs/evaluate.py --config configs/evaluate.yaml --input s3://rooms/empty/ --output s3://evaluations/run-1/ \
    --set data.library=s3://rooms/mask-library/ --set setups.lora.inpaint.lora=s3://models/loras/lora-r8/lora

--input sets data.rooms (empty-room photos; the data.subset of the training split is evaluated),
--output the folder that receives scores.parquet, summary.parquet, summary.md, report.html and config.yaml.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/evaluate.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, EvaluateConfig, add_config_arguments, config_from_args
from casalimpia.evaluation import evaluate, prepare
from casalimpia.pipeline import JobError, connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, EvaluateConfig, input_key="data.rooms", output_key="output")
        plan = prepare(config)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"evaluating {plan.line()}")
    connect(config.ray.address)
    try:
        summary = evaluate(plan)
    except JobError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.table())
    output = summary.output.rstrip("/")
    print(f"done: {summary.examples} examples x {len(summary.rows)} set-ups in {summary.seconds:.1f}s")
    print(f"scores: {output}/scores.parquet  summary: {output}/summary.md  report: {output}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
