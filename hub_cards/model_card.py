"""
Model cards of this package's checkpoints, OISA's and EEMC's: the Jinja templates of `hub_cards/` rendered into a
`huggingface_hub.ModelCard`, with the results of an `eval.py` run (its `metrics.json`) written into the card's
`model-index` and its results section.

Only measured numbers go into `model-index`. huggingface_hub groups model-index entries by task, dataset, config and
split, not by source, so the paper's numbers for the same split would merge into one entry with ours; the OISA-1B
template quotes the paper's numbers in the card's text instead, labelled as the paper's.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

import oisa_hub_cards
from modeling_oisa import PROFILE_SWITCHES
from modeling_refavs import PROFILE_SWITCHES as REFAVS_PROFILE_SWITCHES
from oisa_evaluation.report import ROMAN, omniavs_table, refavs_table
from processing_oisa.prompts import EXPRESSION_TYPES


TEMPLATE_DIR = Path(oisa_hub_cards.__file__).resolve().parent
TEMPLATES = ("oisa-1b", "oisa-tiny-synthetic", "fine-tune", "refavs-eemc")
# the model type (config.json `model_type`) each shipped template describes
TEMPLATE_MODEL_TYPES = {
    "oisa-1b": "oisa",
    "oisa-tiny-synthetic": "oisa",
    "fine-tune": "oisa",
    "refavs-eemc": "refavs_eemc",
}
# each model type's behaviour switches with their `release` and `fixed` values
PROFILE_SWITCHES_BY_MODEL_TYPE = {"oisa": PROFILE_SWITCHES, "refavs_eemc": REFAVS_PROFILE_SWITCHES}
TASK_TYPE = "image-segmentation"
TASK_NAME = "Referring audio-visual segmentation"
REQUIRED_METADATA = ("license", "library_name", "pipeline_tag", "tags")

# (dataset id, pretty name) of the measured results, per metrics.json `dataset`
BENCHMARKS = {"omniavs": ("FudanCVL/OmniAVS", "OmniAVS"), "refavs": ("ref-avs", "Ref-AVS Bench")}
SYNTHETIC = {
    "omniavs": ("oisa-synthetic-omniavs", "Synthetic shapes, OmniAVS format (oisa make-synthetic)"),
    "refavs": ("oisa-synthetic-refavs", "Synthetic shapes, Ref-AVS format (oisa make-synthetic)"),
}
# templates of models that are evaluated on `oisa make-synthetic` data, not on the real benchmarks
SYNTHETIC_TEMPLATES = frozenset({"oisa-tiny-synthetic"})
REFAVS_GROUPS = (("Seen", "seen", "test_s"), ("Unseen", "unseen", "test_u"), ("Mix", "mix", "test_s+test_u"))


class ModelCardError(ValueError):
    """A card cannot be rendered or is not valid: unknown template, missing field, bad metrics file, bad metadata."""


def resolve_template(template: str | Path) -> Path:
    """The file of `template`: one of `TEMPLATES` (in `hub_cards/`) or the path of a template file."""
    if str(template) in TEMPLATES:
        path = TEMPLATE_DIR / f"{template}.md"
        if not path.is_file():
            raise ModelCardError(f"{path}: the template {template!r} is missing from this installation")
        return path
    path = Path(template)
    if path.is_file():
        return path
    raise ModelCardError(f"{template}: unknown card template; use one of {', '.join(TEMPLATES)} or a template file")


def load_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics of an `eval.py` run, read from its `metrics.json`."""
    path = Path(path)
    if not path.is_file():
        raise ModelCardError(f"{path}: no such metrics file (eval.py writes OUT/metrics.json)")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelCardError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(metrics, dict) or metrics.get("dataset") not in BENCHMARKS:
        raise ModelCardError(f"{path}: not an eval.py metrics.json (its 'dataset' must be one of {sorted(BENCHMARKS)})")
    return metrics


