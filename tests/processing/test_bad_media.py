"""Bad media never crashes, hangs or answers garbage: every input here is made at test time, small."""

import logging
import math
import struct
import subprocess
import sys
import zlib
from fractions import Fraction

import av
import librosa
import numpy as np
import pytest
import soundfile
from PIL import Image

from processing_oisa.data.synthetic_clips import make_shapes_clip
from processing_oisa.media import (
    OisaInputError,
    VideoReader,
    check_image,
    check_waveform,
    decode_audio,
    load_image,
    write_video,
)


LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}  # the layouts FFmpeg's AAC encoder takes
DECODE_ALL = """
import sys
from pathlib import Path

import numpy as np

from processing_oisa.media import VideoReader, decode_audio

folder = Path(sys.argv[1])
decoded = {}
for path in sorted(folder.iterdir()):
    if path.suffix == ".wav":
        decoded[path.name] = decode_audio(path)
    elif path.suffix in (".mkv", ".mp4"):
        decoded[path.name] = VideoReader(path).soundtrack()
np.savez(folder / "decoded.npz", **decoded)
"""


def tones(channels: int, rate: int, seconds: float = 1.0) -> np.ndarray:
    """(samples, channels) float32: a 500 Hz sine, 0.1 loud in the first channel to 0.5 in the last (0.3 in the mean)."""
    t = np.arange(int(seconds * rate)) / rate
    amplitudes = np.linspace(0.1, 0.5, channels) if channels > 1 else np.array([0.3])
    return (np.sin(2 * np.pi * 500 * t)[:, None] * amplitudes).astype(np.float32)


def write_video_with_track(path, track: np.ndarray, rate: int, codec: str) -> None:
    """Three black 16x16 frames and `track` (samples, channels) as the soundtrack, encoded with `codec`."""
    layout = LAYOUTS.get(track.shape[1], f"{track.shape[1]} channels")
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=5)
        video.height = video.width = 16
        video.pix_fmt = "yuv420p"
        audio = container.add_stream(codec, rate=rate)
        audio.layout = layout
        for _ in range(3):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(video.encode())
        # packed samples: PyAV reads and writes at most 8 planes
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(track).reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = rate
        converter = av.AudioResampler(
            format=audio.codec_context.format.name,
            layout=layout,
            rate=rate,
            frame_size=audio.codec_context.frame_size or None,
        )
        for converted in [*converter.resample(frame), *converter.resample(None)]:
            container.mux(audio.encode(converted))
        container.mux(audio.encode())


