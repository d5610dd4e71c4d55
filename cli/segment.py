"""`oisa segment`: masks, an overlay video, a contact sheet and result.json for one expression on one video."""

import argparse
import json
import logging
from pathlib import Path


HELP = "segment what an expression refers to in a video"
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="video file (mp4, mkv, webm, avi...) or folder of frames")
    parser.add_argument("--text", help="text expression; mark a sound with <audio> and an image with <image>")
    parser.add_argument("--speech", type=Path, help="spoken expression (any audio file)")
    parser.add_argument("--sound", type=Path, help="a sound that is part of the expression")
    parser.add_argument("--image", type=Path, help="an image that is part of the expression")
    parser.add_argument("--explain", action="store_true", help="ask the model to explain its answer")
    parser.add_argument("--soundtrack", type=Path, help="the video's audio as a separate file (default: its own)")
    parser.add_argument(
        "--model", help="checkpoint folder, Hub id or oisa-tiny-synthetic (the default)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on GPUs and on CPUs with bfloat16 matrix units (AMX, avx512_bf16), float32 elsewhere",
    )
    parser.add_argument("--chunk-size", type=int, default=8, help="frames through the mask head at once")
    parser.add_argument("--max-new-tokens", type=int, default=100)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses, before any model work, arguments that would fail later or answer garbage."""
    import torch

    from processing_oisa.media import OisaInputError

    if args.out.exists() and not args.out.is_dir():
        raise OisaInputError(f"--out {args.out}: a file, not a folder")
    if args.text is not None and not args.text.strip():
        raise OisaInputError("--text is empty: give the expression's words, or leave --text out")
    for name in ("max_new_tokens", "chunk_size"):
        if getattr(args, name) < 1:
            raise OisaInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            raise OisaInputError(f"--device {args.device}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OisaInputError(f"--device {args.device}: this machine has no CUDA device (use --device cpu)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoProcessor

    from modeling_oisa import TINY_SYNTHETIC_NAME, OisaCheckpointError, resolve_model_name
    from modeling_oisa.precision import resolve_dtype
    from processing_oisa.media import VideoReader, VideoWriter
    from processing_oisa.processing_oisa import OisaExpression
    from processing_oisa.segmenter import OisaVideoSegmenter
    from processing_oisa.visualization import contact_sheet, overlay_mask

    check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    expression = OisaExpression(text=args.text, speech=args.speech, sound=args.sound, image=args.image,
                                explain=args.explain)
    expression_type = expression.type
    if args.model is None:
        args.model = TINY_SYNTHETIC_NAME
        logger.info("no --model given: using %s, the small model trained on synthetic shapes", TINY_SYNTHETIC_NAME)
    model_path = resolve_model_name(args.model)
    reader = VideoReader(args.video)
    try:
        model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(model_path)
    except OSError as error:
        # online, a misspelt Hub id ends here
        raise OisaCheckpointError(
            f"{args.model}: no such local folder or Hub repo, or it cannot be read ({error})"
        ) from error
    segmenter = OisaVideoSegmenter(model, processor, chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    info = reader.info
    sheet_tiles, sheet_labels = [], []
    sheet_frames = set(np.linspace(0, info.num_frames - 1, min(8, info.num_frames)).round().astype(int))
    # the source's own frame times, so that a variable frame rate keeps its timing
    times = info.timestamps
    increasing = all(later > earlier for earlier, later in zip(times, times[1:]))
    fps = info.num_frames / info.duration if info.duration > 0 else 1.0
    with VideoWriter(out / "overlay.mp4", fps, timestamps=times if increasing else None) as overlay_video:

        def write_chunk(start: int, frames: list, masks: np.ndarray) -> None:
            # as the mask head goes: each mask's PNG, its overlay into the video, a tile for the contact sheet
            (out / "masks").mkdir(parents=True, exist_ok=True)
            for index, frame, mask in zip(range(start, start + len(frames)), frames, masks):
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{index:05d}.png")
                overlay = overlay_mask(frame, mask)
                overlay_video.write(overlay)
                if index in sheet_frames:
                    sheet_tiles.append(overlay)
                    sheet_labels.append(f"frame {index}  t={times[index]:.2f}s  area={int(mask.sum())}")

        with tqdm(total=info.num_frames, unit="frame", desc="segmenting", disable=None) as bar:
            result = segmenter(
                reader,
                expression,
                soundtrack=args.soundtrack,
                progress=lambda done, total: bar.update(done - bar.n),
                on_masks=lambda start, frames, masks: write_chunk(start, frames, masks[0]),
                keep_masks=False,
            )
        if overlay_video.count == 0:
            # no [SEG] in the answer, so no mask pass: every frame's mask is empty
            empty = np.zeros((1, info.height, info.width), dtype=bool)
            for index, frame in reader.iter_frames():
                write_chunk(index, [frame], empty)
    contact_sheet(sheet_tiles, sheet_labels).save(out / "contact_sheet.png")
    summary = {
        "video": str(args.video),
        "model": str(args.model),
        "expression_type": expression_type,
        "answer": result.answer,
        "explanation": result.explanation,
        "segmented": result.has_seg,
        "frames": [
            {"index": index, "time": time, "mask_area": area, "presence": float(presence)}
            for index, (time, area, presence) in enumerate(
                zip(result.timestamps, result.mask_areas, result.presence_scores)
            )
        ],
    }
    temporary = out / "result.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    temporary.replace(out / "result.json")
    logger.info("answer: %s", result.answer)
    logger.info("wrote %d masks, overlay.mp4, contact_sheet.png and result.json to %s", reader.info.num_frames, out)
    return 0
