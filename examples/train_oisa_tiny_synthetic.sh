#!/usr/bin/env bash
# Trains OISA-tiny-synthetic from scratch on CPU, evaluates it on held-out synthetic clips and installs it as the
# checkpoint that ships with the package (modeling_oisa/checkpoints/oisa-tiny-synthetic), card included.
#
#   bash examples/train_oisa_tiny_synthetic.sh [WORK_DIR]
#
# About 3 hours on 2 CPU cores. Stopped part-way, the same command with the same WORK_DIR (default:
# tiny-synthetic-run) goes on where it stopped: finished data and parts are kept, a part in progress resumes from its
# last checkpoint (train.py --resume). A WORK_DIR started by another version of the script or its configs is refused.
set -euo pipefail

WORK=${1:-tiny-synthetic-run}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST="$REPO/modeling_oisa/checkpoints/oisa-tiny-synthetic"
export HF_HUB_OFFLINE=1
TRAIN=(accelerate launch --cpu --num_processes 1 "$REPO/train.py" --cpu --resume)

# a WORK_DIR is resumed only by the recipe that started it (this script and its configs, unchanged): data and parts
# kept from another recipe would be reused under the same names
RECIPE=$(cd "$REPO" && sha256sum examples/train_oisa_tiny_synthetic.sh configs/oisa_tiny_synthetic*.json)
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
    if [ ! -f "$WORK/RECIPE" ] || [ "$(cat "$WORK/RECIPE")" != "$RECIPE" ]; then
        echo "$WORK holds the files of another recipe (its RECIPE stamp is missing or differs from this script and" \
            "its configs); give a new WORK_DIR" >&2
        exit 2
    fi
fi
mkdir -p "$WORK/data"
echo "$RECIPE" > "$WORK/RECIPE"

# make_data NAME ARGS...: `oisa make-synthetic ARGS` into WORK/data/NAME, unless it is there already
make_data() {
    local name=$1
    shift
    if [ ! -e "$WORK/data/$name" ]; then
        rm -rf "$WORK/data/.$name.partial"
        oisa make-synthetic "$WORK/data/.$name.partial" "$@"
        mv "$WORK/data/.$name.partial" "$WORK/data/$name"
    fi
}

# train_part PART CONFIG MODEL ARGS...: train.py into WORK/PART, unless it has finished (its final model written)
train_part() {
    local part=$1 config=$2 model=$3
    shift 3
    if [ ! -e "$WORK/$part/final/trainer_state.json" ]; then
        "${TRAIN[@]}" --config "$REPO/configs/$config" --model "$model" --output-dir "$WORK/$part" "$@"
    fi
}

# the data, all for training: still images in the gRefCOCO layout, 3000 with half of them in one colour (seed 14) and
# 3000 of three colours (seed 12); 3000 still images with image-text conversations, half in one colour (seed 15, 4
# questions each); 3000 audio-text clips (seed 16); 600 clips in the OmniAVS layout with 3 null expressions each (seed
# 11) and 600 with 6 (seed 17)
make_data images --format grefcoco --videos 3000 --seed 14 --split train --single-colour-rate 0.5
make_data images-3c --format grefcoco --videos 3000 --seed 12 --split train
make_data image_text --format image_text --videos 3000 --seed 15 --split train --nulls-per-video 4 \
    --single-colour-rate 0.5
make_data audio_text --format audio_text --videos 3000 --seed 16 --split train
make_data omniavs --format omniavs --videos 600 --seed 11 --split train --nulls-per-video 3
make_data omniavs-nulls --format omniavs --videos 600 --seed 17 --split train --nulls-per-video 6

# the untrained model (its LLM attention drawn wider than the default, see tiny.py)
if [ ! -e "$WORK/init/model.safetensors" ]; then
    oisa tiny-random "$WORK/init" --preset synthetic --seed 0
fi

# part 1: 1500 steps of 8 still images each; part 2: 1500 steps of still images and conversations; part 3: 1500 steps
# of conversations alone; part 4, four times, 4 samples a step, clips, still images, conversations and audio-text
# clips mixed: 3900 steps, then 3900 with the three-colour still images, then twice 4350 with the clips of 6 null
# expressions
IMAGES=(--data grefcoco="$WORK/data/images")
TEXT=(--data image_text="$WORK/data/image_text")
AUDIO=(--data audio_text="$WORK/data/audio_text")
train_part images oisa_tiny_synthetic_images.json "$WORK/init" "${IMAGES[@]}"
train_part reading oisa_tiny_synthetic_reading.json "$WORK/images/final" "${IMAGES[@]}" "${TEXT[@]}"
train_part questions oisa_tiny_synthetic_questions.json "$WORK/reading/final" "${TEXT[@]}"
train_part clips oisa_tiny_synthetic.json "$WORK/questions/final" \
    --data omniavs="$WORK/data/omniavs" "${IMAGES[@]}" "${TEXT[@]}" "${AUDIO[@]}"
IMAGES=(--data grefcoco="$WORK/data/images-3c")
train_part colours oisa_tiny_synthetic.json "$WORK/clips/final" \
    --data omniavs="$WORK/data/omniavs" "${IMAGES[@]}" "${TEXT[@]}" "${AUDIO[@]}"
NULLS=(--data omniavs="$WORK/data/omniavs-nulls" "${IMAGES[@]}" "${TEXT[@]}" "${AUDIO[@]}")
train_part nulls oisa_tiny_synthetic.json "$WORK/colours/final" "${NULLS[@]}"
train_part train oisa_tiny_synthetic.json "$WORK/nulls/final" "${NULLS[@]}"

# 40 held-out clips from another seed (2026); the card gets their numbers
make_data held-out --format omniavs --videos 40 --seed 2026 --split test
rm -rf "$WORK/eval" "$WORK/card"
accelerate launch --cpu --num_processes 1 "$REPO/eval.py" --model "$WORK/train/final" --dataset omniavs \
    --data-root "$WORK/data/held-out" --out "$WORK/eval" --card "$WORK/card" --card-template oisa-tiny-synthetic \
    --card-field repo_id=oisa-tiny-synthetic \
    --card-field training_data="oisa make-synthetic: 6000 still images (seeds 14 and 12), 3000 image-text\
 conversations (seed 15), 3000 audio-text clips (seed 16) and 1200 clips (seeds 11 and 17)" \
    --card-field training="examples/train_oisa_tiny_synthetic.sh: configs/oisa_tiny_synthetic_images.json\
 (1500 steps), oisa_tiny_synthetic_reading.json (1500), oisa_tiny_synthetic_questions.json (1500),\
 oisa_tiny_synthetic.json (3900, 3900, 4350 and 4350), on CPU"

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
