"""
VGGish's log-mel front end (`VggishFeatureExtractor`) against an independent NumPy implementation of AudioSet's
`mel_features` recipe (itself checked against librosa's STFT), example counts, resampling, channels and bad input.
"""

import librosa
import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor

from processing_oisa.media import OisaInputError, resample_audio
from processing_oisa.refavs_eemc import VggishFeatureExtractor


RATE = 16000
# largest log-mel difference allowed in the bands of two tones between a recording resampled to 16 kHz and one made
# at 16 kHz (measured: 2e-6 from 8, 22.05, 44.1 and 48 kHz)
TONE_TOLERANCE = 1e-4


def htk_mel(hertz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + hertz / 700.0)


def reference_magnitudes(waveform: np.ndarray) -> np.ndarray:
    """|rfft| of 400-sample frames every 160 samples, periodic Hann, zero-padded to 512 points (frames, 257)."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    starts = range(0, waveform.size - 400 + 1, 160)
    return np.abs(np.fft.rfft(np.stack([waveform[start : start + 400] * window for start in starts]), 512))


def reference_mel_matrix() -> np.ndarray:
    """(257, 64): triangles on the HTK mel scale between 125 and 7500 Hz, as AudioSet's `spectrogram_to_mel_matrix`."""
    bins_mel = htk_mel(np.linspace(0.0, RATE / 2, 257))
    edges = np.linspace(htk_mel(125.0), htk_mel(7500.0), 64 + 2)
    matrix = np.zeros((257, 64))
    for band in range(64):
        lower, center, upper = edges[band : band + 3]
        rising = (bins_mel - lower) / (center - lower)
        falling = (upper - bins_mel) / (upper - center)
        matrix[:, band] = np.maximum(0.0, np.minimum(rising, falling))
    matrix[0] = 0.0
    return matrix


def reference_examples(waveform: np.ndarray) -> np.ndarray:
    """`vggish_input.waveform_to_examples` of a 16 kHz mono waveform: (examples, 96, 64)."""
    log_mel = np.log(reference_magnitudes(waveform.astype(np.float64)) @ reference_mel_matrix() + 0.01)
    count = (log_mel.shape[0] - 96) // 96 + 1
    return np.stack([log_mel[96 * index : 96 * (index + 1)] for index in range(count)])


def tone_signal(seconds: float, rate: int = RATE, seed: int | None = 0) -> np.ndarray:
    """Two tones (440 Hz, 3 kHz) and, with a `seed`, some noise; float32."""
    time = np.arange(int(round(seconds * rate))) / rate
    tones = 0.3 * np.sin(2 * np.pi * 440 * time) + 0.2 * np.sin(2 * np.pi * 3000 * time)
    noise = 0.0 if seed is None else 0.05 * np.random.default_rng(seed).standard_normal(time.size)
    return (tones + noise).astype(np.float32)


@pytest.fixture(scope="module")
def extractor():
    return VggishFeatureExtractor()


