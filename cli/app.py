"""`oisa app`: the web demo (gradio) on a local port; a Space's `app.py` runs the same."""

import argparse
import gc
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .segment import add_device_arguments, check_device_argument


HELP = "serve the web demo: upload a video, give an expression, watch the masks (needs the demo extra)"
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="oisa-tiny-synthetic", help="checkpoint folder, Hub id or oisa-tiny-synthetic (the default)"
    )
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument(
        "--host", help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 for the network)"
    )
    add_device_arguments(parser)
    parser.add_argument("--max-frames", type=int, default=300, help="longest video taken, in frames (default: 300)")
    parser.add_argument("--max-new-tokens", type=int, default=100)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses, before the model loads, arguments the server could not use."""
    from processing_oisa.media import OisaInputError

    if args.port is not None and not 1 <= args.port <= 65535:
        raise OisaInputError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("max_frames", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise OisaInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_device_argument(args.device)


def run(args: argparse.Namespace) -> int:
    from modeling_oisa.allocator import reuse_freed_memory
    from processing_oisa.segmenter import OisaVideoSegmenter

    check_arguments(args)
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit('oisa app: the web demo needs gradio, which the demo extra installs: pip install -e ".[demo]"')
    reuse_freed_memory()
    segmenter = OisaVideoSegmenter.from_pretrained(
        args.model, args.device, args.dtype, max_new_tokens=args.max_new_tokens
    )
    # the modules and the model live as long as the server: the garbage collector leaves them out of its passes
    gc.freeze()
    # gradio's own requests to itself are no news
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # uploads, served outputs, examples and each request's scratch files live here, removed at exit
    workspace = Path(tempfile.mkdtemp(prefix="oisa-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / "files")
    # a terminated server (a Space restarting, a test ending) leaves through the `finally` below
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        # gradio reads GRADIO_TEMP_DIR when it is imported
        from .web_app import launch_app

        logger.info("serving %s; files in %s until the server stops", args.model, workspace)
        launch_app(segmenter, args.model, workspace, host=args.host, port=args.port, max_frames=args.max_frames)
    except KeyboardInterrupt:
        logger.info("oisa app: stopped")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return 0
