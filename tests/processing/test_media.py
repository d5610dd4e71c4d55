import numpy as np
import pytest
import soundfile
from PIL import Image

from processing_oisa.data.synthetic_clips import make_shapes_clip, tone
from processing_oisa.media import OisaInputError, VideoReader, decode_audio, load_image, write_video
from processing_oisa.prompts import audio_token_count


@pytest.fixture(scope="module")
def clip():
    return make_shapes_clip(num_frames=10, height=64, width=96, fps=5.0, seed=1)


@pytest.mark.parametrize(("suffix", "codec", "audio_codec"), [
    (".mp4", "libx264", "aac"), (".mkv", "libx264", "libmp3lame"), (".webm", "libvpx-vp9", "libopus"), (".avi", "mpeg4", "mp3"),
])
def test_video_files_decode_in_order_with_their_soundtrack(tmp_path, clip, suffix, codec, audio_codec):
    path = tmp_path / f"clip{suffix}"
    write_video(path, clip.frames, clip.fps, clip.soundtrack, codec=codec, audio_codec=audio_codec)
    reader = VideoReader(path)
    assert (reader.info.num_frames, reader.info.height, reader.info.width) == (10, 64, 96)
    assert reader.info.has_audio
    np.testing.assert_allclose(np.diff(reader.info.timestamps), 0.2, atol=0.02)
    frames = [np.asarray(frame, dtype=np.float32) for _, frame in reader.iter_frames()]
    assert len(frames) == 10
    # lossy codecs: the decoded frames stay close to the drawn ones, frame by frame
    for decoded, drawn in zip(frames, clip.frames):
        assert np.abs(decoded - drawn).mean() < 12
    picked = reader.read([7, 2, 7])
    assert np.array_equal(np.asarray(picked[1]), np.asarray(frames[2], dtype=np.uint8)) or np.abs(
        np.asarray(picked[1], dtype=np.float32) - frames[2]).max() == 0
    soundtrack = reader.soundtrack()
    assert abs(soundtrack.size - clip.soundtrack.size) < 0.15 * 16000  # codec priming and padding
    spectrum = np.abs(np.fft.rfft(soundtrack))
    assert abs(np.argmax(spectrum) * 16000 / soundtrack.size - {"circle": 440, "square": 660, "triangle": 880}[clip.sounding]) < 5


def test_video_without_audio_and_frame_folders(tmp_path, clip):
    write_video(tmp_path / "silent.mp4", clip.frames, clip.fps)
    silent = VideoReader(tmp_path / "silent.mp4")
    assert not silent.info.has_audio and silent.soundtrack() is None
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (0, 1, 2, 10, 11):  # numeric order, not lexicographic: 2 comes before 10
        Image.fromarray(clip.frames[index % 10]).save(folder / f"frame_{index}.png")
    reader = VideoReader(folder)
    assert reader.info.num_frames == 5
    assert [path.name for path in reader.frame_paths] == ["frame_0.png", "frame_1.png", "frame_2.png", "frame_10.png", "frame_11.png"]
    assert np.array_equal(np.asarray(reader.read([3])[0]), clip.frames[0])


@pytest.mark.parametrize(("suffix", "subtype"), [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS"), (".mp3", "MPEG_LAYER_III")])
def test_audio_files_are_mixed_to_mono_and_resampled_to_16k(tmp_path, suffix, subtype):
    rate = 44100
    t = np.arange(int(1.5 * rate)) / rate
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 500 * t), 0.2 * np.sin(2 * np.pi * 500 * t)], axis=1)
    path = tmp_path / f"sound{suffix}"
    soundfile.write(path, stereo, rate, subtype=subtype)
    waveform = decode_audio(path)
    assert waveform.dtype == np.float32
    assert abs(waveform.size - 24000) < 0.06 * 16000  # encoders may pad a few ms
    # the mean of the two channels is a 0.3-amplitude 500 Hz sine
    middle = waveform[4000:20000]
    assert abs(np.sqrt(2) * middle.std() - 0.3) < 0.03
    spectrum = np.abs(np.fft.rfft(middle))
    assert abs(np.argmax(spectrum) * 16000 / middle.size - 500) < 3


def test_wav_at_16k_is_read_exactly(tmp_path):
    samples = (tone(300.0, 1.0) * 32767).astype(np.int16)
    soundfile.write(tmp_path / "a.wav", samples, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(decode_audio(tmp_path / "a.wav"), samples.astype(np.float32) / 32768)


@pytest.mark.parametrize(("seconds", "tokens"), [(1, 25), (5, 125), (10, 250), (30, 750), (45, 750)])
def test_audio_token_counts(seconds, tokens):
    assert audio_token_count(seconds * 16000) == tokens


def test_bad_media_gets_one_clear_error(tmp_path, clip):
    with pytest.raises(OisaInputError, match="does not exist"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(OisaInputError, match="garbage.mp4 is not a readable media file"):
        VideoReader(tmp_path / "garbage.mp4")
    write_video(tmp_path / "good.mp4", clip.frames, clip.fps, clip.soundtrack)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(OisaInputError, match="truncated.mp4"):
        reader = VideoReader(tmp_path / "truncated.mp4")
        list(reader.iter_frames())
    soundfile.write(tmp_path / "only_audio.wav", tone(440, 1.0), 16000)
    with pytest.raises(OisaInputError, match="only_audio.wav has no video stream"):
        VideoReader(tmp_path / "only_audio.wav")
    write_video(tmp_path / "silent.mp4", clip.frames, clip.fps)
    with pytest.raises(OisaInputError, match="silent.mp4 has no audio stream"):
        decode_audio(tmp_path / "silent.mp4")
    (tmp_path / "image.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(OisaInputError, match="image.png is not a readable image"):
        load_image(tmp_path / "image.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OisaInputError, match="has no image files"):
        VideoReader(tmp_path / "empty")


def test_write_video_consumes_frames_one_at_a_time(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 24, 3), dtype=np.uint8)
    consumed = []

    def one_by_one():
        for index, frame in enumerate(frames):
            consumed.append(index)
            yield frame

    write_video(tmp_path / "streamed.mp4", one_by_one(), 5.0)
    assert consumed == list(range(5)) and VideoReader(tmp_path / "streamed.mp4").info.num_frames == 5
    with pytest.raises(ValueError, match="frame 2 is"):
        write_video(tmp_path / "bad.mp4", iter([frames[0], frames[1], frames[2, :8]]), 5.0)