def test_any_channel_count_decodes_to_the_mean_of_its_channels(tmp_path):
    rate = 48000
    tracks = {channels: tones(channels, rate) for channels in (1, 2, 6, 8, 16)}
    for channels, track in tracks.items():
        soundfile.write(tmp_path / f"{channels}.wav", track, rate, subtype="FLOAT")
        write_video_with_track(tmp_path / f"{channels}.mkv", track, rate, "pcm_f32le")
        if channels in LAYOUTS:
            write_video_with_track(tmp_path / f"{channels}.mp4", track, rate, "aac")
    # 8 channels or more killed the process with a segmentation fault: decode in a child, whose death fails the test
    child = subprocess.run(
        [sys.executable, "-c", DECODE_ALL, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, f"decoding exited with {child.returncode}:\n{child.stderr[-3000:]}"
    decoded = np.load(tmp_path / "decoded.npz")
    for channels, track in tracks.items():
        # lossless tracks: exactly librosa's mean of the channels, resampled by soxr HQ
        reference = librosa.load(tmp_path / f"{channels}.wav", sr=16000)[0]
        np.testing.assert_array_equal(decoded[f"{channels}.wav"], reference)
        mono = librosa.resample(librosa.to_mono(track.T), orig_sr=rate, target_sr=16000, res_type="soxr_hq")
        np.testing.assert_array_equal(decoded[f"{channels}.mkv"], mono)
        if channels in LAYOUTS:
            # AAC: the same 500 Hz tone, give or take the codec, which low-passes the LFE channel (the 4th of 5.1
            # and 7.1) far below 500 Hz
            amplitudes = np.abs(track).max(axis=0)
            if channels > 2:
                amplitudes[3] = 0.0
            middle = decoded[f"{channels}.mp4"][4000:12000]
            assert abs(np.sqrt(2) * middle.std() - amplitudes.mean()) < 0.02
            assert abs(np.argmax(np.abs(np.fft.rfft(middle))) * 16000 / middle.size - 500) < 3


@pytest.mark.parametrize("case", ["inf", "some_nan", "all_nan"])
def test_audio_with_non_finite_samples_is_refused(tmp_path, case):
    samples = tones(1, 16000)[:, 0]
    if case == "inf":
        samples[100] = np.inf
    elif case == "some_nan":
        samples[[5, 500, 5000]] = np.nan
    else:
        samples[:] = np.nan
    path = tmp_path / f"{case}.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(OisaInputError, match=rf"{case}.wav holds non-finite samples \(NaN or infinity\)"):
        decode_audio(path)


def test_video_soundtrack_with_nan_is_refused(tmp_path):
    track = tones(2, 48000)
    track[1000:1010] = np.nan
    write_video_with_track(tmp_path / "nan.mkv", track, 48000, "pcm_f32le")
    with pytest.raises(OisaInputError, match=r"Video .*nan.mkv holds non-finite samples"):
        VideoReader(tmp_path / "nan.mkv").soundtrack()


def test_check_waveform_takes_float_audio_only():
    stereo = np.zeros((2, 1600), dtype=np.float64)
    checked = check_waveform(stereo, "The soundtrack waveform")
    assert checked.dtype == np.float32 and checked.shape == (2, 1600)
    with pytest.raises(OisaInputError, match=r"The speech waveform holds integer samples \(int16\); convert them to float"):
        check_waveform(np.zeros(1600, dtype=np.int16), "The speech waveform")
    with pytest.raises(OisaInputError, match=r"has shape \(2, 3, 1600\)"):
        check_waveform(np.zeros((2, 3, 1600), dtype=np.float32), "The sound waveform")
    with pytest.raises(OisaInputError, match="has shape"):
        check_waveform(np.float32(0.5), "The sound waveform")
    with pytest.raises(OisaInputError, match="holds bool values"):
        check_waveform(np.zeros(1600, dtype=bool), "The sound waveform")
    with pytest.raises(OisaInputError, match="has no audio samples"):
        check_waveform(np.zeros(0, dtype=np.float32), "The sound waveform")
    with pytest.raises(OisaInputError, match="non-finite samples .*: 1 of 1600"):
        check_waveform(np.where(np.arange(1600) == 7, np.nan, 0.0), "The sound waveform")


def test_images_without_pixels_are_refused(tmp_path):
    for image in (Image.new("RGB", (0, 0)), Image.fromarray(np.zeros((0, 4, 3), np.uint8))):
        with pytest.raises(OisaInputError, match=r"The referring image is \d+x\d+ pixels: it has no pixels"):
            check_image(image, "The referring image")
    check_image(Image.new("RGB", (1, 1)), "The referring image")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a well-formed PNG 0 pixels wide: PIL refuses to open it
    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "empty.png").write_bytes(png)
    with pytest.raises(OisaInputError, match="empty.png is not a readable image"):
        load_image(tmp_path / "empty.png")


@pytest.mark.parametrize("rate", [8000, 44100])
def test_max_seconds_gives_the_start_of_the_whole_decode(tmp_path, caplog, rate):
    noise = 0.2 * np.random.default_rng(rate).standard_normal((6 * rate, 2))
    noise[4 * rate :] = np.nan  # past what a 1.5 s decode reads
    soundfile.write(tmp_path / "clip.wav", noise, rate, subtype="FLOAT")
    soundfile.write(tmp_path / "finite.wav", noise[: 4 * rate], rate, subtype="FLOAT")
    whole = decode_audio(tmp_path / "finite.wav")
    with caplog.at_level(logging.WARNING, logger="processing_oisa.media"):
        first = decode_audio(tmp_path / "clip.wav", max_seconds=1.5)
    np.testing.assert_array_equal(first, whole[:24000])
    assert "clip.wav lasts more than 1.5 s; only its first 1.5 s are used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processing_oisa.media"):
        np.testing.assert_array_equal(decode_audio(tmp_path / "finite.wav", max_seconds=30), whole)
    assert not caplog.text
    with pytest.raises(OisaInputError, match="non-finite"):
        decode_audio(tmp_path / "clip.wav")


def test_video_soundtrack_max_seconds(tmp_path):
    track = tones(2, 48000, seconds=3.0)
    write_video_with_track(tmp_path / "clip.mkv", track, 48000, "pcm_f32le")
    reader = VideoReader(tmp_path / "clip.mkv")
    np.testing.assert_array_equal(reader.soundtrack(max_seconds=1.25), reader.soundtrack()[:20000])


def faststart_copy(source, target) -> None:
    """`source` remuxed with its index first, so that a cut copy still opens (an mp4 indexed at its end does not)."""
    with av.open(str(source)) as given, av.open(str(target), mode="w", options={"movflags": "faststart"}) as copy:
        streams = {stream.index: copy.add_stream_from_template(stream) for stream in given.streams}
        for packet in given.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                copy.mux(packet)


