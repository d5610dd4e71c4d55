"""
Publishing a checkpoint of this package, OISA or EEMC (`modeling_refavs`), to the Hugging Face Hub (`oisa push`,
`train.py --push-to-hub`).

`prepare_upload_folder` writes everything the Hub repo needs into a new folder: weights, config, generation config
(OISA), processor files, every modelling and processing file the remote code imports (so that `trust_remote_code=True`
works where this package is not installed) and the model card. `upload_to_hub` then makes one `create_repo` and one
`upload_folder` call; `publish_checkpoint` does both, checking the folder's remote code in between.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
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
PACKAGES = ("modeling_oisa", "modeling_refavs", "processing_oisa", "oisa_kernels")
# a new upload must not leave the previous one's shards or code files beside its own
REPLACED_ON_UPLOAD = ("*.safetensors", "*.safetensors.index.json", "*.py")
# the released EEMC file (modeling_refavs.pretrained.ORIGINAL_CHECKPOINT_NAME), refused with a hint to convert it
ORIGINAL_EEMC_CHECKPOINT = "ckpt_best_miou.pth"

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

    folder, with_processor = sys.argv[1], sys.argv[2] == "processor"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    get_class_from_dynamic_module(config.auto_map["AutoModel"], folder)
    if with_processor:
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    """
).format(packages=PACKAGES)


class PublishError(ValueError):
    """A checkpoint cannot be published: missing or incomplete model folder, non-empty upload folder, broken code."""


@dataclass(frozen=True)
class ModelFamily:
    """What an upload of one model family needs."""

    name: str
    default_template: str
    # auto_map entries the upload's config.json and processor_config.json get where the checkpoint has none
    auto_maps: dict[str, dict[str, str]]
    needs_generation_config: bool


FAMILIES = {
    "oisa": ModelFamily("OISA", "fine-tune", {}, True),
    # EEMC's classes are not registered for remote code, so a saved checkpoint has no auto_map
    "refavs_eemc": ModelFamily(
        "EEMC",
        "refavs-eemc",
        {
            "config.json": {
                "AutoConfig": "configuration_refavs.RefAvsConfig",
                "AutoModel": "modeling_refavs.RefAvsForReferringSegmentation",
            },
            "processor_config.json": {"AutoProcessor": "processing_refavs.RefAvsProcessor"},
        },
        False,
    ),
}


