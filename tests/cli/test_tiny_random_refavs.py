"""
`oisa tiny-random --family refavs`: a tiny EEMC with random weights and its processor, which AutoModel and AutoProcessor
load offline and which runs end to end on what the processor makes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import modeling_refavs  # noqa: F401  (registers the model)
import processing_oisa  # noqa: F401  (registers the processor)
from modeling_oisa import OisaCheckpointError, OisaForReferringSegmentation, resolve_model_name
from modeling_refavs import RefAvsForReferringSegmentation
from oisa_cli.main import main as oisa_main
from processing_oisa.media import write_video
from processing_oisa.refavs_eemc import RefAvsProcessor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refavs") / "tiny"
    assert oisa_main(["tiny-random", "--family", "refavs", str(folder)]) == 0
    return folder


def tone(seconds: float, frequency: float) -> np.ndarray:
    time = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def test_auto_classes_load_it_and_it_runs_on_the_processors_output(checkpoint, tmp_path):
    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert isinstance(model, RefAvsForReferringSegmentation) and isinstance(processor, RefAvsProcessor)
    assert model.config.audio_config is not None and model.config.profile == "release"
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    image_size = model.config.mask2former_config.backbone_config.image_size
    assert processor.image_processor.size.height == image_size and processor.mask_size == model.config.mask_size

    # a video file with its soundtrack (3 s at 5 fps: 3 frames taken) and frames in memory with a waveform
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    write_video(path, rng.integers(0, 256, (15, 48, 64, 3), dtype=np.uint8), 5.0, audio=tone(3.0, 440.0))
    masks = np.zeros((3, 40, 56), dtype=bool)
    masks[:, 8:30, 10:40] = True
    inputs = processor(
        videos=[path, rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)],
        text=["The sounding object.", "the dog on the left"],
        audio=[None, tone(3.0, 300.0)],
        masks=[masks, masks],
    )
    with torch.no_grad():
        outputs = model(**inputs)
    size = model.config.mask_size
    assert outputs.logits.shape == (2, 3, size, size) and torch.isfinite(outputs.logits).all()
    assert outputs.logits.std() > 0 and torch.isfinite(outputs.loss)
    per_video = processor.post_process_masks(outputs, [(48, 64), (40, 56)])
    assert [tuple(video.shape) for video in per_video] == [(3, 48, 64), (3, 40, 56)]
    # the log-mel examples go through the model's VGGish: the same as giving its features
    with torch.no_grad():
        audio_features = model.encode_audio(inputs.pop("audio_input_features"))
        assert audio_features.shape == (2, 3, model.config.audio_feature_dim)
        assert torch.equal(model(**inputs, audio_features=audio_features).logits, outputs.logits)


def test_entry_points_accept_the_folder_and_oisa_refuses_it(checkpoint, tmp_path):
    assert resolve_model_name(str(checkpoint)) == str(checkpoint)
    with pytest.raises(OisaCheckpointError, match=r"model_type 'refavs_eemc' is not OISA \(expected one of oisa, "):
        OisaForReferringSegmentation.from_pretrained(checkpoint)
    with pytest.raises(OisaCheckpointError, match=r"model_type 'refavs_eemc' is not OISA \("):
        resolve_model_name(str(checkpoint), model_types=("oisa",))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(OisaCheckpointError, match="model_type 'bert' is not OISA or EEMC"):
        resolve_model_name(str(bert))


def test_seed_and_profile(checkpoint, tmp_path):
    assert oisa_main(["tiny-random", "--family", "refavs", "--profile", "fixed", str(tmp_path / "fixed")]) == 0
    config = json.loads((tmp_path / "fixed" / "config.json").read_text())
    assert config["profile"] == "fixed" and config["integration_attention_over"] == "tokens"
    assert oisa_main(["tiny-random", "--family", "refavs", "--seed", "1", str(tmp_path / "seed1")]) == 0
    weights, other = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "seed1" / "model.safetensors")
    assert weights.keys() == other.keys()
    assert not all(torch.equal(weights[key], other[key]) for key in weights)


def test_options_of_the_other_family_are_refused(tmp_path, caplog):
    assert oisa_main(["tiny-random", "--family", "refavs", "--preset", "synthetic", str(tmp_path / "a")]) == 2
    assert "--preset sizes a tiny OISA" in caplog.text
    assert oisa_main(["tiny-random", "--profile", "fixed", str(tmp_path / "b")]) == 2
    assert "--profile applies to a tiny EEMC" in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
