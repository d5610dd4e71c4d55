#!/usr/bin/env bash
# Trains OISA-tiny-synthetic from scratch on CPU, evaluates it on held-out synthetic clips and installs it as the
# checkpoint that ships with the package (modeling_oisa/checkpoints/oisa-tiny-synthetic), card included.
#
#   bash examples/train_oisa_tiny_synthetic.sh [WORK_DIR]
#
# About 70 minutes on 2 CPU cores; WORK_DIR (default: tiny-synthetic-run) must not exist yet.
set -euo pipefail

WORK=${1:-tiny-synthetic-run}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST="$REPO/modeling_oisa/checkpoints/oisa-tiny-synthetic"
export HF_HUB_OFFLINE=1
TRAIN=(accelerate launch --cpu --num_processes 1 "$REPO/train.py" --cpu)

if [ -e "$WORK" ]; then
    echo "$WORK exists; give a new folder" >&2
    exit 2
fi

# the data: 3000 still images in the gRefCOCO layout (seed 12), 3000 still images with image-text conversations
# (seed 13, 4 questions each) and 600 clips in the OmniAVS layout (seed 11, 3 null expressions each), all for training
oisa make-synthetic "$WORK/data/images" --format grefcoco --videos 3000 --seed 12 --split train
oisa make-synthetic "$WORK/data/image_text" --format image_text --videos 3000 --seed 13 --split train \
    --nulls-per-video 4
oisa make-synthetic "$WORK/data/omniavs" --format omniavs --videos 600 --seed 11 --split train --nulls-per-video 3

# the untrained model (its LLM attention drawn wider than the default, see tiny.py)
oisa tiny-random "$WORK/init" --preset synthetic --seed 0

# part 1, twice: 1500 steps of 8 still images each; part 2: 1500 steps of still images and conversations; part 3:
# 1500 steps of conversations alone; part 4, twice: 3150 steps of 4 samples each, clips, still images and
# conversations mixed
IMAGES=(--data grefcoco="$WORK/data/images")
TEXT=(--data image_text="$WORK/data/image_text")
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic_images.json" --model "$WORK/init" \
    --output-dir "$WORK/images" "${IMAGES[@]}"
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic_images.json" --model "$WORK/images/final" \
    --output-dir "$WORK/images-2" "${IMAGES[@]}"
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic_reading.json" --model "$WORK/images-2/final" \
    --output-dir "$WORK/reading" "${IMAGES[@]}" "${TEXT[@]}"
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic_questions.json" --model "$WORK/reading/final" \
    --output-dir "$WORK/questions" "${TEXT[@]}"
CLIPS=(--data omniavs="$WORK/data/omniavs" "${IMAGES[@]}" "${TEXT[@]}")
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic.json" --model "$WORK/questions/final" \
    --output-dir "$WORK/clips" "${CLIPS[@]}"
"${TRAIN[@]}" --config "$REPO/configs/oisa_tiny_synthetic.json" --model "$WORK/clips/final" \
    --output-dir "$WORK/train" "${CLIPS[@]}"

# 40 held-out clips from another seed (2026); the card gets their numbers
oisa make-synthetic "$WORK/data/held-out" --format omniavs --videos 40 --seed 2026 --split test
accelerate launch --cpu --num_processes 1 "$REPO/eval.py" --model "$WORK/train/final" --dataset omniavs \
    --data-root "$WORK/data/held-out" --out "$WORK/eval" --card "$WORK/card" --card-template oisa-tiny-synthetic \
    --card-field repo_id=oisa-tiny-synthetic \
    --card-field training_data="oisa make-synthetic: 3000 still images (seed 12), 3000 image-text conversations\
 (seed 13) and 600 clips (seed 11)" \
    --card-field training="examples/train_oisa_tiny_synthetic.sh: configs/oisa_tiny_synthetic_images.json\
 (twice 1500 steps), oisa_tiny_synthetic_reading.json (1500), oisa_tiny_synthetic_questions.json (1500),\
 oisa_tiny_synthetic.json (twice 3150), on CPU"

# only a model that meets the targets is installed: J&F >= 0.8 overall and per type, null expressions answered
# "No target matches this expression." at least 90% of the time
python - "$WORK/eval" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
segmentation = json.loads((out / "metrics.json").read_text())["segmentation"]
lines = [json.loads(line) for path in sorted(out.glob("results-*.jsonl")) for line in path.read_text().splitlines()]
nulls = [line["answer"].startswith("No target matches this expression.") for line in lines if line["is_null"]]
scores = {name: split["J&F"] for name, split in segmentation["splits"].items()}
print(f"J&F {segmentation['J&F']:.3f}; per type {scores}; nulls answered {sum(nulls)}/{len(nulls)}")
if segmentation["J&F"] < 0.8 or min(scores.values()) < 0.8 or sum(nulls) < 0.9 * len(nulls):
    sys.exit("below the targets: not installed")
PY

# the shipped folder: weights, configs, processor and card; the code comes from the package (oisa push adds it)
rm -rf "$DEST"
mkdir -p "$DEST"
for file in config.json generation_config.json model.safetensors processor_config.json tokenizer.json \
    tokenizer_config.json chat_template.jinja; do
    cp "$WORK/train/final/$file" "$DEST/"
done
cp "$WORK/card/README.md" "$DEST/README.md"
echo "installed OISA-tiny-synthetic in $DEST"