def checkpoint_card_fields(model_dir: str | os.PathLike[str], repo_id: str) -> dict[str, Any]:
    """
    The card fields a checkpoint folder gives: `repo_id`, `model_name`, `config`, `num_parameters` and
    `with_processor`.
    """
    model_dir = Path(model_dir)
    config = _read_model_config(model_dir)
    return {
        "repo_id": repo_id,
        "model_name": repo_id.split("/")[-1],
        "config": config,
        "num_parameters": _num_parameters(model_dir, _weight_files(model_dir)),
        # whether the upload will hold a processor: saved with the model, or built from its tokenizer
        "with_processor": any((model_dir / name).is_file() for name in PROCESSOR_FILES),
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
    family = FAMILIES[_read_model_config(model_dir)["model_type"]]
    weights = _weight_files(model_dir)
    has_generation_config = (model_dir / "generation_config.json").is_file()
    if family.needs_generation_config and not has_generation_config:
        raise PublishError(f"{model_dir}: no generation_config.json (save the model with save_pretrained)")
    check_model_card(card)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir}: the upload folder must be new or empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    for name in ("config.json", *(["generation_config.json"] if has_generation_config else []), *weights):
        _link_or_copy(model_dir / name, out_dir / name)
    if (model_dir / "processor_config.json").is_file() or (model_dir / "preprocessor_config.json").is_file():
        for name in PROCESSOR_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out_dir / name)
    elif family is FAMILIES["oisa"]:
        _save_processor(model_dir, out_dir)
    else:
        _save_refavs_processor(model_dir, out_dir)
    _add_auto_maps(out_dir, family)
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
    folder = Path(folder)
    with_processor = (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()
    with tempfile.TemporaryDirectory(prefix="oisa-modules-") as modules:
        # a private module cache, so that neither a stale copy nor this check's copy outlives the check
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules}
        completed = subprocess.run(
            [sys.executable, "-c", _REMOTE_CODE_CHECK, str(folder.resolve()), "processor" if with_processor else "-"],
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
    commit_message: str = "Upload checkpoint",
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
    template: str | os.PathLike[str] | None = None,
    metrics_path: str | os.PathLike[str] | None = None,
    private: bool = False,
    token: str | None = None,
    **fields: Any,
) -> str:
    """
    Publishes the checkpoint in `model_dir` as `repo_id` with a card from `template` (by default the model family's:
    fine-tune for OISA, refavs-eemc for EEMC), holding the results of `metrics_path` (an eval.py metrics.json) when
    given; `fields` are more template fields. Returns the commit's URL.
    """
    card_fields = checkpoint_card_fields(model_dir, repo_id)
    family = FAMILIES[card_fields["config"]["model_type"]]
    template = family.default_template if template is None else template
    metrics = None
    if metrics_path is not None:
        metrics = load_metrics(metrics_path)
        card_fields["eval_date"] = date.fromtimestamp(Path(metrics_path).stat().st_mtime).isoformat()
    card = render_model_card(template, metrics, **{**card_fields, **fields})
    with tempfile.TemporaryDirectory(prefix="oisa-upload-") as temporary:
        folder = Path(temporary) / "upload"
        prepare_upload_folder(model_dir, folder, card)
        verify_remote_code(folder)
        url = upload_to_hub(
            folder, repo_id, private=private, token=token, commit_message=f"Upload {family.name} checkpoint"
        )
    logger.info("published %s to %s: %s", model_dir, repo_id, url)
    return url


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no such model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        if (model_dir / ORIGINAL_EEMC_CHECKPOINT).is_file():
            raise PublishError(
                f"{model_dir}: holds an original EEMC checkpoint ({ORIGINAL_EEMC_CHECKPOINT}); convert it with "
                "`oisa convert` first"
            )
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
    if config.get("model_type") not in FAMILIES:
        hint = "; convert it with `oisa convert` first" if config.get("model_type") == "internvl_chat" else ""
        raise PublishError(
            f"{path}: model_type is {config.get('model_type')!r}, not one of {', '.join(map(repr, FAMILIES))}{hint}"
        )
    family = FAMILIES[config["model_type"]]
    if "AutoModel" not in {**family.auto_maps.get("config.json", {}), **config.get("auto_map", {})}:
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


def _save_refavs_processor(model_dir: Path, out_dir: Path) -> None:
    """EEMC's processor from the folder's config and tokenizer; without a tokenizer the upload holds the model only."""
    if not (model_dir / "tokenizer_config.json").is_file():
        logger.warning("%s has no processor and no tokenizer: the upload holds the model only", model_dir)
        return
    from transformers import AutoTokenizer

    from modeling_refavs import RefAvsConfig
    from processing_oisa.refavs_eemc import RefAvsProcessor

    config = RefAvsConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    RefAvsProcessor.from_model_config(config, tokenizer).save_pretrained(out_dir)
    logger.info("%s has no processor files: built them from its config and tokenizer", model_dir)


def _add_auto_maps(out_dir: Path, family: ModelFamily) -> None:
    """Gives the upload's config files the family's auto_map entries they lack (EEMC's checkpoints have none)."""
    for name, entries in family.auto_maps.items():
        path = out_dir / name
        if not path.is_file():
            continue
        values = json.loads(path.read_text())
        auto_map = values.setdefault("auto_map", {})
        if all(auto_map.get(key) == value for key, value in entries.items()):
            continue
        for key, value in entries.items():
            auto_map.setdefault(key, value)
        path.unlink()  # a hard link to the checkpoint's file: replace it, do not write through it
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _package_classes() -> dict[str, type]:
    """The classes an auto_map may name, as `module.Class`: OISA's and, where installed, EEMC's."""
    from modeling_oisa import OisaConfig, OisaForReferringSegmentation
    from modeling_refavs import RefAvsConfig, RefAvsForReferringSegmentation
    from processing_oisa import OisaProcessor

    classes = [OisaConfig, OisaForReferringSegmentation, OisaProcessor, RefAvsConfig, RefAvsForReferringSegmentation]
    try:
        from processing_oisa.refavs_eemc import RefAvsProcessor
    except ImportError:
        pass
    else:
        classes.append(RefAvsProcessor)
    return {f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}": cls for cls in classes}


