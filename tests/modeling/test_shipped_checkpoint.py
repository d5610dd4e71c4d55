"""
OISA-tiny-synthetic as shipped: its files, its targets on held-out clips used for nothing else, a regression check on
the clips it was selected on, and the demo.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_oisa import tiny_synthetic_path
from oisa_cli.main import main as oisa_main
from processing_oisa.metrics.omniavs import OmniAVSMetric
from processing_oisa.prompts import EXPRESSION_TYPES, NULL_ANSWER


REPO = Path(__file__).resolve().parents[2]
SHIPPED_FILES = [
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def shipped() -> Path:
    # the repository ships the checkpoint: its absence is a failure, not a skip
    return tiny_synthetic_path()


def test_the_shipped_folder_holds_weights_configs_processor_and_card(shipped):
    assert sorted(path.name for path in shipped.iterdir()) == SHIPPED_FILES
    assert (shipped / "model.safetensors").stat().st_size <= 25 * 2**20


def evaluate_held_out(seed: int, workspace: Path) -> list[dict]:
    """The per-expression results of the shipped model on 40 held-out clips of `seed`, on one thread as measured."""
    data, out = workspace / f"held-out-{seed}", workspace / f"eval-{seed}"
    held_out = ["--format", "omniavs", "--videos", "40", "--seed", str(seed), "--split", "test"]
    assert oisa_main(["make-synthetic", str(data), *held_out]) == 0
    command = [sys.executable, str(REPO / "eval.py"), "--model", "oisa-tiny-synthetic", "--dataset", "omniavs",
               "--dtype", "float32"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--data-root", str(data), "--out", str(out)], check=True, timeout=1200, env=environment)
    results = [json.loads(line) for path in out.glob("results-*.jsonl") for line in path.read_text().splitlines()]
    assert len(results) == 400 and not any(result.get("error") for result in results)
    return [{**result, "key": f"seed{seed}/{result['key']}"} for result in results]


def segmentation_scores(results: list[dict]) -> dict:
    return OmniAVSMetric(keep_in_memory=True).compute(
        expression_id=[result["key"] for result in results],
        split=[result["expr_type"] for result in results],
        j=[result["j"] for result in results],
        f=[result["f"] for result in results],
    )


def null_answers(results: list[dict]) -> list[bool]:
    return [result["answer"].startswith(NULL_ANSWER) for result in results if result["is_null"]]


@pytest.mark.slow
def test_the_shipped_model_meets_its_targets_on_held_out_clips_used_for_nothing_else(shipped, tmp_path):
    # the recipe trained on clips of seeds 11, 17 and 23 and checked itself on seed 2026; candidate models were
    # compared on seeds 7, 31, 53, 97, 101 and 211; seeds 5, 13 and 89 were made after the model was installed and
    # have served nothing but this measure (the model card's history): 120 clips, 1200 expressions pooled
    results = [result for seed in (5, 13, 89) for result in evaluate_held_out(seed, tmp_path)]
    segmentation = segmentation_scores(results)
    assert set(segmentation["splits"]) == set(EXPRESSION_TYPES)
    assert segmentation["J&F"] >= 0.8
    for expression_type, scores in segmentation["splits"].items():
        assert scores["J&F"] >= 0.8, expression_type
    nulls = null_answers(results)
    assert len(nulls) == 360
    assert sum(nulls) >= 0.9 * len(nulls)


@pytest.mark.slow
def test_regression_on_a_selection_seed(shipped, tmp_path):
    """
    Not a held-out measure: seed 31 was one of the sets the shipped model was chosen on. Its numbers as installed
    (J&F 0.939, speech 0.828, 115 of 120 nulls answered null) must not move by more than a few expressions' worth.
    """
    results = evaluate_held_out(31, tmp_path)
    segmentation = segmentation_scores(results)
    assert segmentation["J&F"] == pytest.approx(0.939, abs=0.005)
    assert segmentation["splits"]["speech"]["J&F"] == pytest.approx(0.828, abs=0.02)
    assert 112 <= sum(null_answers(results)) <= 118


@pytest.mark.slow
def test_the_demo_finds_its_targets_with_the_shipped_model(shipped, tmp_path):
    out = tmp_path / "demo"
    assert oisa_main(["demo", "--out", str(out)]) == 0
    entries = {entry["expression"]: entry for entry in json.loads((out / "result.json").read_text())["expressions"]}
    # the written, sounding and pictured targets are found and the null expression is answered null (the demo's
    # spoken name of a present object, the type the model fails most, is answered null: the model card)
    found = ["text: the red circle", "text: the shape that is making a sound"]
    found += ["text + sound: the shape making the sound <audio>", "text + image: the shape that looks like <image>"]
    for name in found:
        assert entries[name]["answer"].startswith("Sure") and entries[name]["J&F"] > 0.9, name
    null = entries["text, null: the purple diamond"]
    assert null["answer"] == NULL_ANSWER and null["J&F"] == 1.0
