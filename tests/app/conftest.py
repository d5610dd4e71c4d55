"""The web demo started as a Space starts it (`python app.py`) on a free localhost port, in a temporary folder."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from oisa_cli.demo_segmentation import demo_clip
from processing_oisa.media import SAMPLING_RATE, write_video


REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 180


@dataclass
class AppServer:
    url: str
    workspace: Path
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="package")
def app_server(tmp_path_factory):
    """
    The app serving oisa-tiny-synthetic in float32 (the same numbers on every CPU); its temporary files go under this
    test's folder, and the server must remove them when it is terminated.
    """
    pytest.importorskip("gradio", reason="the web demo needs the demo extra: pip install -e '.[demo]'")
    root = tmp_path_factory.mktemp("app")
    log = root / "server.log"
    port = free_port()
    environment = {**os.environ, "TMPDIR": str(root), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--dtype", "float32"]
    with open(log, "w") as output:
        server = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if server.poll() is not None:
            pytest.fail(f"the app exited with code {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            pytest.fail(f"the app did not serve its page within {STARTUP_SECONDS} s:\n{log.read_text()}")
        time.sleep(0.5)
    (workspace,) = root.glob("oisa-app-*")
    yield AppServer(url, workspace, log)
    server.terminate()
    server.wait(timeout=60)
    assert not workspace.exists(), f"the app left {workspace} behind"


@pytest.fixture(scope="package")
def demo_clip_path(tmp_path_factory) -> Path:
    """The demo clip of `oisa demo` (8 frames of 96x128, a red circle, a green square sounding, a blue triangle)."""
    clip = demo_clip(seed=0)
    path = tmp_path_factory.mktemp("clip") / "demo-clip.mp4"
    write_video(path, clip.frames, clip.fps, audio=clip.soundtrack, sampling_rate=SAMPLING_RATE)
    return path