def _copy_remote_code(model_dir: Path, out_dir: Path) -> None:
    """
    Writes into `out_dir` the module of each class its auto_map entries name and, transitively, the package's modules
    they import (see [`write_remote_code`]): the code is this package's.
    """
    classes = _package_classes()
    references = sorted(_auto_map_references(out_dir))
    for reference in references:
        if reference not in classes:
            raise PublishError(
                f"the auto_map names {reference}, which is not a class of the oisa package "
                f"({', '.join(sorted(classes))}), so its code cannot be uploaded"
            )
    written = write_remote_code([classes[reference] for reference in references], out_dir)
    for path, source in sorted(written.items()):
        own = model_dir / path.name
        if own.is_file() and own.read_text() not in (path.read_text(), source.read_text()):
            logger.warning("%s differs from the oisa package's copy, which the upload carries", own)


def write_remote_code(classes: Iterable[type], out_dir: Path) -> dict[Path, Path]:
    """
    Writes into `out_dir`, side by side as the Hub's remote code needs them, the module of each class and, transitively,
    every module of this package it imports; returns {written file: its source file}. As transformers'
    `custom_object_save`, it follows the relative imports (`from .x import y`). Beyond it, an import of a module in
    another folder of the package (EEMC's model imports `modeling_oisa.deformable_attention`, its processor
    `..media`) is rewritten to a relative one and that module written too; an absolute import inside a try block stays
    as it is (the optional ones: the compiled kernels, the converters).
    """
    queue = [cls.__module__ for cls in classes]
    written: dict[str, str] = {}  # file name -> module
    sources: dict[Path, Path] = {}
    while queue:
        module = queue.pop(0)
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise PublishError(f"the remote code imports {module}, which is not installed")
        source = Path(spec.origin)
        if source.name == "__init__.py":
            raise PublishError(f"the remote code imports the package {module}; import its module instead")
        if source.name in written:
            if written[source.name] != module:
                raise PublishError(
                    f"the remote code needs two modules named {source.name} ({written[source.name]}, {module}), "
                    "which cannot lie side by side"
                )
            continue
        written[source.name] = module
        text, imported = _flatten_imports(source, module)
        (out_dir / source.name).write_text(text)
        sources[out_dir / source.name] = source
        queue.extend(imported)
    return sources


def _flatten_imports(path: Path, module: str) -> tuple[str, list[str]]:
    """The source of `module` with its imports of other folders made relative, and every package module it imports."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    package = module.rpartition(".")[0]
    optional = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
    lines = text.splitlines(keepends=True)
    imported, rewrites = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if not node.module:
                raise PublishError(f"{path}:{node.lineno}: `from {'.' * node.level} import ...`; import a module")
            target = importlib.util.resolve_name("." * node.level + node.module, package)
            if node.level == 1 and "." not in node.module:
                imported.append(target)
                continue
        elif node.module and node.module.split(".")[0] in PACKAGES and id(node) not in optional:
            target = node.module
        else:
            continue
        imported.append(target)
        names = ", ".join(alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
        indent = lines[node.lineno - 1][: node.col_offset]
        rewrites.append((node.lineno, node.end_lineno, f"{indent}from .{target.rsplit('.', 1)[-1]} import {names}\n"))
    for first, last, replacement in sorted(rewrites, reverse=True):
        lines[first - 1 : last] = [replacement]
    return "".join(lines), imported


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