def parse_card_fields(items: Iterable[str]) -> dict[str, Any]:
    """Template fields from `NAME=VALUE` strings; VALUE is read as YAML, so `true`, `3` and `[a, b]` keep types."""
    fields: dict[str, Any] = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name.isidentifier():
            raise ModelCardError(f"card field {item!r} is not NAME=VALUE")
        try:
            fields[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ModelCardError(f"card field {name}: {value!r} is not a YAML value ({error})") from error
    return fields


def render_model_card(template: str | Path, metrics: Mapping[str, Any] | None = None, **fields: Any) -> ModelCard:
    """
    Renders `template` (a name of `TEMPLATES` or a file) with `fields` and, when given, the results of `metrics` (an
    eval.py metrics.json): in `model-index` as `EvalResult`s (in %: OmniAVS J&F, J and F overall and per expression
    type, METEOR; Ref-AVS Seen / Unseen / Mix J and F and Null S, official protocol) and as a table in the card's text.

    Every template needs `config` (the checkpoint's config.json as a dict) and `model_name` or `repo_id`; a template
    may need more (`license` for oisa-1b). `eval_date`, `eval_hardware`, `eval_split` and `eval_note` describe the run.
    """
    path = resolve_template(template)
    if not (fields.get("model_name") or fields.get("repo_id")):
        raise ModelCardError(f"{path}: a card needs the field model_name or repo_id")
    model_type = (fields.get("config") or {}).get("model_type", "oisa")
    described = TEMPLATE_MODEL_TYPES.get(str(template))
    if described is not None and model_type != described:
        raise ModelCardError(
            f"{path}: the template {template!r} describes {described} checkpoints, not {model_type!r} ones"
        )
    switches = PROFILE_SWITCHES_BY_MODEL_TYPE.get(model_type, PROFILE_SWITCHES)
    values: dict[str, Any] = {
        "package_version": _package_version(),
        "package_commit": _package_commit(),
        "profile_switches": switches,
        "eval_date": "not recorded",
        "eval_hardware": "not recorded",
        "eval_note": None,
        **fields,
    }
    values["model_name"] = values.get("model_name") or str(values["repo_id"]).split("/")[-1]
    values["repo_id"] = values.get("repo_id") or values["model_name"]
    results: list[EvalResult] = []
    values["results_table"] = None
    if metrics is not None:
        dataset = metrics.get("dataset")
        if dataset not in BENCHMARKS:
            raise ModelCardError(f"metrics of unknown dataset {dataset!r}; eval.py writes one of {sorted(BENCHMARKS)}")
        default_id, default_name = (SYNTHETIC if path.stem in SYNTHETIC_TEMPLATES else BENCHMARKS)[dataset]
        values.setdefault("eval_dataset_id", default_id)
        values.setdefault("eval_dataset_name", default_name)
        values.setdefault("eval_split", _default_split(metrics))
        results = eval_results_from_metrics(
            metrics, dataset_id=values["eval_dataset_id"], dataset_name=values["eval_dataset_name"],
            split=values["eval_split"],
        )
        table = omniavs_table if dataset == "omniavs" else refavs_table
        values["results_table"] = table(metrics, values["model_name"])
        values["evaluation"] = _run_summary(metrics, switches)
    try:
        card = ModelCard(_render(path, values))
    except (ValueError, yaml.YAMLError) as error:
        raise ModelCardError(f"{path}: the rendered front matter is not a YAML mapping ({error})") from error
    if results:
        card.data.model_name = values["model_name"]
        card.data.eval_results = results
    return card


def eval_results_from_metrics(
    metrics: Mapping[str, Any], *, dataset_id: str, dataset_name: str, split: str = "test"
) -> list[EvalResult]:
    """The `EvalResult`s of an eval.py metrics.json, values in % rounded to 0.01; `split` is OmniAVS's data split."""

    def result(config: str, data_split: str, metric_type: str, metric_name: str, value: float, **extra) -> EvalResult:
        return EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=config,
            dataset_split=data_split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(100 * float(value), 2),
            **extra,
        )

    results = []
    if metrics["dataset"] == "omniavs":
        segmentation = metrics.get("segmentation")
        if not segmentation:
            return []
        splits = segmentation["splits"]
        results += [
            result("all", split, "j_and_f", "J&F (All)", segmentation["J&F"]),
            result("all", split, "j", "J (All)", np.mean([values["J"] for values in splits.values()])),
            result("all", split, "f", "F (All)", np.mean([values["F"] for values in splits.values()])),
        ]
        meteor = (metrics.get("explanation") or {}).get("meteor_text_speech")
        if meteor is not None:
            results.append(result("all", split, "meteor", "METEOR (explanations, mean of I and II)", meteor))
        for roman, name in zip(ROMAN, EXPRESSION_TYPES):
            if name in splits:
                label = f"{roman} {name.replace('_', '+')}"
                for key, metric_type in (("J&F", "j_and_f"), ("J", "j"), ("F", "f")):
                    results.append(result(name, split, metric_type, f"{key} ({label})", splits[name][key]))
        return results
    official = metrics.get("official")
    if not official:
        return []
    for group, config, data_split in REFAVS_GROUPS:
        for key in ("J", "F"):
            value = official.get(group, {}).get(key)
            if value is not None:
                name = f"{key} ({group})"
                results.append(result(config, data_split, key.lower(), name, value, metric_config="official"))
    if official.get("Null", {}).get("S") is not None:
        name = "S (Null, lower is better)"
        results.append(result("null", "test_n", "s", name, official["Null"]["S"], metric_config="official"))
    return results


