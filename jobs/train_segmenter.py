r"""Fine-tune the OneFormer segmenter on photos with label maps, on Ray Train.

python jobs/train_segmenter.py --config configs/train_segmenter.yaml --input s3://catalogue/segmentation/ \
    --output s3://models/segmenters/ --set name=oneformer-catalogue

--input sets data.dataset (a folder with images/ and labels/, see README), --output sets storage (the
run folder's parent). Starting a run with the same name and storage resumes it from its latest checkpoint.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/train_segmenter.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, SegmenterTrainConfig, add_config_arguments, config_from_args
from casalimpia.pipeline import JobError, connect
from casalimpia.training.segmenter import fit, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, SegmenterTrainConfig, input_key="data.dataset", output_key="storage")
        plan = prepare(config)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{'resuming' if plan.resuming else 'starting'} run {plan.run_uri}: {len(plan.train)} training and "
        f"{len(plan.validation)} validation examples, {config.epochs} epochs of {plan.steps_per_epoch} steps "
        f"on {config.ray.workers} worker(s), from {config.masking.model}"
    )
    connect(config.ray.address)
    summary = fit(plan)
    print(summary.table())
    best = f"{config.checkpoint_metric}={summary.best_score:.4f}"
    print(f"done in {summary.seconds:.1f}s; best epoch {summary.best_epoch} ({best})")
    print(f"segmenter: {summary.output_uri}  (use it with --set {summary.output_key}={summary.output_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
