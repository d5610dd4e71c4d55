"""Reader of Ref-AVS Bench: `metadata.csv` rows as records, media folders from the uid, null rows from the uid."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import OisaDataError, resolve_inside


DATASET_NAME = "refavs"
SPLITS = ("train", "val", "test_s", "test_u", "test_n")
# metadata.csv also holds rows whose split column is literally the word "TODO" (a value of the released file, not a
# marker of unfinished work); no protocol uses them, so they are accepted and left out of every split.
UNUSED_SPLITS = ("TODO",)
COLUMNS = ("vid", "uid", "split", "fid", "exp")
_FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def folder_from_uid(uid: str) -> str:
    """The media / mask folder of a row: `uid` minus its `_<class>_<k>` tail (a null folder for null rows)."""
    return uid.rsplit("_", 2)[0]


def is_null_uid(uid: str) -> bool:
    """Null rows are recognised from the uid (B20: a missing mask folder is not a reliable signal)."""
    return uid.startswith("null")


def _frame_index(path: Path) -> int:
    return int(path.stem)


@dataclass(frozen=True)
class RefAVSRecord:
    """One Ref-AVS expression (one CSV row); media are located from `folder` and read on demand."""

    row: int
    uid: str
    vid: str
    folder: str
    fid: int
    split: str
    text: str
    is_null: bool
    root: Path = field(repr=False, compare=False)

    @property
    def media_dir(self) -> Path:
        return self.root / "media" / self.folder

    @property
    def audio_path(self) -> Path:
        return self.media_dir / "audio.wav"

    @property
    def mask_dir(self) -> Path:
        return self.root / "gt_mask" / self.folder / f"fid_{self.fid}"

    @property
    def record_id(self) -> str:
        return f"row {self.row} ({self.uid})"

    def _error(self, message: str, path: Path) -> OisaDataError:
        return OisaDataError(message, dataset=DATASET_NAME, record=self.record_id, path=path)

    def frame_paths(self) -> tuple[Path, ...]:
        """The frames of `media/<folder>/frames/`, ordered by their numeric stem (not lexicographically)."""
        frames_dir = self.media_dir / "frames"
        try:
            candidates = [
                p for p in frames_dir.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES and not p.name.startswith(".")
            ]
        except OSError as error:
            raise self._error(f"cannot list frames: {error}", frames_dir) from error
        if not candidates:
            raise self._error("no frames", frames_dir)
        bad = [p.name for p in candidates if not (p.stem.isascii() and p.stem.isdigit())]
        if bad:
            raise self._error(f"frame names are not numbers: {sorted(bad)[:3]}", frames_dir)
        return tuple(sorted(candidates, key=_frame_index))

    def mask_paths(self) -> tuple[Path, ...] | None:
        """One `fid_<fid>/{t:05d}.png` per frame; None for a null row without a mask folder."""
        return self._mask_paths(self.frame_paths())

    def _mask_paths(self, frames: Sequence[Path]) -> tuple[Path, ...] | None:
        if self.is_null and not self.mask_dir.is_dir():
            return None
        return tuple(self.mask_dir / f"{_frame_index(frame):05d}.png" for frame in frames)

    def gt_masks(self) -> np.ndarray:
        """Bool GT [T, H, W] (PNG > 0, as the official loader); zeros for a null row without masks."""
        frames = self.frame_paths()
        mask_paths = self._mask_paths(frames)
        if mask_paths is None:
            try:
                with Image.open(frames[0]) as image:
                    width, height = image.size
            except (OSError, ValueError) as error:
                raise self._error(f"cannot read image: {error}", frames[0]) from error
            return np.zeros((len(frames), height, width), dtype=bool)
        masks = [self._read_mask(path) for path in mask_paths]
        if len({mask.shape for mask in masks}) != 1:
            raise self._error("masks of one expression differ in size", self.mask_dir)
        return np.stack(masks)

    def _read_mask(self, path: Path) -> np.ndarray:
        # Gray conversion then "> 0", like the official cv2 path: palette or RGB masks count by colour, not index.
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("L")) > 0
        except (OSError, ValueError) as error:
            raise self._error(f"cannot read mask: {error}", path) from error


class RefAVSReader(Sequence[RefAVSRecord]):
    """
    The rows of one split of `<root>/metadata.csv`, in CSV order (the order the official evaluation batches them).

    Parsing needs only the CSV. `check_files=True` also checks each row's frames, audio and masks when the reader
    is built (masks may be absent only for null rows). Problems raise `OisaDataError`; with `skip_bad=True` they are
    appended to `skipped` as (record id, error) and the row is dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.metadata_path = self.root / "metadata.csv"
        self.skipped: list[tuple[str, OisaDataError]] = []
        self._checked_media: dict[tuple[str, int, bool], tuple[str, Path] | None] = {}
        self._records = self._read_records()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __iter__(self) -> Iterator[RefAVSRecord]:
        return iter(self._records)

    def _error(self, message: str, record: str | None, path: Path | None = None) -> OisaDataError:
        return OisaDataError(message, dataset=DATASET_NAME, record=record, path=path or self.metadata_path)

    def _read_records(self) -> list[RefAVSRecord]:
        try:
            handle = open(self.metadata_path, encoding="utf-8", newline="")
        except OSError as error:
            raise self._error(f"cannot open metadata: {error}", None) from error
        records: list[RefAVSRecord] = []
        with handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(header) != COLUMNS:
                raise self._error(f"header must be {','.join(COLUMNS)}, got {header}", "header")
            for row, fields in enumerate(reader):
                record_id = f"row {row}"
                try:
                    record = self._parse_row(row, fields, record_id)
                    if record is None:
                        continue
                    record_id = record.record_id
                    if self.check_files:
                        self._check_media(record)
                    records.append(record)
                except OisaDataError as error:
                    if not self.skip_bad:
                        raise
                    self.skipped.append((record_id, error))
        return records

    def _parse_row(self, row: int, fields: list[str], record_id: str) -> RefAVSRecord | None:
        if len(fields) != len(COLUMNS):
            raise self._error(f"expected {len(COLUMNS)} columns, got {len(fields)}", record_id)
        vid, uid, split, fid, text = fields
        if split not in SPLITS and split not in UNUSED_SPLITS:
            raise self._error(f"unknown split {split!r}", record_id)
        if split != self.split:
            return None
        if uid.count("_") < 2:
            raise self._error(f"uid {uid!r} is not <folder>_<class>_<k>", record_id)
        if not fid.isdigit():
            raise self._error(f"fid {fid!r} is not a non-negative integer", record_id)
        folder = folder_from_uid(uid)
        resolve_inside(self.root, "media", folder, dataset=DATASET_NAME, record=record_id)
        return RefAVSRecord(
            row=row,
            uid=uid,
            vid=vid,
            folder=folder,
            fid=int(fid),
            split=split,
            text=text,
            is_null=is_null_uid(uid),
            root=self.root,
        )

    def _check_media(self, record: RefAVSRecord) -> None:
        # Many rows share a folder and an object; check each (folder, fid) once.
        key = (record.folder, record.fid, record.is_null)
        if key not in self._checked_media:
            self._checked_media[key] = self._media_problem(record)
        problem = self._checked_media[key]
        if problem is not None:
            raise self._error(problem[0], record.record_id, problem[1])

    @staticmethod
    def _media_problem(record: RefAVSRecord) -> tuple[str, Path] | None:
        try:
            frames = record.frame_paths()
            masks = record._mask_paths(frames)
        except OisaDataError as error:
            return error.reason, Path(error.path or record.media_dir)
        if not record.audio_path.is_file():
            return "missing file", record.audio_path
        if masks is None:
            return None
        if not record.mask_dir.is_dir():
            return "missing mask folder", record.mask_dir
        for frame, mask in zip(frames, masks):
            if not mask.is_file():
                return f"missing mask of frame {frame.name}", mask
        return None
