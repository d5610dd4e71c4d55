"""
The final numbers of an evaluation run from its result lines: `metrics.json` (every split, the errors, the skipped
records) and a markdown table shaped like the paper's (OmniAVS: All and I–VIII J&F with METEOR; Ref-AVS: Seen,
Unseen and Mix J and F, and Null S).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from processing_oisa.data.omniavs import EXPRESSION_TYPES
from processing_oisa.metrics.omniavs import OmniAVSExplanationMetric, OmniAVSMetric
from processing_oisa.metrics.refavs import RefAVSExpressionStats, RefAVSMetric

from .results import write_atomic
from .runner import EvalTasks


ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII")


def compute_metrics(tasks: EvalTasks, results: Mapping[str, Mapping[str, Any]], run: Mapping[str, Any]) -> dict:
    """
    The metrics of every task of `tasks` from its result line. Lines are taken in evaluation order, whatever process
    wrote them, so that the numbers do not depend on the sharding. Failed expressions are left out of the scores and
    counted, per split and in total, with their messages.
    """
    missing = [task.key for task in tasks.tasks if task.key not in results]
    if missing:
        raise RuntimeError(
            f"{len(missing)} expressions have no result (first: {missing[:3]}); run again to finish them"
        )
    lines = [results[task.key] for task in tasks.tasks]
    scored = [line for line in lines if line["status"] == "ok"]
    failed = [line for line in lines if line["status"] != "ok"]
    metrics: dict[str, Any] = {
        "dataset": tasks.dataset,
        "run": dict(run),
        "num_expressions": len(lines),
        "num_scored": len(scored),
        "num_errors": len(failed),
        "errors": [{"key": line["key"], "error": line.get("error", "")} for line in failed],
        "skipped_by_reader": list(tasks.skipped),
    }
    if tasks.dataset == "omniavs":
        metrics.update(_omniavs_metrics(scored, failed))
    else:
        metrics.update(_refavs_metrics(scored, failed))
    return metrics


def _omniavs_metrics(scored: Sequence[Mapping], failed: Sequence[Mapping]) -> dict:
    segmentation = None
    if scored:
        segmentation = OmniAVSMetric(keep_in_memory=True).compute(
            expression_id=[line["key"] for line in scored],
            split=[line["expr_type"] for line in scored],
            j=[line["j"] for line in scored],
            f=[line["f"] for line in scored],
        )
    explained = [line for line in scored if line["reference_explanation"]]
    explanation = None
    if explained:
        explanation = OmniAVSExplanationMetric(keep_in_memory=True).compute(
            expression_id=[line["key"] for line in explained],
            split=[line["expr_type"] for line in explained],
            prediction=[line["predicted_explanation"] for line in explained],
            reference=[line["reference_explanation"] for line in explained],
        )
    return {
        "segmentation": segmentation,
        "explanation": explanation,
        "errors_by_type": dict(Counter(line["expr_type"] for line in failed)),
    }


def _refavs_metrics(scored: Sequence[Mapping], failed: Sequence[Mapping]) -> dict:
    modes: dict[str, Any] = {"official": None, "per_expression": None}
    if scored:
        names = RefAVSExpressionStats.__dataclass_fields__
        columns = {name: [line["stats"][name] for line in scored] for name in names}
        for mode in modes:
            modes[mode] = RefAVSMetric(keep_in_memory=True).compute(mode=mode, **columns)
    return {**modes, "errors_by_split": dict(Counter(line["split"] for line in failed))}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _error_note(metrics: Mapping) -> str:
    note = f"{metrics['num_scored']} of {metrics['num_expressions']} expressions scored"
    if metrics["num_errors"]:
        note += f"; **{metrics['num_errors']} failed** and are left out of the scores (see `errors` in metrics.json)"
    if metrics["skipped_by_reader"]:
        note += f"; {len(metrics['skipped_by_reader'])} records skipped by the reader (`skipped_by_reader`)"
    return note + "."


def omniavs_table(metrics: Mapping, label: str) -> str:
    """Table 5 of the OmniAVS paper: J&F (%) overall and per expression type, and the explanation METEOR."""
    splits = (metrics["segmentation"] or {}).get("splits", {})
    explanation = metrics["explanation"]
    if explanation is None:
        meteor = "-"
    elif "meteor" in explanation["unavailable"]:
        meteor = "n/a"
    else:
        meteor = _percent(explanation["meteor_text_speech"])
    overall = (metrics["segmentation"] or {}).get("J&F")
    head = ["Model", "All", *ROMAN, "METEOR"]
    per_type = [_percent(splits.get(name, {}).get("J&F")) for name in EXPRESSION_TYPES]
    cells = [label, _percent(overall), *per_type, meteor]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1)), _row(cells), ""]
    detail_head = ["Type", "Expressions", "Errors", "J", "F", "J&F", "BLEU-4", "METEOR"]
    lines += [_row(detail_head), _row(["---"] + ["---:"] * (len(detail_head) - 1))]
    explained = (explanation or {}).get("splits", {})
    for roman, name in zip(ROMAN, EXPRESSION_TYPES):
        values = splits.get(name, {})
        errors = metrics["errors_by_type"].get(name, 0)
        if not values and not errors:
            continue
        lines.append(
            _row(
                [
                    f"{roman} {name}",
                    str(values.get("num_expressions", 0)),
                    str(errors),
                    _percent(values.get("J")),
                    _percent(values.get("F")),
                    _percent(values.get("J&F")),
                    _percent(explained.get(name, {}).get("bleu")),
                    _percent(explained.get(name, {}).get("meteor")),
                ]
            )
        )
    notes = ["", "J&F, J, F, BLEU-4 and METEOR in %; All is the mean of the types' J&F; METEOR the mean of I and II."]
    if explanation is not None and explanation["unavailable"]:
        notes.append("Unavailable: " + "; ".join(f"{k}: {v}" for k, v in explanation["unavailable"].items()) + ".")
    notes.append(_error_note(metrics))
    return "\n".join(lines + notes) + "\n"


def refavs_table(metrics: Mapping, label: str) -> str:
    """Table 6 of the OISA paper: Seen, Unseen and Mix J and F, and Null S (all ×100), per scoring mode."""
    head = ["Model", "Mode", "Seen J", "Seen F", "Unseen J", "Unseen F", "Mix J", "Mix F", "Null S"]
    lines = [_row(head), _row(["---", "---"] + ["---:"] * (len(head) - 2))]
    for mode in ("official", "per_expression"):
        values = metrics[mode] or {}
        cells = [label, mode.replace("_", "-")]
        for group in ("Seen", "Unseen", "Mix"):
            cells += [_percent(values.get(group, {}).get("J")), _percent(values.get(group, {}).get("F"))]
        cells.append(_percent(values.get("Null", {}).get("S")))
        lines.append(_row(cells))
    detail_head = ["Split", "Expressions", "Errors", "J", "F", "S"]
    lines += ["", _row(detail_head), _row(["---"] + ["---:"] * (len(detail_head) - 1))]
    splits = (metrics["official"] or {}).get("splits", {})
    for name in sorted(set(splits) | set(metrics["errors_by_split"])):
        values = splits.get(name, {})
        cells = [name, str(values.get("num_expressions", 0)), str(metrics["errors_by_split"].get(name, 0))]
        lines.append(_row(cells + [_percent(values.get(key)) for key in ("J", "F", "S")]))
    notes = [
        "",
        "Official mode: batches of 4 expressions in CSV order, at 256×256 (Ref-AVS `utility.py`); per-expression: "
        "each expression its own batch. J, F and S ×100; S lower is better; the split table is official mode.",
    ]
    if metrics["run"].get("inference"):
        notes.append(f"Predictions: {metrics['run']['inference']}")
    notes.append(_error_note(metrics))
    return "\n".join(lines + notes) + "\n"


def write_report(out_dir: Path, metrics: Mapping, label: str) -> str:
    """Writes metrics.json and results.md atomically and returns the markdown."""
    table = omniavs_table(metrics, label) if metrics["dataset"] == "omniavs" else refavs_table(metrics, label)
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "results.md", table)
    return table
