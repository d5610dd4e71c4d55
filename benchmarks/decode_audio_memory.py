"""
Peak memory of `decode_audio` on a long soundtrack: the whole file against only the 30 s the processor uses
(`max_seconds=30`). Each decode runs in a fresh process; its peak RSS (`ru_maxrss`) is read before and after.

    python benchmarks/decode_audio_memory.py --minutes 20
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np


CHILD = """
import json, resource, sys, time
from processing_oisa.media import decode_audio
max_seconds = None if sys.argv[2] == "none" else float(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
waveform = decode_audio(sys.argv[1], max_seconds=max_seconds)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"samples": waveform.size, "seconds": seconds, "before_kib": before, "after_kib": after}))
"""


def write_soundtrack(path: Path, minutes: float, rate: int = 48000) -> None:
    """`minutes` of stereo tones (440 Hz left, 660 Hz right) at `rate`, AAC in an mp4 audio file."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "stereo"
        converter = av.AudioResampler(
            format=stream.codec_context.format.name, layout="stereo", rate=rate, frame_size=stream.codec_context.frame_size
        )
        chunk = 10 * rate
        for start in range(0, int(minutes * 60 * rate), chunk):
            t = np.arange(start, start + chunk) / rate
            samples = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(np.float32) * 0.3
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
            frame.sample_rate = rate
            for converted in converter.resample(frame):
                container.mux(stream.encode(converted))
        for converted in converter.resample(None):
            container.mux(stream.encode(converted))
        container.mux(stream.encode())


def measure(path: Path, max_seconds: float | None) -> dict:
    argument = "none" if max_seconds is None else str(max_seconds)
    output = subprocess.run([sys.executable, "-c", CHILD, str(path), argument], check=True, capture_output=True, text=True)
    return json.loads(output.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "soundtrack.m4a"
        write_soundtrack(path, args.minutes)
        print(f"{args.minutes:g} min, 48 kHz stereo AAC ({path.stat().st_size / 2**20:.1f} MiB on disk)")
        results = {"whole file": measure(path, None), "max_seconds=30": measure(path, 30.0)}
    baseline = results["whole file"]["after_kib"] - results["whole file"]["before_kib"]
    print("| decode | samples at 16 kHz | seconds | peak RSS above imports MiB | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, result in results.items():
        above = result["after_kib"] - result["before_kib"]
        print(f"| {name} | {result['samples']} | {result['seconds']:.2f} | {above / 1024:.0f} | {above / baseline:.3f} |")


if __name__ == "__main__":
    main()
