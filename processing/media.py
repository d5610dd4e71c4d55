"""Decoding of videos, frame folders, images and audio with PyAV and PIL, audio resampled to 16 kHz with soxr."""

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soxr
from PIL import Image, UnidentifiedImageError


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}  # channels of a waveform `write_video` encodes


class OisaInputError(ValueError):
    """A media file or an expression that cannot be used; the message names the file and the problem."""


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise OisaInputError(f"{what} {path} does not exist.")
    return path


def _open_container(path: Path, what: str) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise OisaInputError(f"{what} {path} is not a readable media file ({error}).") from error


def decode_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE, what: str = "Audio file") -> np.ndarray:
    """
    The first audio stream of any file PyAV reads (wav, flac, mp3, ogg, mp4, mkv...) as float32 mono at
    `sampling_rate`: channels are averaged, then resampled by [`resample_audio`], as the original's
    `librosa.load(path, sr=16000)` does.
    """
    path = _require_file(path, what)
    container = _open_container(path, what)
    with container:
        if not container.streams.audio:
            raise OisaInputError(f"{what} {path} has no audio stream.")
        stream = container.streams.audio[0]
        # planar float at the stream's own rate and layout, whatever the codec's sample format
        converter = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                for converted in converter.resample(frame):
                    chunks.append(converted.to_ndarray())
            for converted in converter.resample(None):
                chunks.append(converted.to_ndarray())
        except av.error.FFmpegError as error:
            raise OisaInputError(f"{what} {path} is truncated or corrupt ({error}).") from error
        source_rate = stream.rate
    if not chunks:
        raise OisaInputError(f"{what} {path} has no audio samples.")
    waveform = np.concatenate(chunks, axis=1).mean(axis=0)
    if waveform.size == 0:
        raise OisaInputError(f"{what} {path} has no audio samples.")
    return resample_audio(waveform, source_rate, sampling_rate)


