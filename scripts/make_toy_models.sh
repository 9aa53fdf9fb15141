#!/usr/bin/env bash
# Make the `toy` preset (casalimpia/data/toy) from scratch, with the project's own jobs on synthetic
# rooms, and measure it on held-out rooms. Seeded throughout: a rerun reproduces the shipped models'
# figures. On a 2-core CPU its steps took about 2 hours 15 minutes in all (README, "The toy world").
#   bash scripts/make_toy_models.sh
# Training rooms come from seeds below 1,000,000; the evaluation's rooms from 1,000,000 on, which no
# toy model ever sees.
set -euo pipefail
cd "$(dirname "$0")/.."
rooms=outputs/toy/rooms
rm -rf outputs/toy

# 1. Synthetic rooms: class maps for the segmenter (landscape, portrait, square), furnished/empty
#    pairs with exact masks for the painter and its LoRA, and held-out pairs for the evaluation.
python -m casalimpia.synthetic $rooms/segmentation --labels --count 1100 --seed 0 --size 128x96 >/dev/null
python -m casalimpia.synthetic $rooms/segmentation --labels --count 250 --seed 1100 --size 96x128 >/dev/null
python -m casalimpia.synthetic $rooms/segmentation --labels --count 150 --seed 1350 --size 112x112 >/dev/null
python -m casalimpia.synthetic $rooms/pairs --pairs --count 1000 --seed 2000 >/dev/null
python -m casalimpia.synthetic $rooms/held_out --pairs --count 200 --seed 1000000 >/dev/null

# 2. The segmenter on the furnished rooms; then the empty and cleared twins of 660 of them join its
#    rooms (rewriting those rooms byte for byte) for its second stage. The base painter (the whole
#    UNet), the mask library and the LoRA on the base.
python jobs/train_segmenter.py --config configs/toy/segmenter.yaml
python -m casalimpia.synthetic $rooms/segmentation --labels --twins --count 500 --seed 0 --size 128x96 >/dev/null
python -m casalimpia.synthetic $rooms/segmentation --labels --twins --count 100 --seed 1100 --size 96x128 >/dev/null
python -m casalimpia.synthetic $rooms/segmentation --labels --twins --count 60 --seed 1350 --size 112x112 >/dev/null
python jobs/train_segmenter.py --config configs/toy/segmenter_twins.yaml
python jobs/train.py --config configs/toy/painter.yaml
python jobs/masks.py --config configs/toy/masks.yaml
python jobs/train.py --config configs/toy/lora.yaml

# 3. Install them as the toy preset, then measure the installed models on the held-out rooms.
python -m casalimpia.toy install outputs/toy/runs/segmenter_twins/model outputs/toy/runs/painter/model \
    outputs/toy/runs/lora/lora
python jobs/evaluate.py --config configs/toy/evaluate.yaml
