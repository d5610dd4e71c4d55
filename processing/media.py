"""Decoding of videos, frame folders, images and audio with PyAV and PIL, audio resampled to 16 kHz with soxr."""

import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soxr
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}  # channels of a waveform `write_video` encodes
# audio decoded past a cut so that the resampler's filter sees what follows it: the samples kept are then those of a
# whole decode (soxr "HQ" needs under 0.1 s between 8 and 96 kHz)
RESAMPLER_MARGIN_SECONDS = 1.0
# time base of the frame times `write_video` is given: 24, 25, 30, 50, 60 fps and their NTSC variants 30000/1001 and
# 60000/1001 fall on it exactly, and MPEG-4 Part 2 accepts it (denominator under 2**16)
TIMESTAMP_BASE = Fraction(1, 60000)


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


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """
    The first video stream, decoded by FFmpeg's frame and slice threads: the frames are the same, in the same order,
    as with one thread. A file that breaks off then decodes without an error (the frames before the break are the
    same), so it is the probe, on one thread, that finds where a file breaks off.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _rgb_image(frame: av.VideoFrame, reformatter: VideoReformatter) -> Image.Image:
    """
    A decoded frame as an RGB image, converted by swscale with `frame.to_image()`'s settings (so pixel for pixel its
    image) through one reformatter for the whole stream, and without `to_image`'s row-by-row copy.
    """
    return Image.fromarray(reformatter.reformat(frame, format="rgb24").to_ndarray())


def check_waveform(waveform: np.ndarray, source: str) -> np.ndarray:
    """
    `waveform` as float32 once it is known to be audio: float samples (integer PCM is refused), (samples,) or
    (channels, samples), at least one sample, none NaN or infinite. `source` names it in the error, e.g.
    "Speech clip.wav" or "The speech waveform".
    """
    array = np.asarray(waveform)
    if array.dtype.kind in "iu":
        raise OisaInputError(
            f"{source} holds integer samples ({array.dtype}); convert them to float in [-1, 1] first "
            "(int16 PCM: divide by 32768)."
        )
    if array.dtype.kind != "f":
        raise OisaInputError(f"{source} holds {array.dtype} values, not float audio samples.")
    if array.ndim not in (1, 2):
        raise OisaInputError(f"{source} has shape {array.shape}; a waveform is (samples,) or (channels, samples).")
    if array.size == 0:
        raise OisaInputError(f"{source} has no audio samples.")
    finite = np.isfinite(array)
    if not finite.all():
        raise OisaInputError(
            f"{source} holds non-finite samples (NaN or infinity): {array.size - np.count_nonzero(finite)} "
            f"of {array.size}."
        )
    return array.astype(np.float32, copy=False)


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """A packed float frame's channels averaged as `librosa.to_mono` averages soundfile's (samples, channels)."""
    channels = frame.layout.nb_channels
    return frame.to_ndarray().reshape(-1, channels).T.mean(axis=0)


def decode_audio(
    path: str | Path,
    sampling_rate: int = SAMPLING_RATE,
    what: str = "Audio file",
    max_seconds: float | None = None,
) -> np.ndarray:
    """
    The first audio stream of any file PyAV reads (wav, flac, mp3, ogg, mp4, mkv...) as float32 mono at
    `sampling_rate`: channels are averaged, then resampled by [`resample_audio`], as the original's
    `librosa.load(path, sr=16000)` does. With `max_seconds`, decoding stops soon after that time and the result is
    the first `max_seconds` of the whole file's, sample for sample (with a warning when the file is longer). A file
    that breaks off is used up to the break, with a warning; one holding NaN or infinite samples is refused.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"`max_seconds` must be positive; got {max_seconds}.")
    path = _require_file(path, what)
    container = _open_container(path, what)
    with container:
        if not container.streams.audio:
            raise OisaInputError(f"{what} {path} has no audio stream.")
        stream = container.streams.audio[0]
        source_rate = stream.rate
        limit = None if max_seconds is None else math.ceil((max_seconds + RESAMPLER_MARGIN_SECONDS) * source_rate)
        # packed float at the stream's own rate and layout, whatever the codec's sample format: one plane, since
        # PyAV reads at most 8 planes (planar audio of 8 channels or more crashed it)
        converter = av.AudioResampler(format="flt", layout=stream.layout.name, rate=source_rate)
        chunks = []
        num_samples = 0
        try:
            for frame in container.decode(stream):
                for converted in converter.resample(frame):
                    chunks.append(_mono(converted))
                    num_samples += chunks[-1].size
                if limit is not None and num_samples >= limit:
                    break
            else:
                chunks.extend(_mono(converted) for converted in converter.resample(None))
        except av.error.FFmpegError as error:
            if not chunks:
                raise OisaInputError(f"{what} {path} is truncated or corrupt ({error}).") from error
            logger.warning(
                "%s %s breaks off after %.2f s (%s); only what precedes is used.",
                what, path, num_samples / source_rate, error,
            )
    waveform = check_waveform(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), f"{what} {path}")
    waveform = resample_audio(waveform, source_rate, sampling_rate)
    if max_seconds is None:
        return waveform
    kept = math.ceil(max_seconds * sampling_rate)
    if waveform.size > kept:
        logger.warning("%s %s lasts more than %g s; only its first %g s are used.", what, path, max_seconds, max_seconds)
    return waveform[:kept]


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


