import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from modeling_oisa import OisaConfig, OisaForReferringSegmentation
from oisa_cli.main import main as oisa_main

from ..conftest import make_sample


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-oisa")
    assert oisa_main(["tiny-random", str(folder), "--seed", "3"]) == 0
    return folder


def _outputs(model, sample):
    with torch.no_grad():
        output = model(**{key: value for key, value in sample.items() if key != "labels"})
    return output.logits, output.mask_logits[0]


def test_tiny_random_writes_a_complete_checkpoint(tiny_checkpoint):
    names = {path.name for path in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    # remote code, so the folder also loads where the package is not installed
    assert {"configuration_oisa.py", "modeling_oisa.py", "mask_head.py", "vision_adapter.py"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "oisa"
    assert config["auto_map"]["AutoModel"] == "modeling_oisa.OisaForReferringSegmentation"
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for token, config_key in [("<IMG_CONTEXT>", "image_token_id"), ("<AUDIO_CONTEXT>", "audio_token_id"),
                              ("[SEG]", "seg_token_id"), ("<SUB_AUDIO_CONTEXT>", "sub_audio_token_id")]:
        assert tokenizer.convert_tokens_to_ids(token) == config[config_key]
    assert tokenizer.seg_token_id == config["seg_token_id"] and len(tokenizer) == config["text_config"]["vocab_size"]


def test_tiny_random_is_deterministic_under_its_seed(tiny_checkpoint, tmp_path):
    oisa_main(["tiny-random", str(tmp_path), "--seed", "3"])
    first, second = load_file(tiny_checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_automodel_loads_it_and_save_load_is_bit_exact(tiny_checkpoint, tmp_path):
    model = AutoModel.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    assert isinstance(model, OisaForReferringSegmentation)
    assert isinstance(AutoConfig.from_pretrained(tiny_checkpoint), OisaConfig)
    saved = load_file(tiny_checkpoint / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[key], state[key]) for key in saved)

    model.save_pretrained(tmp_path)
    reloaded = OisaForReferringSegmentation.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sample = make_sample()
    for before, after in zip(_outputs(model, sample), _outputs(reloaded, sample)):
        assert torch.equal(before, after)


def test_trust_remote_code_loads_without_the_package(tiny_checkpoint, tmp_path):
    """
    Where modeling_oisa, processing_oisa and oisa_kernels cannot be imported, the checkpoint's own code files load the
    model and the processor, and a processor call on frames, speech, sound, a referring image and a soundtrack, then a
    forward, give the installed package's logits and mask logits (stale copied code, or a fallback path that only the
    remote code takes, would not).
    """
    from processing_oisa import OisaExpression, OisaProcessor
    from processing_oisa.data.synthetic_clips import tone

    rng = np.random.default_rng(0)
    inputs = {
        "frames": rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8),
        "image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
        "speech": tone(300, 1.2),
        "sound": tone(660, 0.5),
        "soundtrack": tone(440, 2.0),
        # the mask head runs where masks supervise the `[SEG]` state: one per frame, at the frame processor's size
        "gt_masks": np.zeros((3, 224, 224), dtype=np.float32),
    }
    inputs["gt_masks"][[0, 2], 50:150, 40:120] = 1.0
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class BlockOisa(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("modeling_oisa", "processing_oisa", "oisa_kernels"):
                    raise ImportError(f"{name} is not installed here")
        sys.meta_path.insert(0, BlockOisa())
        import numpy as np
        import torch
        from transformers import AutoModel, AutoProcessor
        folder, inputs_path, out_path = sys.argv[1:]
        torch.set_num_threads(1)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert not {"modeling_oisa", "processing_oisa", "oisa_kernels"} & set(sys.modules)
        OisaExpression = sys.modules[type(processor).__module__].OisaExpression
        data = np.load(inputs_path)
        expression = OisaExpression(speech=data["speech"], sound=data["sound"], image=data["image"])
        encoding = processor(videos=list(data["frames"]), expression=expression, audio=data["soundtrack"],
                             answer="Sure, it is [SEG].")
        torch.manual_seed(0)  # the mask losses' point sampler
        with torch.no_grad():
            output = model(**encoding, gt_masks=torch.from_numpy(data["gt_masks"]))
        np.savez(out_path, input_ids=encoding["input_ids"].numpy(), logits=output.logits.numpy(),
                 mask_logits=output.mask_logits[0].numpy(), loss=output.loss.numpy())
        print(type(model).__name__, type(processor).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_checkpoint), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OisaForReferringSegmentation OisaProcessor" in result.stdout
    remote = np.load(tmp_path / "out.npz")

    model = OisaForReferringSegmentation.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    processor = OisaProcessor.from_pretrained(tiny_checkpoint)
    expression = OisaExpression(speech=inputs["speech"], sound=inputs["sound"], image=inputs["image"])
    encoding = processor(videos=list(inputs["frames"]), expression=expression, audio=inputs["soundtrack"],
                         answer="Sure, it is [SEG].")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            output = model(**encoding, gt_masks=torch.from_numpy(inputs["gt_masks"]))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(remote["input_ids"], encoding["input_ids"].numpy())
    assert output.mask_logits[0].shape == (3, 56, 56)
    # the installed package runs the compiled deformable-attention op, the remote code transformers' PyTorch one
    # (measured: logits equal, mask logits within 5e-7)
    np.testing.assert_allclose(remote["logits"], output.logits.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(remote["mask_logits"], output.mask_logits[0].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(remote["loss"], output.loss.numpy(), rtol=0, atol=1e-5)
