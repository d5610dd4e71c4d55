"""
Publishing an OISA checkpoint to the Hugging Face Hub (`oisa push`, `train.py --push-to-hub`).

`prepare_upload_folder` writes everything the Hub repo needs into a new folder: weights, config, generation config,
processor files, every modelling and processing file the remote code imports (so that `trust_remote_code=True` works
where this package is not installed) and the model card. `upload_to_hub` then makes one `create_repo` and one
`upload_folder` call; `publish_checkpoint` does both, checking the folder's remote code in between.
"""

from __future__ import annotations

import filecmp
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard

from .model_card import check_model_card, load_metrics, render_model_card


logger = logging.getLogger(__name__)

PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PACKAGES = ("modeling_oisa", "processing_oisa", "oisa_kernels")
# a new upload must not leave the previous one's shards or code files beside its own
REPLACED_ON_UPLOAD = ("*.safetensors", "*.safetensors.index.json", "*.py")

_REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {packages!r}:
                raise ImportError(f"{{name}} is not installed here")

    sys.meta_path.insert(0, BlockPackages())
    from transformers import AutoConfig, AutoProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    get_class_from_dynamic_module(config.auto_map["AutoModel"], folder)
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    """
).format(packages=PACKAGES)


class PublishError(ValueError):
    """A checkpoint cannot be published: missing or incomplete model folder, non-empty upload folder, broken code."""


def checkpoint_card_fields(model_dir: str | os.PathLike[str], repo_id: str) -> dict[str, Any]:
    """The card fields a checkpoint folder gives: `repo_id`, `model_name`, `config` and `num_parameters`."""
    model_dir = Path(model_dir)
    config = _read_model_config(model_dir)
    return {
        "repo_id": repo_id,
        "model_name": repo_id.split("/")[-1],
        "config": config,
        "num_parameters": _num_parameters(model_dir, _weight_files(model_dir)),
    }


def prepare_upload_folder(
    model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], card: ModelCard
) -> list[str]:
    """
    Writes the Hub repo's files for the checkpoint in `model_dir` to `out_dir` (new or empty) and returns their names.

    Training leftovers (optimizer state, `trainer_state.json`, logs) stay behind. A checkpoint saved without its
    processor (`oisa convert` writes only the tokenizer) gets one built from its config and tokenizer. The code is
    this package's, as `save_pretrained` writes it, whatever code files the folder holds.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _read_model_config(model_dir)
    weights = _weight_files(model_dir)
    if not (model_dir / "generation_config.json").is_file():
        raise PublishError(f"{model_dir}: no generation_config.json (save the model with save_pretrained)")
    check_model_card(card)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir}: the upload folder must be new or empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    for name in ("config.json", "generation_config.json", *weights):
        _link_or_copy(model_dir / name, out_dir / name)
    if (model_dir / "processor_config.json").is_file() or (model_dir / "preprocessor_config.json").is_file():
        for name in PROCESSOR_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out_dir / name)
    else:
        _save_processor(model_dir, out_dir)
    _copy_remote_code(model_dir, out_dir)
    card.save(out_dir / "README.md")

    names = sorted(path.name for path in out_dir.iterdir())
    left_out = sorted(path.name for path in model_dir.iterdir() if path.name not in names)
    if left_out:
        logger.info("left out of the upload: %s", ", ".join(left_out))
    return names


def verify_remote_code(folder: str | os.PathLike[str]) -> None:
    """
    Loads the config, the model class and the processor of `folder` with `trust_remote_code=True` in a fresh
    interpreter where this package cannot be imported; raises `PublishError` with its output when that fails.
    """
    with tempfile.TemporaryDirectory(prefix="oisa-modules-") as modules:
        # a private module cache, so that neither a stale copy nor this check's copy outlives the check
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules}
        completed = subprocess.run(
            [sys.executable, "-c", _REMOTE_CODE_CHECK, str(Path(folder).resolve())],
            check=False, capture_output=True, text=True, env=env, cwd=modules, timeout=600,
        )
    if completed.returncode != 0:
        raise PublishError(
            f"{folder}: the remote code does not load without the oisa package:\n{completed.stderr[-3000:]}"
        )