def check_image(image: Image.Image, source: str) -> None:
    """Refuses an image with no pixels (a side of 0); `source` names it in the error."""
    if image.width == 0 or image.height == 0:
        raise OisaInputError(f"{source} is {image.width}x{image.height} pixels: it has no pixels.")


def load_image(path: str | Path, what: str = "Image") -> Image.Image:
    """An image file as RGB."""
    path = _require_file(path, what)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise OisaInputError(f"{what} {path} is not a readable image ({error}).") from error


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise OisaInputError(f"{what} {path} is not a readable image ({error}).") from error


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class VideoInfo:
    """
    What a video holds: frame count, the source's frame times in seconds (irregular in a variable-frame-rate video),
    frame size (height, width) and duration (the last frame's time plus the mean frame interval).
    """

    num_frames: int
    timestamps: list[float]
    height: int
    width: int
    duration: float
    has_audio: bool


class VideoReader:
    """
    Frames of a video file (any container PyAV reads) or of a folder of images of one size, in order, decoded as a
    stream: a pass over the file holds one frame at a time plus the frames asked for. A file that breaks off is read
    up to the break, with one warning, and every read then stops there.
    """

    def __init__(self, path: str | Path, fps_for_folders: float = 1.0):
        self.path = _require_file(path, "Video")
        self.is_folder = self.path.is_dir()
        self.frames: list[Image.Image] | None = None
        if self.is_folder:
            self.frame_paths = sorted(
                (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: _natural_key(p.name),
            )
            if not self.frame_paths:
                raise OisaInputError(f"Frame folder {self.path} has no image files.")
            self.fps_for_folders = fps_for_folders
        self.info = self._probe()

    @classmethod
    def from_frames(cls, frames: np.ndarray | Sequence[Image.Image | np.ndarray], fps: float = 1.0) -> "VideoReader":
        """
        A video held in memory: a uint8 array (T, H, W, 3) or a list of PIL images or uint8 (H, W, 3) arrays, all of
        one size, shown at `fps` frames a second; it has no soundtrack.
        """
        if isinstance(frames, (str, Path, Image.Image)) or not isinstance(frames, (np.ndarray, Sequence)):
            raise OisaInputError(
                f"The video is a {type(frames).__name__}; give a video file, a folder of frames, a uint8 array "
                "(T, H, W, 3) or a list of frames."
            )
        images = [_frame_image(frame, index) for index, frame in enumerate(frames)]
        if not images:
            raise OisaInputError("The video has no frames.")
        for index, image in enumerate(images):
            if image.size != images[0].size:
                raise OisaInputError(
                    f"Frame {index} of the video is {image.width}x{image.height} but frame 0 is "
                    f"{images[0].width}x{images[0].height}; the frames of a video must all have one size."
                )
        reader = cls.__new__(cls)
        reader.path, reader.is_folder, reader.frames = Path("<frames in memory>"), False, images
        count, (width, height) = len(images), images[0].size
        reader.info = VideoInfo(count, [index / fps for index in range(count)], height, width, count / fps, False)
        return reader

    def _probe(self) -> VideoInfo:
        if self.is_folder:
            width, height = _image_size(self.frame_paths[0], "Frame")
            for frame_path in self.frame_paths[1:]:
                size = _image_size(frame_path, "Frame")
                if size != (width, height):
                    raise OisaInputError(
                        f"Frame {frame_path} is {size[0]}x{size[1]} but the frames before it in {self.path} are "
                        f"{width}x{height}; the frames of a video must all have one size."
                    )
            count = len(self.frame_paths)
            timestamps = [index / self.fps_for_folders for index in range(count)]
            return VideoInfo(count, timestamps, height, width, count / self.fps_for_folders, False)
        container = _open_container(self.path, "Video")
        with container:
            if not container.streams.video:
                raise OisaInputError(f"Video {self.path} has no video stream.")
            # one decoder thread: frame threads decode past a break in the file without reporting it
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
                logger.warning(
                    "Video %s breaks off after frame %d (%s); only its first %d frames are used.",
                    self.path, len(timestamps), error, len(timestamps),
                )
        if not timestamps:
            raise OisaInputError(f"Video {self.path} has no decodable frames.")
        step = (timestamps[-1] - timestamps[0]) / (len(timestamps) - 1) if len(timestamps) > 1 else 0.0
        return VideoInfo(len(timestamps), timestamps, height, width, timestamps[-1] + step, has_audio)

    def iter_frames(self) -> Iterator[tuple[int, Image.Image]]:
        """(index, RGB frame) for each of the `info.num_frames` frames, in order."""
        if self.frames is not None:
            yield from enumerate(self.frames)
            return
        if self.is_folder:
            for index, frame_path in enumerate(self.frame_paths):
                yield index, load_image(frame_path, "Frame")
            return
        reformatter = VideoReformatter()
        for index, frame in self._decode():
            yield index, _rgb_image(frame, reformatter)

    def _decode(self, stop: int | None = None) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, decoded frame) of a video file's frames before `stop` (by default all `info.num_frames`)."""
        container = _open_container(self.path, "Video")
        with container:
            frames = container.decode(_video_stream(container))
            # stop at the frames the probe found: in a file that breaks off, asking for one more raises
            for index in range(self.info.num_frames if stop is None else stop):
                try:
                    frame = next(frames)
                except (StopIteration, av.error.FFmpegError) as error:
                    raise OisaInputError(
                        f"Video {self.path} changed while it was read: frame {index} of {self.info.num_frames} no "
                        "longer decodes."
                    ) from error
                yield index, frame

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """
        The frames at `indices` (any order, repeats allowed), decoding the file once up to the last of them and
        converting to RGB only those.
        """
        wanted = set(indices)
        outside = sorted(index for index in wanted if not 0 <= index < self.info.num_frames)
        if outside:
            raise IndexError(f"Video {self.path} has {self.info.num_frames} frames; frame {outside[0]} was asked for.")
        if self.frames is not None:
            found = {index: self.frames[index] for index in wanted}
        elif self.is_folder:
            found = {index: load_image(self.frame_paths[index], "Frame") for index in wanted}
        else:
            reformatter = VideoReformatter()
            found = {
                index: _rgb_image(frame, reformatter)
                for index, frame in self._decode(stop=max(wanted, default=-1) + 1)
                if index in wanted
            }
        return [found[index] for index in indices]

    def soundtrack(self, max_seconds: float | None = None) -> np.ndarray | None:
        """The video's own audio at 16 kHz mono (at most its first `max_seconds`), or None when it has none."""
        if not self.info.has_audio:
            return None
        return decode_audio(self.path, what="Video", max_seconds=max_seconds)


