"""The data error every reader raises, and the path-containment check that raises it for unsafe annotation paths."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath


class OisaDataError(ValueError):
    """
    A problem with one piece of data: a malformed annotation, a missing or undecodable file, an unsafe path.

    `dataset`, `record` and `path` say where it happened (any may be unknown); the message names all that are known,
    so a log line alone is enough to find the faulty record.
    """

    def __init__(
        self,
        message: str,
        *,
        dataset: str | None = None,
        record: str | int | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.reason = message
        self.dataset = dataset
        self.record = None if record is None else str(record)
        self.path = None if path is None else str(path)
        super().__init__(self._format())

    def _format(self) -> str:
        where = [
            f"{label}: {value}"
            for label, value in (("dataset", self.dataset), ("record", self.record), ("file", self.path))
            if value is not None
        ]
        return f"{self.reason} [{', '.join(where)}]" if where else self.reason

    def __reduce__(self):
        # The keyword-only arguments would be lost by the default exception pickling (DataLoader workers pickle errors).
        return (_rebuild_error, (type(self), self.reason, self.dataset, self.record, self.path))


def _rebuild_error(
    cls: type[OisaDataError], message: str, dataset: str | None, record: str | None, path: str | None
) -> OisaDataError:
    return cls(message, dataset=dataset, record=record, path=path)


_SEPARATORS = re.compile(r"[\\/]")


def resolve_inside(
    root: Path,
    *parts: str,
    dataset: str | None = None,
    record: str | int | None = None,
) -> Path:
    """
    Join annotation-provided `parts` under `root`, refusing any part that could leave it.

    The check is lexical (no `..` component, not absolute, no drive, no NUL) and is done before anything is read.
    Symlinks inside the root are deliberately not resolved: datasets are often assembled from symlinked folders.
    """
    for part in parts:
        if not isinstance(part, str) or not part:
            raise OisaDataError(f"empty or non-string path component {part!r}", dataset=dataset, record=record)
        unsafe = (
            "\x00" in part
            or PurePosixPath(part).is_absolute()
            or bool(PureWindowsPath(part).anchor)
            or ".." in _SEPARATORS.split(part)
        )
        if unsafe:
            raise OisaDataError(
                f"annotation path {part!r} escapes the dataset root {str(root)!r}",
                dataset=dataset,
                record=record,
                path=part,
            )
    return root.joinpath(*parts)