def test_truncated_video_uses_its_decodable_frames_everywhere(tmp_path, caplog):
    clip = make_shapes_clip(num_frames=30, height=64, width=96, fps=10.0, seed=1)
    write_video(tmp_path / "clip.mp4", clip.frames, clip.fps, clip.soundtrack)
    faststart_copy(tmp_path / "clip.mp4", tmp_path / "indexed.mp4")
    data = (tmp_path / "indexed.mp4").read_bytes()
    broke_off = 0
    for fraction in (0.5, 0.7):
        (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * fraction)])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="processing_oisa.media"):
            reader = VideoReader(tmp_path / "cut.mp4")
            count = reader.info.num_frames
            frames = list(reader.iter_frames())
            last = reader.read([count - 1, 0])
        warnings = [record.getMessage() for record in caplog.records]
        assert 0 < count < 30 and len(reader.info.timestamps) == count
        assert [index for index, _ in frames] == list(range(count))
        assert np.array_equal(np.asarray(last[0]), np.asarray(frames[-1][1]))
        assert len(warnings) <= 1
        if warnings:
            broke_off += 1
            assert f"cut.mp4 breaks off after frame {count}" in warnings[0]
            assert f"only its first {count} frames are used" in warnings[0]
        with pytest.raises(IndexError, match=f"has {count} frames; frame {count} was asked for"):
            reader.read([count])
        assert reader.soundtrack().size > 0
    assert broke_off  # at least one cut falls inside a video packet


def test_frame_folder_of_mixed_sizes_is_refused(tmp_path):
    for index, size in enumerate([(32, 24), (32, 24), (30, 24), (32, 24)]):
        Image.new("RGB", size).save(tmp_path / f"frame_{index}.png")
    with pytest.raises(OisaInputError, match=r"frame_2.png is 30x24 but the frames before it in .* are 32x24"):
        VideoReader(tmp_path)


def test_one_pixel_video_decodes(tmp_path):
    with av.open(str(tmp_path / "pixel.mkv"), mode="w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.height = stream.width = 1
        stream.pix_fmt = "yuv444p"  # 4:2:0 needs even sides
        for value in (0, 120, 240):
            frame = np.full((1, 1, 3), value, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    reader = VideoReader(tmp_path / "pixel.mkv")
    assert (reader.info.num_frames, reader.info.height, reader.info.width) == (3, 1, 1)
    values = [np.asarray(frame)[0, 0].astype(int) for _, frame in reader.iter_frames()]
    assert all(abs(value - target).max() <= 3 for value, target in zip(values, (0, 120, 240)))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 8), (6, 7), (33, 47)])
def test_write_video_pads_odd_sides(tmp_path, caplog, height, width):
    frames = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    frames[:] = frames[:, :1, :1]  # one colour per frame, so that the codec keeps it
    with caplog.at_level(logging.WARNING, logger="processing_oisa.media"):
        write_video(tmp_path / "odd.mp4", frames, 5.0)
    padded = (height + height % 2, width + width % 2)
    assert (f"padded to {padded[1]}x{padded[0]}" in caplog.text) == (padded != (height, width))
    reader = VideoReader(tmp_path / "odd.mp4")
    assert (reader.info.num_frames, reader.info.height, reader.info.width) == (3, *padded)
    for (_, decoded), drawn in zip(reader.iter_frames(), frames):
        assert np.abs(np.asarray(decoded, dtype=int) - drawn[0, 0].astype(int)).max() <= 8


def write_variable_rate_video(path, times: list[float]) -> None:
    time_base = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = 32, 48
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        for index, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 20 * index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(time / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_variable_frame_rate_keeps_its_timing_in_the_overlay(tmp_path):
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 0.6, 1.2, 1.25, 2.0, 2.4]
    write_variable_rate_video(tmp_path / "vfr.mp4", times)
    source = VideoReader(tmp_path / "vfr.mp4")
    np.testing.assert_allclose(source.info.timestamps, times, atol=1e-3)
    frames = np.stack([np.asarray(frame) for frame in source.read(range(source.info.num_frames))])
    frame_time = source.info.duration / source.info.num_frames
    for suffix in (".mp4", ".mkv", ".webm"):
        overlay_path = tmp_path / f"overlay{suffix}"
        codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
        write_video(overlay_path, frames, 10.0, codec=codec, timestamps=source.info.timestamps)
        overlay = VideoReader(overlay_path).info
        np.testing.assert_allclose(overlay.timestamps, source.info.timestamps, atol=1e-3)
        assert math.isclose(overlay.duration, source.info.duration, abs_tol=frame_time)
    with pytest.raises(ValueError, match="one increasing time per frame"):
        write_video(tmp_path / "bad.mp4", frames, 10.0, timestamps=source.info.timestamps[::-1])
    with pytest.raises(ValueError, match="one increasing time per frame"):
        write_video(tmp_path / "bad.mp4", frames, 10.0, timestamps=source.info.timestamps[:-1])
