"""
The web demo of `oisa app` and of a Space's `app.py`: a gradio page that segments an uploaded video for an expression.

It reads only the files gradio received as uploads (or the examples it made) and deletes the uploads when their
request ends; a video stays decoded in memory, so that later expressions about it need neither its file nor, for the
last video, its features again. Import it only after `GRADIO_TEMP_DIR` is set (`oisa_cli.app` does): gradio reads it
on import.
"""

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

import av
import gradio as gr
import numpy as np
import pandas as pd
import soundfile
from gradio.utils import get_upload_folder

from modeling_oisa import MissingCheckpointError, OisaCheckpointError
from processing_oisa.data.synthetic import SPEECH_PROGRAM
from processing_oisa.media import SAMPLING_RATE, OisaInputError, VideoReader, write_video
from processing_oisa.processing_oisa import MAX_AUDIO_SECONDS, OisaExpression
from processing_oisa.segmenter import OisaEncodedVideo, OisaVideoSegmenter

from .demo_segmentation import demo_cases, demo_clip
from .segmentation_files import write_segmentation


logger = logging.getLogger(__name__)

# a request's outputs (overlay, masks.zip, result.json) are served for this long, then deleted
OUTPUT_LIFETIME_SECONDS = 600
# decoded videos kept for later expressions, oldest dropped first; the newest is always kept
DECODED_VIDEOS_BYTES = 2 << 30
INPUT_ERRORS = (OisaInputError, OisaCheckpointError, MissingCheckpointError)
EXAMPLE_CLIP = Path(__file__).resolve().parents[1] / "examples" / "shapes.mp4"


def browser_video_format() -> tuple[str, str]:
    """The overlay's file name and encoder: H.264 in mp4 where this PyAV build encodes it, else VP9 in webm."""
    try:
        av.codec.Codec("libx264", "w")
    except av.codec.codec.UnknownCodecError:
        return "overlay.webm", "libvpx-vp9"
    return "overlay.mp4", "libx264"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class DecodedVideo:
    """An uploaded video decoded into memory: its content hash, its frames (with the source's frame times) and sound."""

    sha256: str
    reader: VideoReader
    soundtrack: np.ndarray | None
    num_bytes: int