def resample_audio(waveform: np.ndarray, source_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """
    A mono float32 waveform resampled as `librosa.resample(..., res_type="soxr_hq")` does, the resampler behind the
    original's `librosa.load`: soxr at "HQ" quality on float32 samples, then cut or zero-padded to
    `ceil(len * target_rate / source_rate)` samples.
    """
    # soxr filters in the precision of its input, and librosa hands it float32
    waveform = np.asarray(waveform, dtype=np.float32)
    if source_rate == target_rate:
        return waveform
    resampled = soxr.resample(waveform, source_rate, target_rate, quality="HQ")
    length = math.ceil(waveform.size * (target_rate / source_rate))
    if resampled.size < length:
        return np.pad(resampled, (0, length - resampled.size))
    return resampled[:length]


def load_image(path: str | Path, what: str = "Image") -> Image.Image:
    """An image file as RGB."""
    path = _require_file(path, what)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise OisaInputError(f"{what} {path} is not a readable image ({error}).") from error


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class VideoInfo:
    """What a video holds: frame count, frame times in seconds, frame size (height, width) and duration."""

    num_frames: int
    timestamps: list[float]
    height: int
    width: int
    duration: float
    has_audio: bool


class VideoReader:
    """
    Frames of a video file (any container PyAV reads) or of a folder of images, in order, decoded as a stream: a
    pass over the file holds one frame at a time plus the frames asked for.
    """

    def __init__(self, path: str | Path, fps_for_folders: float = 1.0):
        self.path = _require_file(path, "Video")
        self.is_folder = self.path.is_dir()
        if self.is_folder:
            self.frame_paths = sorted(
                (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: _natural_key(p.name),
            )
            if not self.frame_paths:
                raise OisaInputError(f"Frame folder {self.path} has no image files.")
            self.fps_for_folders = fps_for_folders
        self.info = self._probe()

    def _probe(self) -> VideoInfo:
        if self.is_folder:
            first = load_image(self.frame_paths[0], "Frame")
            count = len(self.frame_paths)
            timestamps = [index / self.fps_for_folders for index in range(count)]
            return VideoInfo(count, timestamps, first.height, first.width, count / self.fps_for_folders, False)
        container = _open_container(self.path, "Video")
        with container:
            if not container.streams.video:
                raise OisaInputError(f"Video {self.path} has no video stream.")
            stream = container.streams.video[0]
            has_audio = bool(container.streams.audio)
            timestamps = []
            height = width = 0
            try:
                for frame in container.decode(stream):
                    timestamps.append(float(frame.time) if frame.time is not None else len(timestamps))
                    height, width = frame.height, frame.width
            except av.error.FFmpegError as error:
                if not timestamps:
                    raise OisaInputError(f"Video {self.path} is truncated or corrupt ({error}).") from error
                logger.warning("Video %s is truncated; using its first %d frames.", self.path, len(timestamps))
        if not timestamps:
            raise OisaInputError(f"Video {self.path} has no decodable frames.")
        step = timestamps[1] - timestamps[0] if len(timestamps) > 1 else 0.0
        return VideoInfo(len(timestamps), timestamps, height, width, timestamps[-1] + step, has_audio)

    def iter_frames(self) -> Iterator[tuple[int, Image.Image]]:
        """(index, RGB frame) for every frame, in order."""
        if self.is_folder:
            for index, frame_path in enumerate(self.frame_paths):
                yield index, load_image(frame_path, "Frame")
            return
        container = _open_container(self.path, "Video")
        with container:
            try:
                for index, frame in enumerate(container.decode(container.streams.video[0])):
                    if index >= self.info.num_frames:
                        break
                    yield index, frame.to_image()
            except av.error.FFmpegError as error:
                raise OisaInputError(f"Video {self.path} is truncated or corrupt ({error}).") from error

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at `indices` (any order, repeats allowed), decoding the file once."""
        wanted = set(indices)
        found = {}
        if self.is_folder:
            found = {index: load_image(self.frame_paths[index], "Frame") for index in wanted}
        else:
            last = max(wanted, default=-1)
            for index, frame in self.iter_frames():
                if index in wanted:
                    found[index] = frame
                if index >= last:
                    break
        return [found[index] for index in indices]

    def soundtrack(self) -> np.ndarray | None:
        """The video's own audio at 16 kHz mono, or None when it has none."""
        if not self.info.has_audio:
            return None
        return decode_audio(self.path, what="Video")


def silent_soundtrack(duration: float, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Silence as long as the video (at least one second), for videos without an audio track."""
    return np.zeros(max(int(math.ceil(duration * sampling_rate)), sampling_rate), dtype=np.float32)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sampling_rate: int = SAMPLING_RATE,
    codec: str = "libx264",
    audio_codec: str = "aac",
) -> None:
    """
    Encodes frames (T, H, W, 3) uint8 and an optional waveform, (samples,) or (channels, samples) with one or two
    channels, into a video file (mp4, mkv, webm, avi...).
    """
    samples = None if audio is None else np.atleast_2d(np.asarray(audio, dtype=np.float32))
    if samples is not None and (samples.ndim != 2 or samples.shape[0] not in AUDIO_LAYOUTS):
        raise ValueError(f"`audio` must be (samples,) or (channels, samples), 1 or 2 channels; got {np.shape(audio)}.")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        audio_stream = None
        if samples is not None:
            layout = AUDIO_LAYOUTS[samples.shape[0]]
            audio_stream = container.add_stream(audio_codec, rate=sampling_rate)
            audio_stream.layout = layout
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
            audio_frame.sample_rate = sampling_rate
            # each encoder takes its own sample format and frame size
            converter = av.AudioResampler(
                format=audio_stream.codec_context.format.name,
                layout=layout,
                rate=sampling_rate,
                frame_size=audio_stream.codec_context.frame_size or None,
            )
            for converted in [*converter.resample(audio_frame), *converter.resample(None)]:
                for packet in audio_stream.encode(converted):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
