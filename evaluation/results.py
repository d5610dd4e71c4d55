"""
The files of an evaluation run: per-process JSON-lines results that survive interruption, the run's identity, and
atomic writes of the final reports.

Each process appends to its own `results-<rank>.jsonl` with one `os.write` per line followed by `fsync`. Rewriting a
file per line (write then rename) would cost O(n²) for n expressions, and one file per expression floods the
folder; with appends, an interruption can at worst cut the last line, which has no newline then: readers skip such a
trailing fragment and the owning process truncates it before appending again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

RESULTS_PATTERN = "results-*.jsonl"
RUN_FILE = "run.json"


def results_path(out_dir: Path, process_index: int) -> Path:
    """The results file of one process."""
    return out_dir / f"results-{process_index:03d}.jsonl"


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, syncs it, then renames it over `path`."""
    # one temporary name per process, so that concurrent writers never share one
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class ResultWriter:
    """Appends result dicts to one process's JSON-lines file, each line durable once `write` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_fragment()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _drop_fragment(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning(
                "%s ends with a cut line (an interrupted run); dropping its %d bytes", self.path, len(data) - keep
            )
            os.truncate(self.path, keep)

    def write(self, result: Mapping[str, Any]) -> None:
        data = (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """
    Every complete result line of every process's file, keyed by expression key. A trailing fragment is skipped; a
    malformed complete line, or one key in two lines, raises naming the file.
    """
    results: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for path in sorted(out_dir.glob(RESULTS_PATTERN)):
        data = path.read_bytes()
        lines = data.split(b"\n")
        # the last element is b"" after a final newline, else a line cut by an interruption
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
                key = result["key"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a result line ({error})") from error
            if key in results:
                raise ValueError(
                    f"expression {key!r} has results in {origin[key]} and {path}, line {number}; were two evaluations "
                    "run into one output folder at once?"
                )
            results[key] = result
            origin[key] = f"{path}, line {number}"
    return results


def claim_output(out_dir: Path, identity: Mapping[str, Any]) -> None:
    """Records what this run evaluates (model, dataset, behaviour), unless an earlier run already did."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / RUN_FILE).exists():
        write_atomic(out_dir / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def check_output(out_dir: Path, identity: Mapping[str, Any]) -> None:
    """Refuses to resume into a folder whose results come from another model, dataset or behaviour."""
    path = out_dir / RUN_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the run description ({error})") from error
    # through JSON, so that tuples compare equal to the lists they were written as
    identity = json.loads(json.dumps(identity))
    differences = sorted(name for name in set(recorded) | set(identity) if recorded.get(name) != identity.get(name))
    if differences:
        details = ", ".join(f"{name}: {recorded.get(name)!r} there, {identity.get(name)!r} now" for name in differences)
        raise ValueError(f"{path}: the results in {out_dir} come from another run ({details}); use another --out")