def _frame_image(frame: Image.Image | np.ndarray, index: int) -> Image.Image:
    """One in-memory frame as an RGB image: a PIL image or a uint8 array (H, W, 3)."""
    if isinstance(frame, Image.Image):
        check_image(frame, f"Frame {index} of the video")
        return frame.convert("RGB")
    array = np.asarray(frame) if isinstance(frame, np.ndarray) else None
    if array is None or array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        described = f"{array.dtype} {array.shape}" if array is not None else type(frame).__name__
        raise OisaInputError(f"Frame {index} of the video is {described}; frames are uint8 (H, W, 3) or PIL images.")
    image = Image.fromarray(array)
    check_image(image, f"Frame {index} of the video")
    return image


def silent_soundtrack(duration: float, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Silence as long as the video (at least one second), for videos without an audio track."""
    return np.zeros(max(int(math.ceil(duration * sampling_rate)), sampling_rate), dtype=np.float32)


class VideoWriter:
    """
    Encodes frames pushed one at a time, (H, W, 3) uint8, and an optional waveform, (samples,) or (channels, samples)
    with one or two channels, into a video file (mp4, mkv, webm, avi...): memory stays flat in the video's length.
    `timestamps` (seconds, one per frame, increasing) keep a variable frame rate, e.g. a source's
    [`VideoInfo.timestamps`]; without them frame `i` is shown at `i / fps`. Frames with an odd side are padded by
    repeating their last row or column, as 4:2:0 video needs even sides. Use it as a context manager.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        audio: np.ndarray | None = None,
        sampling_rate: int = SAMPLING_RATE,
        codec: str = "libx264",
        audio_codec: str = "aac",
        timestamps: Sequence[float] | None = None,
    ):
        self.path, self.fps, self.codec, self.audio_codec, self.sampling_rate = path, fps, codec, audio_codec, sampling_rate
        self.samples = None if audio is None else np.atleast_2d(np.asarray(audio, dtype=np.float32))
        if self.samples is not None and (self.samples.ndim != 2 or self.samples.shape[0] not in AUDIO_LAYOUTS):
            raise ValueError(
                f"`audio` must be (samples,) or (channels, samples), 1 or 2 channels; got {np.shape(audio)}."
            )
        self.pts = None
        if timestamps is not None:
            self.pts = [round(time / TIMESTAMP_BASE) for time in timestamps]
            if any(later <= earlier for earlier, later in zip(self.pts, self.pts[1:])):
                raise ValueError("`timestamps` must give one increasing time per frame.")
        self.count = 0
        self.container = self.stream = self.frame_shape = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self.container is not None:
            self.container.close()

    def _open(self, frame_shape: tuple[int, ...]) -> None:
        self.frame_shape = frame_shape
        height, width = frame_shape[:2]
        if height % 2 or width % 2:
            logger.warning(
                "Video %s: frames of %dx%d are padded to %dx%d (4:2:0 video needs even sides).",
                self.path, width, height, width + width % 2, height + height % 2,
            )
        self.container = av.open(str(self.path), mode="w")
        self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1000))
        self.stream.height, self.stream.width = height + height % 2, width + width % 2
        self.stream.pix_fmt = "yuv420p"
        if self.pts is not None:
            self.stream.codec_context.time_base = TIMESTAMP_BASE
        self.audio_stream = None
        if self.samples is not None:
            self.audio_stream = self.container.add_stream(self.audio_codec, rate=self.sampling_rate)
            self.audio_stream.layout = AUDIO_LAYOUTS[self.samples.shape[0]]

    def write(self, frame: np.ndarray | Image.Image) -> None:
        """Encodes the next frame; every frame has the first one's size."""
        frame = np.asarray(frame)
        if self.container is None:
            if frame.ndim != 3 or frame.shape[-1] != 3:
                raise ValueError(f"`frames` must be (T, H, W, 3) with at least one frame; frame 0 is {frame.shape}.")
            self._open(frame.shape)
        if frame.shape != self.frame_shape:
            raise ValueError(f"`frames`: frame {self.count} is {frame.shape}, frame 0 {self.frame_shape}.")
        if self.pts is not None and self.count >= len(self.pts):
            raise ValueError(f"`timestamps` must give one time per frame; there are more than {len(self.pts)} frames.")
        height, width = self.frame_shape[:2]
        if height % 2 or width % 2:
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if self.pts is not None:
            video_frame.pts, video_frame.time_base = self.pts[self.count], TIMESTAMP_BASE
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        """Flushes the video, writes the audio and closes the file."""
        if self.container is None:
            raise ValueError("`frames` must be (T, H, W, 3) with at least one frame; none was written.")
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            if self.pts is not None and self.count != len(self.pts):
                raise ValueError(
                    f"`timestamps` must give one time per frame: {len(self.pts)} times for {self.count} frames."
                )
            if self.audio_stream is not None:
                self._write_audio()
        finally:
            self.container.close()

    def _write_audio(self) -> None:
        layout = AUDIO_LAYOUTS[self.samples.shape[0]]
        audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.samples), format="fltp", layout=layout)
        audio_frame.sample_rate = self.sampling_rate
        # each encoder takes its own sample format and frame size
        converter = av.AudioResampler(
            format=self.audio_stream.codec_context.format.name,
            layout=layout,
            rate=self.sampling_rate,
            frame_size=self.audio_stream.codec_context.frame_size or None,
        )
        for converted in [*converter.resample(audio_frame), *converter.resample(None)]:
            for packet in self.audio_stream.encode(converted):
                self.container.mux(packet)
        for packet in self.audio_stream.encode():
            self.container.mux(packet)


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sampling_rate: int = SAMPLING_RATE,
    codec: str = "libx264",
    audio_codec: str = "aac",
    timestamps: Sequence[float] | None = None,
) -> None:
    """
    Encodes frames (T, H, W, 3) uint8, or any iterable of (H, W, 3) frames, consumed one at a time, with an optional
    waveform into a video file; see [`VideoWriter`].
    """
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0):
        raise ValueError(f"`frames` must be (T, H, W, 3) with at least one frame; got {frames.shape}.")
    if timestamps is not None and isinstance(frames, (np.ndarray, Sequence)) and len(timestamps) != len(frames):
        raise ValueError(f"`timestamps` must give one increasing time per frame ({len(frames)} frames).")
    with VideoWriter(path, fps, audio, sampling_rate, codec, audio_codec, timestamps) as writer:
        for frame in frames:
            writer.write(frame)