def check_model_card(card: ModelCard | str) -> dict[str, Any]:
    """
    Checks offline what matters of `ModelCard.validate` (which needs the Hub): the front matter is YAML with a license,
    `library_name: transformers`, a pipeline tag and the `custom_code` tag, and `model-index`, if any, round-trips
    through huggingface_hub's `EvalResult`s. Returns the front matter; raises `ModelCardError` listing the problems.
    """
    text = str(card)
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.DOTALL)
    if match is None:
        raise ModelCardError("the model card has no YAML front matter")
    try:
        front_matter = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ModelCardError(f"the model card's front matter is not valid YAML: {error}") from error
    if not isinstance(front_matter, dict):
        raise ModelCardError("the model card's front matter is not a YAML mapping")
    problems = [f"no {key!r}" for key in REQUIRED_METADATA if not front_matter.get(key)]
    if front_matter.get("library_name", "transformers") != "transformers":
        problems.append(f"library_name is {front_matter['library_name']!r}, not 'transformers'")
    if "custom_code" not in (front_matter.get("tags") or []):
        problems.append("the tags lack 'custom_code' (the checkpoint loads with trust_remote_code=True)")
    if "model-index" in front_matter:
        try:
            name, results = model_index_to_eval_results(front_matter["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"model-index does not parse ({error!r})")
        else:
            if eval_results_to_model_index(name, results) != front_matter["model-index"]:
                problems.append("model-index does not round-trip through huggingface_hub's EvalResult")
    if "{{" in text or "{%" in text:
        problems.append("it holds unrendered template markup")
    if problems:
        raise ModelCardError("invalid model card: " + "; ".join(problems))
    return front_matter


def _render(path: Path, values: Mapping[str, Any]) -> str:
    environment = jinja2.Environment(
        # includes are looked up beside the template first, then among the shipped partials
        loader=jinja2.FileSystemLoader([str(path.parent), str(TEMPLATE_DIR)]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.tests["hub_repo_id"] = _is_hub_repo_id
    environment.filters["tojson"] = _to_json
    try:
        return environment.get_template(path.name).render(**values)
    except jinja2.UndefinedError as error:
        raise ModelCardError(
            f"{path}: {error.message}; pass that field (render_model_card(..., NAME=VALUE) or --card-field NAME=VALUE)"
        ) from error
    except jinja2.TemplateError as error:
        raise ModelCardError(f"{path}: the template does not render ({error})") from error


def _to_json(value: Any) -> str:
    """
    A value as JSON, which is also a YAML scalar. Unlike Jinja's own `tojson` it reports a missing field as missing
    (not as a TypeError) and leaves `<`, `>`, `&` and `'` unescaped, as a card is not HTML.
    """
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    return json.dumps(value, ensure_ascii=False)


def _is_hub_repo_id(value: Any) -> bool:
    """Whether `value` names a Hub repo (owner/name) rather than a local folder, which a card cannot link to."""
    return (
        isinstance(value, str)
        and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None
        and not Path(value).exists()
    )


def _default_split(metrics: Mapping[str, Any]) -> str:
    if metrics["dataset"] == "refavs":
        return ", ".join(sorted((metrics.get("official") or {}).get("splits") or {}))
    return "test"


def _run_summary(metrics: Mapping[str, Any], switches: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    run = metrics.get("run", {})
    behaviour = run.get("behaviour", {})
    profile = next(
        (
            name
            for name in ("release", "fixed")
            if all(behaviour.get(switch) == values[name] for switch, values in switches.items())
        ),
        "custom",
    )
    return {
        "num_expressions": metrics.get("num_expressions", 0),
        "num_scored": metrics.get("num_scored", 0),
        "num_errors": metrics.get("num_errors", 0),
        "num_skipped": len(metrics.get("skipped_by_reader", [])),
        "profile": profile if behaviour else "not recorded",
        "max_new_tokens": run.get("max_new_tokens", "not recorded"),
        "batch_size": run.get("batch_size", "not recorded"),
    }


def _package_version() -> str:
    try:
        return metadata.version("oisa")
    except metadata.PackageNotFoundError:
        return "unknown"


def _package_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    try:
        completed = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            check=False, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"