def test_reference_stft_agrees_with_librosa():
    # librosa centres the 400-sample window in its 512-sample frame: its frame k is VGGish's frame k of the waveform
    # shifted by 56 samples (VGGish's frames need 112 samples less, so it may have one more at the end)
    waveform = tone_signal(1.0).astype(np.float64)
    theirs = np.abs(librosa.stft(waveform, n_fft=512, hop_length=160, win_length=400, window="hann", center=False)).T
    ours = reference_magnitudes(waveform[56:])[: len(theirs)]
    assert theirs.shape == (97, 257)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_log_mel_examples_equal_the_independent_computation(extractor):
    waveform = tone_signal(10.0)
    features = extractor(waveform, sampling_rate=RATE)["input_features"]
    expected = reference_examples(waveform)
    assert features.shape == expected.shape == (10, 96, 64) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(extractor.mel_filters, reference_mel_matrix(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("num_samples", "num_examples"),
    [(15_600, 1), (16_000, 1), (30_959, 1), (30_960, 2), (158_400, 10), (160_000, 10), (168_000, 10)],
)
def test_examples_are_whole_096_second_windows(extractor, num_samples, num_examples):
    # one example needs 400 + 95 * 160 samples; the incomplete tail is dropped, never padded
    features = extractor(np.full(num_samples, 0.1, np.float32), sampling_rate=RATE, return_tensors="pt")
    assert isinstance(features["input_features"], torch.Tensor)
    assert features["input_features"].shape == (num_examples, 96, 64)


def test_too_short_clips_are_refused(extractor):
    # the original returns no example from 240 to 15,599 samples (and a NumPy error below)
    for num_samples in (1, 239, 15_599):
        with pytest.raises(OisaInputError, match=f"{num_samples} samples at 16000 Hz.*needs 15600"):
            extractor(np.full(num_samples, 0.1, np.float32), sampling_rate=RATE)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_are_resampled_with_soxr(extractor, rate):
    waveform = tone_signal(10.0, rate)
    features = extractor(waveform, sampling_rate=rate)["input_features"]
    resampled = resample_audio(waveform, rate, RATE)
    np.testing.assert_allclose(features, reference_examples(resampled), rtol=0, atol=2e-6)
    # and the tones recorded at that rate give the log-mel of the same tones recorded at 16 kHz
    resampled_tones = extractor(tone_signal(10.0, rate, seed=None), sampling_rate=rate)["input_features"]
    native_tones = extractor(tone_signal(10.0, seed=None), sampling_rate=RATE)["input_features"]
    loud = native_tones > 0.0  # the bands of the tones
    assert np.abs(resampled_tones - native_tones)[loud].max() < TONE_TOLERANCE


def test_channels_are_averaged(extractor):
    left, right = tone_signal(2.0, seed=1), tone_signal(2.0, seed=2)
    stereo = extractor(np.stack([left, right]), sampling_rate=RATE)["input_features"]
    mono = extractor((left + right) / 2, sampling_rate=RATE)["input_features"]
    np.testing.assert_allclose(stereo, mono, rtol=0, atol=1e-6)
    as_list = extractor(left.tolist(), sampling_rate=RATE)["input_features"]
    np.testing.assert_array_equal(as_list, extractor(left, sampling_rate=RATE)["input_features"])


@pytest.mark.parametrize(
    ("raw_speech", "sampling_rate", "error", "message"),
    [
        (np.full(20_000, np.nan, np.float32), RATE, OisaInputError, "non-finite"),
        (np.zeros(0, np.float32), RATE, OisaInputError, "no audio samples"),
        (np.zeros(20_000, np.int16), RATE, OisaInputError, "integer samples"),
        (np.zeros((20_000, 2), np.float32), RATE, OisaInputError, r"\(channels, samples\), transpose it"),
        (np.zeros((1, 2, 20_000), np.float32), RATE, OisaInputError, "has shape"),
        ([np.zeros(20_000, np.float32)] * 2, RATE, OisaInputError, "one clip"),
        (np.zeros(20_000, np.float32), None, ValueError, "sampling_rate"),
        (np.zeros(20_000, np.float32), 0, ValueError, "positive integer"),
        (np.zeros(20_000, np.float32), 16000.5, ValueError, "positive integer"),
    ],
)
def test_bad_input_is_refused(extractor, raw_speech, sampling_rate, error, message):
    with pytest.raises(error, match=message):
        extractor(raw_speech, sampling_rate=sampling_rate)


def test_saved_and_loaded_with_auto_feature_extractor(extractor, tmp_path):
    extractor.save_pretrained(tmp_path)
    saved = (tmp_path / "preprocessor_config.json").read_text()
    assert '"feature_extractor_type": "VggishFeatureExtractor"' in saved and "mel_filters" not in saved
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(loaded, VggishFeatureExtractor)
    waveform = tone_signal(3.0)
    np.testing.assert_array_equal(
        loaded(waveform, sampling_rate=RATE)["input_features"],
        extractor(waveform, sampling_rate=RATE)["input_features"],
    )
