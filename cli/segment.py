"""`oisa segment`: masks, an overlay video, a contact sheet and result.json for one expression on one video."""

import argparse
import gc
import json
import logging
from pathlib import Path


HELP = "segment what an expression refers to in a video"
logger = logging.getLogger("oisa")

DEFAULT_MAX_NEW_TOKENS = 100
# the model type of EEMC, the Ref-AVS baseline (`modeling_refavs`): a text expression in, masks out, no text
EEMC_MODEL_TYPE = "refavs_eemc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="video file (mp4, mkv, webm, avi...) or folder of frames")
    parser.add_argument("--text", help="text expression; mark a sound with <audio> and an image with <image>")
    parser.add_argument("--speech", type=Path, help="spoken expression (any audio file)")
    parser.add_argument("--sound", type=Path, help="a sound that is part of the expression")
    parser.add_argument("--image", type=Path, help="an image that is part of the expression")
    parser.add_argument("--explain", action="store_true", help="ask the model to explain its answer")
    parser.add_argument("--soundtrack", type=Path, help="the video's audio as a separate file (default: its own)")
    parser.add_argument(
        "--model",
        help="checkpoint folder or Hub id of an OISA or an EEMC (refavs_eemc: --text only), or oisa-tiny-synthetic "
        "(the default)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    add_device_arguments(parser)
    parser.add_argument(
        "--chunk-size", type=int, default=8, help="frames through the mask head (EEMC: whose masks are written) at once"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"OISA: the longest answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS})"
    )


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, as `oisa segment` and `oisa app` take them."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on GPUs and on CPUs with bfloat16 matrix units (AMX, avx512_bf16), float32 elsewhere",
    )


def check_device_argument(name: str | None) -> None:
    """Refuses a --device torch cannot parse, or CUDA on a machine without it (`oisa segment`, `oisa app`)."""
    import torch

    from processing_oisa.media import OisaInputError

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise OisaInputError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OisaInputError(f"--device {name}: this machine has no CUDA device (use --device cpu)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses, before any model work, arguments that would fail later or answer garbage."""

    from processing_oisa.media import OisaInputError

    if args.out.exists() and not args.out.is_dir():
        raise OisaInputError(f"--out {args.out}: a file, not a folder")
    if args.text is not None and not args.text.strip():
        raise OisaInputError("--text is empty: give the expression's words, or leave --text out")
    for name in ("max_new_tokens", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise OisaInputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_device_argument(args.device)


def check_family_arguments(args: argparse.Namespace, model_type: str | None) -> None:
    """Refuses the options an EEMC model cannot take: it reads a text expression and generates no text."""
    from processing_oisa.media import OisaInputError

    if model_type != EEMC_MODEL_TYPE:
        return
    options = {
        "--speech": args.speech,
        "--sound": args.sound,
        "--image": args.image,
        "--explain": args.explain or None,
        "--max-new-tokens": args.max_new_tokens,
    }
    given = [option for option, value in options.items() if value is not None]
    if given:
        raise OisaInputError(
            f"{', '.join(given)}: {args.model} is an EEMC ({EEMC_MODEL_TYPE}), which takes a text expression only and "
            "generates no text; give --text alone"
        )
    if args.text is None:
        raise OisaInputError(f"{args.model} is an EEMC ({EEMC_MODEL_TYPE}): give its expression with --text")


def local_model_type(model_path: str) -> str | None:
    """The `model_type` in a local folder's config.json (already checked by `resolve_model_name`); None for a Hub id."""
    config_path = Path(model_path) / "config.json"
    return json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from modeling_oisa import TINY_SYNTHETIC_NAME, resolve_model_name
    from modeling_oisa.allocator import reuse_freed_memory
    from processing_oisa.auto_segmenter import video_segmenter
    from processing_oisa.media import VideoReader
    from processing_oisa.processing_oisa import OisaExpression
    from processing_oisa.segmenter import load_model_and_processor

    from .segmentation_files import write_segmentation

    check_arguments(args)
    reuse_freed_memory()
    expression = OisaExpression(
        text=args.text, speech=args.speech, sound=args.sound, image=args.image, explain=args.explain
    )
    # an expression of no type (neither text nor speech, or both) fails here, before any model work
    expression.type
    if args.model is None:
        args.model = TINY_SYNTHETIC_NAME
        logger.info("no --model given: using %s, the small model trained on synthetic shapes", TINY_SYNTHETIC_NAME)
    model_path = resolve_model_name(args.model)
    # a local folder says its family now, a Hub repo once loaded
    check_family_arguments(args, local_model_type(model_path))
    reader = VideoReader(args.video)
    # online, a misspelt Hub id ends here, in OisaCheckpointError
    model, processor = load_model_and_processor(args.model, args.device, args.dtype)
    model_type = model.config.model_type
    check_family_arguments(args, model_type)
    # the modules, the model and the processor live until the process ends: the garbage collector leaves them out of
    # its passes from now on (its last pass at exit took about 1 s over the objects of torch and transformers alone)
    gc.freeze()
    options = {"chunk_size": args.chunk_size}
    if model_type != EEMC_MODEL_TYPE:
        options["max_new_tokens"] = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    segmenter = video_segmenter(model, processor, **options)
    with tqdm(total=reader.info.num_frames, unit="frame", desc="segmenting", disable=None) as bar:
        result = write_segmentation(
            segmenter,
            reader,
            expression,
            Path(args.out),
            video_name=str(args.video),
            model_name=str(args.model),
            soundtrack=args.soundtrack,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    if result.frame_sources is not None:
        logger.info(
            "%d frames segmented (one a second), each mask held until the next; batch: %s",
            len(set(result.frame_sources)),
            result.batch,
        )
    else:
        logger.info("answer: %s", result.answer)
    logger.info(
        "wrote %d masks, overlay.mp4, contact_sheet.png and result.json to %s", reader.info.num_frames, args.out
    )
    return 0
