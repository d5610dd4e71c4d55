"""
Start-up time and memory of the web demo (`python app.py`, the Space's entry point) with the shipped model: seconds
from launch to the first served page, the server's resident memory (RSS) once idle, after one request (the demo clip,
a text expression) and at its peak, and how long that request and a second expression about the same video took.

    python benchmarks/app_startup.py [--runs 3] [--model oisa-tiny-synthetic] [--dtype float32]

Each run starts a fresh server on a free localhost port in its own temporary folder; Linux only (reads /proc).
"""

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file

from oisa_cli.demo_segmentation import demo_clip
from processing_oisa.media import SAMPLING_RATE, write_video


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def one_run(model: str, dtype: str, clip: Path, work: Path) -> dict[str, float]:
    port = free_port()
    environment = {**os.environ, "TMPDIR": str(work), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO / "app.py"), "--model", model, "--dtype", dtype, "--port", str(port)]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the app exited with code {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        startup = time.perf_counter() - started
        time.sleep(2.0)  # let the server settle before reading its idle memory
        idle = memory_mib(server.pid)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False, download_files=work)
        timings = []
        for text in ("the red circle", "the green square"):
            request_started = time.perf_counter()
            client.predict(handle_file(str(clip)), text, None, None, None, False, api_name="/segment")
            timings.append(time.perf_counter() - request_started)
        after = memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "startup_s": startup,
        "idle_rss_mib": idle["VmRSS"],
        "after_rss_mib": after["VmRSS"],
        "peak_rss_mib": after["VmHWM"],
        "first_request_s": timings[0],
        "second_request_s": timings[1],
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="oisa-tiny-synthetic")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="oisa-app-startup-") as work:
        work = Path(work)
        clip = demo_clip(seed=0)
        clip_path = work / "demo-clip.mp4"
        write_video(clip_path, clip.frames, clip.fps, audio=clip.soundtrack, sampling_rate=SAMPLING_RATE)
        runs = [one_run(args.model, args.dtype, clip_path, work) for _ in range(args.runs)]

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {args.model} in {args.dtype}; {args.runs} runs")
    print("| measure | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for name in runs[0]:
        values = [run[name] for run in runs]
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