def upload_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload OISA checkpoint",
) -> str:
    """Creates the model repo `repo_id` if needed and uploads `folder` to it in one commit; returns the commit's URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message,
        delete_patterns=list(REPLACED_ON_UPLOAD),
    )
    return commit.commit_url


def publish_checkpoint(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    template: str | os.PathLike[str] = "fine-tune",
    metrics_path: str | os.PathLike[str] | None = None,
    private: bool = False,
    token: str | None = None,
    **fields: Any,
) -> str:
    """
    Publishes the checkpoint in `model_dir` as `repo_id` with a card from `template`, holding the results of
    `metrics_path` (an eval.py metrics.json) when given; `fields` are more template fields. Returns the commit's URL.
    """
    card_fields = checkpoint_card_fields(model_dir, repo_id)
    metrics = None
    if metrics_path is not None:
        metrics = load_metrics(metrics_path)
        card_fields["eval_date"] = date.fromtimestamp(Path(metrics_path).stat().st_mtime).isoformat()
    card = render_model_card(template, metrics, **{**card_fields, **fields})
    with tempfile.TemporaryDirectory(prefix="oisa-upload-") as temporary:
        folder = Path(temporary) / "upload"
        prepare_upload_folder(model_dir, folder, card)
        verify_remote_code(folder)
        url = upload_to_hub(folder, repo_id, private=private, token=token)
    logger.info("published %s to %s: %s", model_dir, repo_id, url)
    return url


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no such model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise PublishError(
                f"{model_dir}: holds a LoRA adapter (adapter_config.json), not a model; publish the merged model "
                "(train.py --merge)"
            )
        raise PublishError(f"{model_dir}: no config.json, so not a saved model")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PublishError(f"{path}: not valid JSON ({error})") from error
    if config.get("model_type") != "oisa":
        hint = "; convert it with `oisa convert` first" if config.get("model_type") == "internvl_chat" else ""
        raise PublishError(f"{path}: model_type is {config.get('model_type')!r}, not 'oisa'{hint}")
    if "AutoModel" not in config.get("auto_map", {}):
        raise PublishError(f"{path}: no auto_map.AutoModel, so trust_remote_code cannot find the model's code")
    return config


def _weight_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as error:
            raise PublishError(f"{index}: not a safetensors index ({error!r})") from error
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            raise PublishError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return [index.name, *shards]
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise PublishError(f"{model_dir}: no model.safetensors (nor a sharded model.safetensors.index.json)")


def _num_parameters(model_dir: Path, weight_files: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(model_dir / name, framework="pt") as weights:
                total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118 (a safe_open handle is not a mapping)
    return total


def _link_or_copy(source: Path, target: Path) -> None:
    # weights can be gigabytes: a hard link costs no space where source and target share a file system
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _save_processor(model_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    from modeling_oisa import OisaConfig
    from processing_oisa.processing_oisa import OisaProcessor

    if not (model_dir / "tokenizer_config.json").is_file():
        raise PublishError(f"{model_dir}: no processor_config.json and no tokenizer to build a processor from")
    config = OisaConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # from_pretrained records how it was called among the kwargs that save_pretrained writes back
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    OisaProcessor.from_model_config(config, tokenizer).save_pretrained(out_dir)
    logger.info("%s has no processor files: built them from its config and tokenizer", model_dir)


def _copy_remote_code(model_dir: Path, out_dir: Path) -> None:
    """
    Writes into `out_dir` the module of each class its auto_map entries name and, transitively, their relative imports,
    with transformers' `custom_object_save` (as `save_pretrained` does): the code is this package's.
    """
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_oisa import OisaConfig, OisaForReferringSegmentation
    from processing_oisa import OisaProcessor

    classes = {
        f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}": cls
        for cls in (OisaConfig, OisaForReferringSegmentation, OisaProcessor)
    }
    written: set[Path] = set()
    for reference in sorted(_auto_map_references(out_dir)):
        if reference not in classes:
            raise PublishError(
                f"the auto_map names {reference}, which is not a class of the oisa package "
                f"({', '.join(sorted(classes))}), so its code cannot be uploaded"
            )
        written.update(custom_object_save(classes[reference], out_dir))
    for path in sorted(written):
        own = model_dir / path.name
        if own.is_file() and not filecmp.cmp(own, path, shallow=False):
            logger.warning("%s differs from the oisa package's copy, which the upload carries", own)


def _auto_map_references(folder: Path) -> set[str]:
    """The `module.Class` references of the auto_map in each JSON file of `folder`."""
    references: set[str] = set()
    for path in sorted(folder.glob("*.json")):
        try:
            auto_map = json.loads(path.read_text()).get("auto_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise PublishError(f"{path}: not a JSON object ({error})") from error
        for entry in auto_map.values():
            # a tokenizer's entry is a [slow, fast] pair; "owner/repo--module.Class" is another repo's code
            references.update(ref for ref in (entry if isinstance(entry, list) else [entry]) if ref and "--" not in ref)
    return references