class OisaWebApp:
    """
    The demo's request handler and page. One segmenter serves every request, one at a time (gradio's queue); the
    last video's features and the recently decoded videos are kept, so that a second expression about a video costs
    only the model's answer and the mask head.
    """

    def __init__(self, segmenter: OisaVideoSegmenter, model_name: str, workspace: Path, max_frames: int = 300):
        self.segmenter = segmenter
        self.model_name = model_name
        self.max_frames = max_frames
        self.files_dir = Path(get_upload_folder()).resolve()
        self.outputs_dir = self.files_dir / "outputs"
        self.requests_dir = workspace / "requests"
        self.examples_dir = workspace / "examples"
        for folder in (self.outputs_dir, self.requests_dir, self.examples_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.overlay_name, self.overlay_codec = browser_video_format()
        self.decoded: OrderedDict[str, DecodedVideo] = OrderedDict()
        self.encoded: tuple[str, OisaEncodedVideo] | None = None

    def make_examples(self) -> list[list]:
        """
        Writes the examples (the demo clip of `oisa demo` with its sound, image and, with espeak-ng, speech; the
        repository's examples/shapes.mp4 where it is there) and returns their rows of inputs.
        """
        clip = demo_clip(seed=0)
        clip_path = self.examples_dir / "demo-clip.mp4"
        write_video(clip_path, clip.frames, clip.fps, audio=clip.soundtrack, sampling_rate=SAMPLING_RATE)
        speech_dir = self.examples_dir if shutil.which(SPEECH_PROGRAM) else None
        rows = []
        for number, case in enumerate(demo_cases(clip, speech_dir)):
            expression = case.expression
            sound = image = None
            if expression.sound is not None:
                sound = self.examples_dir / f"sound-{number}.wav"
                soundfile.write(sound, expression.sound, SAMPLING_RATE)
            if expression.image is not None:
                image = self.examples_dir / f"image-{number}.png"
                expression.image.save(image)
            rows.append([clip_path, expression.text, expression.speech, sound, image, False])
        if EXAMPLE_CLIP.is_file():
            shutil.copy(EXAMPLE_CLIP, self.examples_dir / EXAMPLE_CLIP.name)
            rows.append(
                [self.examples_dir / EXAMPLE_CLIP.name, "the shape that is making a sound", None, None, None, True]
            )
        return [[str(value) if isinstance(value, Path) else value for value in row] for row in rows]

    def build(self) -> gr.Blocks:
        """The page: inputs on the left, outputs on the right, the examples below; requests queue one at a time."""
        gr.set_static_paths([self.examples_dir])
        with gr.Blocks(title="OISA", analytics_enabled=False, delete_cache=(60, OUTPUT_LIFETIME_SECONDS)) as page:
            gr.Markdown(
                "# OISA: segment what an expression refers to in a video\n"
                f"Model: `{self.model_name}`. Upload a video or pick an example, give the expression as text or as "
                "speech (recorded or uploaded), optionally with a sound (`<audio>` in the text) and a reference image "
                "(`<image>`), and press Segment. Requests run one at a time: while another runs, yours waits and its "
                "place in the queue shows above the outputs. Uploads are deleted when their request ends, outputs "
                f"after {OUTPUT_LIFETIME_SECONDS // 60} minutes; videos of up to {self.max_frames} frames."
            )
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                    text = gr.Textbox(label="Expression (text)", placeholder="the red circle", elem_id="text")
                    speech = gr.Audio(
                        label="Expression (speech), instead of text",
                        sources=["microphone", "upload"],
                        type="filepath",
                    )
                    with gr.Accordion("Part of the expression: a sound, a reference image", open=False):
                        sound = gr.Audio(label="Sound (<audio>)", sources=["upload"], type="filepath")
                        image = gr.Image(label="Reference image (<image>)", sources=["upload"], type="filepath")
                    explain = gr.Checkbox(label="Explain the answer")
                    button = gr.Button("Segment", variant="primary", elem_id="segment")
                with gr.Column():
                    answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                    explanation = gr.Textbox(label="Explanation", interactive=False)
                    overlay = gr.Video(
                        label="Masks on the video", interactive=False, autoplay=True, loop=True, elem_id="overlay"
                    )
                    presence = gr.LinePlot(
                        x="time", y="presence", x_title="time (s)", y_lim=[0, 1], label="Per-frame presence", height=200
                    )
                    masks = gr.File(label="Masks (zip of PNGs, one per frame)")
                    result = gr.File(label="result.json")
            inputs = [video, text, speech, sound, image, explain]
            gr.Examples(examples=self.make_examples(), inputs=inputs, cache_examples=False)
            # preprocess=False: the handler gets the uploads' paths as gradio received them, no converted copies
            button.click(
                self.segment,
                inputs=inputs,
                outputs=[answer, explanation, overlay, presence, masks, result],
                api_name="segment",
                preprocess=False,
            )
        page.queue(default_concurrency_limit=1)
        return page

    def segment(self, video, text, speech, sound, image, explain, progress=gr.Progress()):
        """
        One request: the uploads (gradio's file payloads) and the text, to the answer, its explanation, the overlay,
        the presence plot, masks.zip and result.json. Bad input raises gr.Error with the command line's message.
        """
        started = time.perf_counter()
        logger.info("oisa app: a request started")
        payloads = {"Video": video, "Speech": speech, "Sound": sound, "Image": image}
        paths = [Path(payload["path"]).resolve() for payload in payloads.values() if payload and payload.get("path")]
        try:
            uploads = {label: self._input_path(payload, label) for label, payload in payloads.items()}
            return self._segment(uploads, text, bool(explain), progress)
        except INPUT_ERRORS as error:
            raise gr.Error(self._public_message(str(error), paths), print_exception=False) from None
        except Exception as error:
            logger.exception("oisa app: the request failed")
            message = f"The request failed: {type(error).__name__}: {error}"
            raise gr.Error(self._public_message(message, paths), print_exception=False) from None
        finally:
            self._delete_uploads(paths)
            logger.info("oisa app: the request ended after %.2f s", time.perf_counter() - started)

    def _segment(self, uploads: dict, text: str | None, explain: bool, progress: gr.Progress):
        if uploads["Video"] is None:
            raise OisaInputError("No video: upload one or pick an example.")
        # a blank text box beside speech is no text; alone it is an empty expression, refused
        words = text if text is not None and (text.strip() or uploads["Speech"] is None) else None
        expression = OisaExpression(
            text=words, speech=uploads["Speech"], sound=uploads["Sound"], image=uploads["Image"], explain=explain
        )
        expression.type  # neither text nor speech, or both: refused before any work
        progress(0.0, desc="decoding the video")
        video = self._decoded_video(uploads["Video"])
        progress(0.1, desc="encoding the video's frames")
        encoded = self._encoded_video(video)
        self._delete_old_outputs()
        out = self.outputs_dir / uuid.uuid4().hex
        with tempfile.TemporaryDirectory(dir=self.requests_dir) as work:
            work = Path(work)
            progress(0.2, desc="the model: answering")
            result = write_segmentation(
                self.segmenter,
                encoded,
                expression,
                work,
                video_name=uploads["Video"].name,
                model_name=self.model_name,
                soundtrack=video.soundtrack,
                progress=lambda done, total: progress((done, total), desc="segmenting, writing the overlay"),
                overlay_name=self.overlay_name,
                overlay_codec=self.overlay_codec,
            )
            progress(0.95, desc="zipping the masks")
            out.mkdir()
            shutil.move(work / self.overlay_name, out / self.overlay_name)
            shutil.move(work / "result.json", out / "result.json")
            with zipfile.ZipFile(out / "masks.zip", "w") as archive:
                for mask in sorted((work / "masks").iterdir()):
                    archive.write(mask, f"masks/{mask.name}")
        plot = pd.DataFrame({"time": result.timestamps, "presence": result.presence_scores})
        return (
            result.answer,
            result.explanation,
            str(out / self.overlay_name),
            plot,
            str(out / "masks.zip"),
            str(out / "result.json"),
        )

    def _input_path(self, payload: dict | None, label: str) -> Path | None:
        """The path of an upload or example gradio passed; any other path (one a client made up) is refused."""
        if payload is None:
            return None
        if not payload.get("path"):
            raise OisaInputError(f"{label}: not a file uploaded to this app.")
        path = Path(payload["path"]).resolve()
        if not (self._is_upload(path) or path.is_relative_to(self.examples_dir)):
            raise OisaInputError(f"{label} {path.name}: not a file uploaded to this app.")
        return path

    def _is_upload(self, path: Path) -> bool:
        """Whether `path` is in gradio's upload folder, outside the outputs the app serves from there."""
        return path.is_relative_to(self.files_dir) and not path.is_relative_to(self.outputs_dir)

    def _decoded_video(self, path: Path) -> DecodedVideo:
        """
        The video at `path`, decoded into memory once: a request about a video that an earlier request decoded
        reuses it, even though that request deleted the upload.
        """
        known = self.decoded.get(str(path))
        if known is not None and (not path.exists() or file_sha256(path) == known.sha256):
            self.decoded.move_to_end(str(path))
            return known
        if not path.exists():
            raise OisaInputError(f"Video {path.name} was deleted after an earlier request; upload it again.")
        reader = VideoReader(path)
        info = reader.info
        if info.num_frames > self.max_frames:
            raise OisaInputError(
                f"Video {path} has {info.num_frames} frames; this app takes at most {self.max_frames} (--max-frames)."
            )
        frames = reader.read(range(info.num_frames))
        in_memory = VideoReader.from_frames(frames)
        # the source's frame times; its sound is kept beside the frames
        in_memory.info = dataclasses.replace(info, has_audio=False)
        decoded = DecodedVideo(
            file_sha256(path),
            in_memory,
            reader.soundtrack(max_seconds=MAX_AUDIO_SECONDS),
            info.num_frames * info.height * info.width * 3,
        )
        self.decoded[str(path)] = decoded
        while sum(video.num_bytes for video in self.decoded.values()) > DECODED_VIDEOS_BYTES and len(self.decoded) > 1:
            self.decoded.popitem(last=False)
        return decoded

    def _encoded_video(self, video: DecodedVideo) -> OisaEncodedVideo:
        """The video's frames and features: the last video's are kept, so a second expression about it reuses them."""
        if self.encoded is None or self.encoded[0] != video.sha256:
            self.encoded = None
            self.encoded = (video.sha256, self.segmenter.encode_video(video.reader))
        return self.encoded[1]

    def _delete_uploads(self, paths: list[Path]) -> None:
        """Deletes the request's uploads, with the folder gradio made for each; the examples and outputs stay."""
        for path in paths:
            if not self._is_upload(path) or not path.is_file():
                continue
            path.unlink(missing_ok=True)
            if path.parent != self.files_dir:
                # another request may hold a file of the same content there, or have removed the folder already
                with contextlib.suppress(OSError):
                    path.parent.rmdir()

    def _delete_old_outputs(self) -> None:
        for folder in self.outputs_dir.iterdir():
            if time.time() - folder.stat().st_mtime > OUTPUT_LIFETIME_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _public_message(message: str, paths: list[Path]) -> str:
        """The message with each upload named by its file name, not by where the server keeps it."""
        for path in paths:
            message = message.replace(str(path), path.name)
        return message


def launch_app(
    segmenter: OisaVideoSegmenter,
    model_name: str,
    workspace: Path,
    host: str | None = None,
    port: int | None = None,
    max_frames: int = 300,
    max_file_size: str = "200mb",
) -> None:
    """Serves the demo until interrupted; host and port default to gradio's (GRADIO_SERVER_NAME / _PORT, on Spaces)."""
    page = OisaWebApp(segmenter, model_name, workspace, max_frames).build()
    page.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_file_size,
        run_history=False,
        footer_links=["api"],
        show_error=False,
    )
