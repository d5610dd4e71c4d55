"""train.py's own decisions before the loop: a machine without a GPU trains as with --cpu (float32, no workers)."""

import runpy
from pathlib import Path
from unittest import mock

import torch


REPO = Path(__file__).resolve().parents[2]


def run_main(*arguments: str, cuda: bool) -> dict:
    script = runpy.run_path(str(REPO / "train.py"))
    with mock.patch.object(torch.cuda, "is_available", return_value=cuda), mock.patch.dict(
        script["main"].__globals__, {"train": mock.Mock(return_value=Path("final"))}
    ) as namespace:
        script["main"](["--config", str(REPO / "configs" / "stage4_omniavs.json"), "--model", "oisa-tiny-synthetic",
                        "--output-dir", "o",
                        *arguments])
        return namespace["train"].call_args.kwargs


def test_without_a_gpu_it_trains_as_with_cpu(caplog):
    assert run_main(cuda=False)["cpu"] is True
    assert "no GPU here: training on the CPU in float32" in caplog.text


def test_with_a_gpu_the_stage_settings_stay():
    assert run_main(cuda=True)["cpu"] is False
    assert run_main("--cpu", cuda=True)["cpu"] is True


def test_a_missing_model_is_one_line_and_exit_code_2(caplog):
    script = runpy.run_path(str(REPO / "train.py"))
    arguments = ["--config", str(REPO / "configs" / "stage4_omniavs.json"), "--output-dir", "o"]
    assert script["main"]([*arguments, "--model", "no/such/model/folder"]) == 2
    assert "train.py: no/such/model/folder: no such model folder" in caplog.text
