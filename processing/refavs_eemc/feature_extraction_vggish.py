"""
VGGish's log-mel front end, as VGGish's own `vggish_input.waveform_to_examples` (tensorflow/models
research/audioset/vggish, as vendored by harritaylor/torchvggish f3f9096) computes it:

* channels averaged to mono, then resampled to 16 kHz;
* magnitude STFT: 400-sample (25 ms) frames every 160 samples (10 ms), no padding at either end, a periodic Hann
  window, the frame zero-padded to a 512-point FFT;
* 64 mel bands between 125 and 7500 Hz: triangles on the HTK mel scale (1127 ln(1 + f / 700)), laid out in mel and
  unnormalised, applied to the magnitudes; then log(mel + 0.01);
* examples of 96 frames (0.96 s) every 96 frames, the incomplete tail dropped: a 10 s clip gives 10.

Differences: `waveform_to_examples` resamples with resampy (`kaiser_best`, float64); this extractor uses soxr at "HQ"
quality on float32, as the rest of the package does (`processing_oisa.media.resample_audio`). On 16 kHz input the two
agree to rounding; docs/refavs-eemc.md ("VGGish") gives the measured difference at other rates, up to 0.5 in the top
mel band from 44.1 kHz. A clip shorter than one example (0.975 s at 16 kHz) is refused here; `waveform_to_examples`
returns no example for it (and fails with a NumPy error below 15 ms).
"""

import math

import numpy as np
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank, window_function
from transformers.utils import TensorType

from ..media import OisaInputError, check_waveform, resample_audio


class VggishFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns one clip's waveform into VGGish's log-mel examples, `input_features` of shape (num_examples, 96, 64).

    Args:
        feature_size (`int`, *optional*, defaults to 64):
            Mel bands.
        sampling_rate (`int`, *optional*, defaults to 16000):
            Rate the waveform is resampled to before the STFT.
        padding_value (`float`, *optional*, defaults to 0.0):
            Unused (one clip at a time, never padded); kept for `SequenceFeatureExtractor`.
        window_length (`int`, *optional*, defaults to 400):
            STFT frame length in samples (25 ms); the FFT is the next power of two.
        hop_length (`int`, *optional*, defaults to 160):
            STFT hop in samples (10 ms).
        min_frequency, max_frequency (`float`, *optional*, defaults to 125.0 and 7500.0):
            Lower edge of the lowest and upper edge of the highest mel band, in Hz.
        log_offset (`float`, *optional*, defaults to 0.01):
            Added to the mel magnitudes before the logarithm.
        example_frames (`int`, *optional*, defaults to 96):
            STFT frames per example (0.96 s).
        example_hop_frames (`int`, *optional*, defaults to 96):
            STFT frames between the starts of two examples (no overlap).
    """

    model_input_names = ["input_features"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        window_length: int = 400,
        hop_length: int = 160,
        min_frequency: float = 125.0,
        max_frequency: float = 7500.0,
        log_offset: float = 0.01,
        example_frames: int = 96,
        example_hop_frames: int = 96,
        **kwargs,
    ):
        # one clip at a time, never padded: no attention mask
        kwargs.setdefault("return_attention_mask", False)
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.window_length = window_length
        self.hop_length = hop_length
        self.min_frequency = min_frequency
        self.max_frequency = max_frequency
        self.log_offset = log_offset
        self.example_frames = example_frames
        self.example_hop_frames = example_hop_frames
        # `window` and `mel_filters` are rebuilt from the fields above and left out of preprocessor_config.json
        self.window = window_function(window_length, "hann", periodic=True)
        self.mel_filters = mel_filter_bank(
            num_frequency_bins=self.fft_length // 2 + 1,
            num_mel_filters=feature_size,
            min_frequency=min_frequency,
            max_frequency=max_frequency,
            sampling_rate=sampling_rate,
            norm=None,
            mel_scale="htk",
            triangularize_in_mel_space=True,
        )

    @property
    def fft_length(self) -> int:
        """FFT size: the frame length rounded up to a power of two (512 for 400), as VGGish pads its frames."""
        return 2 ** math.ceil(math.log2(self.window_length))

    @property
    def min_num_samples(self) -> int:
        """Samples at `sampling_rate` that give one example (15,600 at 16 kHz: 0.975 s)."""
        return self.window_length + (self.example_frames - 1) * self.hop_length

    def log_mel_spectrogram(self, waveform: np.ndarray) -> np.ndarray:
        """A mono waveform at `sampling_rate` -> log-mel frames (num_frames, feature_size), float64 as VGGish's NumPy."""
        frames = np.lib.stride_tricks.sliding_window_view(waveform.astype(np.float64), self.window_length)
        frames = frames[:: self.hop_length]  # (num_frames, window_length)
        magnitudes = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length))
        return np.log(magnitudes @ self.mel_filters + self.log_offset)

    def _mono(self, raw_speech: np.ndarray | list[float], source: str) -> np.ndarray:
        """The clip as float32 mono: (samples,) as it is, (channels, samples) averaged over the channels."""
        if isinstance(raw_speech, (list, tuple)) and any(isinstance(item, np.ndarray) for item in raw_speech):
            raise OisaInputError(f"{source} is a list of arrays; give one clip, (samples,) or (channels, samples).")
        waveform = check_waveform(np.asarray(raw_speech), source)
        if waveform.ndim == 2:
            if waveform.shape[0] > waveform.shape[1]:
                raise OisaInputError(
                    f"{source} has shape {waveform.shape}: more channels than samples; a multi-channel waveform is "
                    "(channels, samples), transpose it."
                )
            waveform = waveform.mean(axis=0)
        return waveform

    def __call__(
        self,
        raw_speech: np.ndarray | list[float],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Log-mel examples of one clip.

        Args:
            raw_speech (`np.ndarray` or `list[float]`):
                The clip's float samples, (samples,) or (channels, samples); the channels are averaged.
            sampling_rate (`int`):
                Rate of `raw_speech` in Hz; any other than `self.sampling_rate` is resampled (soxr "HQ").
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for torch tensors, `"np"` or `None` for NumPy arrays.

        Returns:
            [`BatchFeature`] with `input_features` of shape (num_examples, example_frames, feature_size), float32:
            one example per whole `example_frames * hop_length / sampling_rate` seconds (0.96 s), the rest dropped.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; this extractor takes one clip, unpadded.")
        if sampling_rate is None:
            raise ValueError(
                f"Give the `sampling_rate` of `raw_speech`; {type(self).__name__} resamples it to {self.sampling_rate} Hz."
            )
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
            raise ValueError(f"`sampling_rate` must be a positive integer (Hz); got {sampling_rate!r}.")
        waveform = resample_audio(self._mono(raw_speech, "The waveform"), int(sampling_rate), self.sampling_rate)
        if waveform.size < self.min_num_samples:
            raise OisaInputError(
                f"The waveform is too short for VGGish: {waveform.size} samples at {self.sampling_rate} Hz, and one "
                f"{self.example_frames * self.hop_length / self.sampling_rate:g} s example needs "
                f"{self.min_num_samples} ({self.min_num_samples / self.sampling_rate:.3f} s)."
            )
        log_mel = self.log_mel_spectrogram(waveform)
        # (num_frames, bands) -> (num_examples, bands, example_frames) -> (num_examples, example_frames, bands)
        examples = np.lib.stride_tricks.sliding_window_view(log_mel, self.example_frames, axis=0)
        examples = examples[:: self.example_hop_frames].transpose(0, 2, 1)
        return BatchFeature({"input_features": examples.astype(np.float32)}, tensor_type=return_tensors)
