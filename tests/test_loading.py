import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from modeling_oisa import OisaConfig, OisaForReferringSegmentation
from processing_oisa.cli import main as oisa_main

from .conftest import make_sample


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


def test_trust_remote_code_loads_without_the_package(tiny_checkpoint):
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class BlockOisa(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("modeling_oisa", "processing_oisa"):
                    raise ImportError("the oisa package is not installed here")
        sys.meta_path.insert(0, BlockOisa())
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tiny_checkpoint)!r}, trust_remote_code=True, dtype=torch.float32)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "modeling_oisa" not in sys.modules
        ids = torch.tensor([[10, 11, 12]])
        print(type(model).__name__, tuple(model(input_ids=ids).logits.shape))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OisaForReferringSegmentation (1, 3, 400)" in result.stdout
