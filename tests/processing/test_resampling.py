"""Audio reaches 16 kHz exactly as the original's `librosa.load(path, sr=16000)` brings it there (soxr "HQ")."""

import av
import librosa
import numpy as np
import pytest
import soundfile

from oisa_tiny import build_tiny_tokenizer
from processing_oisa import OisaProcessor, VideoReader, decode_audio, write_video
from processing_oisa.media import resample_audio
from processing_oisa.processing_oisa import make_feature_extractor, make_image_processor, make_video_processor


RATES = [8000, 22050, 44100, 48000]
WAVEFORM_TOL = 1e-5
LOG_MEL_TOL = 1e-4
FRAMES = np.zeros((4, 32, 32, 3), dtype=np.uint8)


def chirp_and_noise(rate: int, channels: int, seconds: float = 3.0) -> np.ndarray:
    """(samples, channels): a chirp from 100 Hz to the Nyquist rate plus white noise, louder in the first channel."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (100 * t + (rate / 2 - 100) / (2 * seconds) * t**2))
    noise = np.random.default_rng(rate).standard_normal((t.size, channels))
    return chirp[:, None] * np.linspace(1.0, 0.5, channels) + 0.05 * noise


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tiny_tokenizer()
    return OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(), tokenizer,
                         num_image_tokens=64)


def log_mel(processor: OisaProcessor, soundtrack) -> np.ndarray:
    """The processor's Whisper log-mel of a soundtrack (a file it decodes itself, or a 16 kHz waveform)."""
    encoding = processor(text="the dog", videos=list(FRAMES), audio=soundtrack)
    return encoding["input_features"][0].numpy()


def assert_same_audio(processor, soundtrack, ours: np.ndarray, reference: np.ndarray) -> None:
    """Our 16 kHz waveform and the processor's log-mel of `soundtrack` (a file or our waveform) against librosa's."""
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= WAVEFORM_TOL
    assert np.abs(log_mel(processor, soundtrack) - log_mel(processor, reference)).max() <= LOG_MEL_TOL


# wav and flac decode to the same samples in libsndfile and FFmpeg, and Vorbis nearly so (FFmpeg has its own decoder,
# libsndfile uses libvorbis: measured 1e-7 at most on these clips, 5e-5 in the log-mel)
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize(("suffix", "subtype"), [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_audio_files_resample_as_librosa_load(tmp_path, processor, suffix, subtype, rate, channels):
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, chirp_and_noise(rate, channels), rate, subtype=subtype)
    reference = librosa.load(path, sr=16000, mono=True)[0]
    ours = decode_audio(path)
    assert_same_audio(processor, path, ours, reference)


@pytest.mark.parametrize("rate", RATES)
def test_mp3_differs_from_librosa_load_only_by_its_decoder(tmp_path, rate):
    # librosa reads MP3 through libsndfile's mpg123, we through FFmpeg's decoder: they differ by a few 1e-6 at the
    # file's rate (up to 1e-3 in the log-mel of these clips). Resampling librosa's own samples gives librosa's result.
    path = tmp_path / "clip.mp3"
    soundfile.write(path, chirp_and_noise(rate, 2), rate, subtype="MPEG_LAYER_III")
    reference = librosa.load(path, sr=16000, mono=True)[0]
    theirs_native = librosa.load(path, sr=None, mono=True)[0]
    ours_native = decode_audio(path, sampling_rate=rate)
    assert ours_native.shape == theirs_native.shape
    assert np.abs(ours_native - theirs_native).max() <= WAVEFORM_TOL
    np.testing.assert_array_equal(resample_audio(theirs_native, rate), reference)
    assert np.abs(decode_audio(path) - reference).max() <= WAVEFORM_TOL


def decode_track(path) -> tuple[np.ndarray, int]:
    """A video's audio track as PyAV's AAC decoder gives it, (channels, samples) float32 at the track's own rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        assert {frame.format.name for frame in frames} == {"fltp"}
        return np.concatenate([frame.to_ndarray() for frame in frames], axis=1), stream.rate


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [44100, 48000])
def test_video_soundtracks_resample_as_librosa(tmp_path, processor, rate, channels):
    # librosa cannot open mp4 here: the reference is librosa's mono mix and resampler on the track decoded by PyAV
    path = tmp_path / "clip.mp4"
    write_video(path, FRAMES, 2.0, chirp_and_noise(rate, channels, seconds=2.0).T, sampling_rate=rate)
    decoded, track_rate = decode_track(path)
    assert (decoded.shape[0], track_rate) == (channels, rate)
    reference = librosa.resample(librosa.to_mono(decoded), orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    soundtrack = VideoReader(path).soundtrack()
    assert_same_audio(processor, soundtrack, soundtrack, reference)
