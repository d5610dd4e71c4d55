"""The `oisa` command line."""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


logger = logging.getLogger("oisa")


TINY_PRESETS = ("reference", "synthetic")
# merges of the synthetic preset's tokenizer: enough for every word of the synthetic expressions and the system
# message to take one token or a few, which keeps the LLM's input short
SYNTHETIC_TOKENIZER_MERGES = 400
SYNTHETIC_VISIBLE_FRAMES, SYNTHETIC_DENSE_FRAMES = 4, 2


def write_tiny_random(output_dir: Path, seed: int, preset: str = "reference") -> None:
    """
    Writes a tiny OISA with random weights and its processor, loadable with `AutoModel` / `AutoProcessor`: at the
    sizes of the original's tiny reference model (`reference`), or OISA-tiny-synthetic before training (`synthetic`).
    """
    from modeling_oisa import (
        OisaForReferringSegmentation,
        init_tiny_synthetic_weights,
        tiny_oisa_config,
        tiny_synthetic_config,
    )

    from .processing_oisa import OisaProcessor
    from .prompts import RELEASE_SYSTEM_MESSAGE
    from .synthetic_dataset import expression_corpus
    from .tokenization_oisa import build_tiny_tokenizer

    if preset not in TINY_PRESETS:
        raise ValueError(f"preset must be one of {TINY_PRESETS}, got {preset!r}")
    if preset == "synthetic":
        tokenizer = build_tiny_tokenizer(SYNTHETIC_TOKENIZER_MERGES, [RELEASE_SYSTEM_MESSAGE, *expression_corpus()])
        make_config = tiny_synthetic_config
    else:
        tokenizer = build_tiny_tokenizer()
        make_config = tiny_oisa_config
    ids = tokenizer.convert_tokens_to_ids
    config = make_config(
        vocab_size=len(tokenizer),
        image_token_id=ids("<IMG_CONTEXT>"),
        audio_token_id=ids("<AUDIO_CONTEXT>"),
        seg_token_id=ids("[SEG]"),
        sub_audio_token_id=ids("<SUB_AUDIO_CONTEXT>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    model = OisaForReferringSegmentation(config)
    if preset == "synthetic":
        init_tiny_synthetic_weights(model)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = OisaProcessor.from_model_config(config, tokenizer)
    if preset == "synthetic":
        # the LLM sees as many frames at inference as configs/oisa_tiny_synthetic.json shows it in training
        processor.max_visible_frames, processor.num_dense_frames = SYNTHETIC_VISIBLE_FRAMES, SYNTHETIC_DENSE_FRAMES
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("wrote a tiny random OISA (%d parameters) to %s", model.num_parameters(), output_dir)


def segment_video(args: argparse.Namespace) -> None:
    """`oisa segment`: masks, an overlay video, a contact sheet and result.json for one expression."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoProcessor

    from modeling_oisa import TINY_SYNTHETIC_NAME, resolve_model_name

    from .inference import OisaVideoSegmenter
    from .media import VideoReader, write_video
    from .processing_oisa import OisaExpression
    from .visualization import contact_sheet, overlay_mask

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    expression = OisaExpression(text=args.text, speech=args.speech, sound=args.sound, image=args.image,
                                explain=args.explain)
    expression_type = expression.type
    reader = VideoReader(args.video)
    if args.model is None:
        args.model = TINY_SYNTHETIC_NAME
        logger.info("no --model given: using %s, the small model trained on synthetic shapes", TINY_SYNTHETIC_NAME)
    model_path = resolve_model_name(args.model)
    model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    segmenter = OisaVideoSegmenter(model, processor, chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens)
    with tqdm(total=reader.info.num_frames, unit="frame", desc="segmenting", disable=None) as bar:
        result = segmenter(reader, expression, soundtrack=args.soundtrack,
                           progress=lambda done, total: bar.update(done - bar.n))

    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    overlays, sheet_tiles, sheet_labels = [], [], []
    sheet_frames = set(np.linspace(0, reader.info.num_frames - 1, min(8, reader.info.num_frames)).round().astype(int))
    for index, frame in reader.iter_frames():
        mask = result.masks[index]
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{index:05d}.png")
        overlays.append(overlay_mask(frame, mask))
        if index in sheet_frames:
            sheet_tiles.append(overlays[-1])
            sheet_labels.append(f"frame {index}  t={result.timestamps[index]:.2f}s  area={int(mask.sum())}")
    fps = 1.0 / (reader.info.timestamps[1] - reader.info.timestamps[0]) if reader.info.num_frames > 1 else 1.0
    # yuv420p needs even sides
    height, width = (reader.info.height // 2) * 2, (reader.info.width // 2) * 2
    write_video(out / "overlay.mp4", np.stack(overlays)[:, :height, :width], fps)
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


def parse_config_overrides(pairs: list[str]) -> dict:
    """`oisa convert --set KEY=VALUE` pairs as a dict, each VALUE read as JSON (a bare word stays a string)."""
    from modeling_oisa import OisaCheckpointError

    overrides = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key:
            raise OisaCheckpointError(f"--set {pair!r}: expected KEY=VALUE, e.g. adapter_n_points=4.")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def convert_original(
    src: str, dst: Path, audio_encoder_config: Path | None, dtype: str, config_overrides: dict | None = None
) -> None:
    """Converts an original OISA checkpoint (directory or Hub repo id) to OISA's format, with its processor."""
    from modeling_oisa import convert_original_checkpoint

    from .tokenization_oisa import NAMED_SPECIAL_TOKENS

    from transformers import AutoConfig, AutoTokenizer

    from .processing_oisa import OisaProcessor

    convert_original_checkpoint(
        src,
        dst,
        audio_encoder_config=audio_encoder_config,
        named_special_tokens=NAMED_SPECIAL_TOKENS,
        dtype=dtype,
        config_overrides=config_overrides,
    )
    OisaProcessor.from_model_config(AutoConfig.from_pretrained(dst), AutoTokenizer.from_pretrained(dst)).save_pretrained(dst)
    logger.info("converted %s to %s", src, dst)


def init_from_parts(internvl2: Path, whisper: Path, adapter: Path, output_dir: Path, seed: int) -> None:
    """Writes the stage-1 OISA assembled from InternVL2, the InternOmni Whisper encoder and the ViT-Adapter."""
    from transformers import AutoTokenizer, GenerationConfig

    from modeling_oisa import build_stage1_model

    from .tokenization_oisa import NAMED_SPECIAL_TOKENS, OISA_SPECIAL_TOKENS

    # OISA's tokens go after InternVL2's, in the original order, so ids follow the released vocabulary
    tokenizer = AutoTokenizer.from_pretrained(internvl2)
    tokenizer.add_tokens(OISA_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir, extra_special_tokens=NAMED_SPECIAL_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    model, report = build_stage1_model(
        internvl2,
        whisper,
        adapter,
        vocab_size=len(tokenizer),
        seed=seed,
        image_token_id=ids("<IMG_CONTEXT>"),
        audio_token_id=ids("<AUDIO_CONTEXT>"),
        seg_token_id=ids("[SEG]"),
        sub_audio_token_id=ids("<SUB_AUDIO_CONTEXT>"),
    )
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.text_config.bos_token_id,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(output_dir, save_original_format=False)
    tokenizer.save_pretrained(output_dir)
    fresh_modules = sorted({".".join(name.split(".")[:2]) for name in report.initialized})
    logger.info("wrote the stage-1 OISA to %s; freshly initialised: %s", output_dir, ", ".join(fresh_modules))


def make_synthetic(
    out: Path,
    dataset_format: str,
    num_videos: int,
    seed: int,
    split: str | None = None,
    nulls_per_video: int = 2,
    single_colour_rate: float = 0.0,
    spoken_question_rate: float = 0.0,
    silent_name_nulls: bool = False,
    spoken_names: int = 0,
    present_names: int = 0,
    spoken_pairs: int = 0,
) -> int:
    """`oisa make-synthetic`: a synthetic OmniAVS, Ref-AVS, gRefCOCO, image-text or audio-text set; 2 when it fails."""
    from .synthetic_dataset import MissingProgramError, make_synthetic_dataset

    try:
        make_synthetic_dataset(
            out,
            dataset_format,
            num_videos,
            seed,
            split=split,
            nulls_per_video=nulls_per_video,
            single_colour_rate=single_colour_rate,
            spoken_question_rate=spoken_question_rate,
            silent_name_nulls=silent_name_nulls,
            spoken_names=spoken_names,
            present_names=present_names,
            spoken_pairs=spoken_pairs,
        )
    except (MissingProgramError, FileExistsError, ValueError) as error:
        logger.error("oisa make-synthetic: %s", error)
        return 2
    return 0


def push_checkpoint(args: argparse.Namespace) -> int:
    """`oisa push`: publishes a checkpoint with its remote code and a model card; 2 when it cannot."""
    from huggingface_hub.errors import HfHubHTTPError

    from .model_card import ModelCardError, parse_card_fields
    from .publish import PublishError, publish_checkpoint

    try:
        publish_checkpoint(
            args.model_dir,
            args.repo_id,
            template=args.card_template,
            metrics_path=args.metrics,
            private=args.private,
            **parse_card_fields(args.card_field),
        )
    except (ModelCardError, PublishError, HfHubHTTPError) as error:
        logger.error("oisa push: %s", error)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisa", description="OISA: omnimodal referring audio-visual segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-random", help="write a tiny OISA checkpoint with random weights")
    tiny.add_argument("output_dir", type=Path, help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument(
        "--preset",
        choices=TINY_PRESETS,
        default="reference",
        help="sizes of the original's tiny reference model, or those of OISA-tiny-synthetic (untrained)",
    )
    convert = commands.add_parser(
        "convert", help="convert an original OISA checkpoint (internvl_chat layout, e.g. OISA-1B) to OISA's format"
    )
    convert.add_argument("src", help="original checkpoint folder or Hub repo id")
    convert.add_argument("dst", type=Path, help="folder to write the converted checkpoint to")
    convert.add_argument(
        "--audio-encoder-config",
        type=Path,
        default=None,
        help="WhisperConfig JSON of the checkpoint's audio encoder (gives its head count), unless one lies beside the "
        "weights as internomni_whisper_config.json or audio_encoder_config.json",
    )
    convert.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (auto: the checkpoint's)",
    )
    convert.add_argument(
        "--set",
        dest="config_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a size the checkpoint cannot say, VALUE read as JSON: an OisaConfig field (adapter_n_points=4, "
        "adapter_interaction_indexes=[[0,5],[6,11]]) or a sub-config's (vision_config.num_attention_heads=16); "
        "repeatable",
    )
    parts = commands.add_parser(
        "init-from-parts",
        help="assemble the stage-1 OISA from InternVL2-1B, the InternOmni Whisper encoder and the ViT-Adapter",
    )
    parts.add_argument("--internvl2", type=Path, required=True, help="InternVL2 folder (original layout)")
    parts.add_argument("--whisper", type=Path, required=True, help="InternOmni Whisper encoder folder")
    parts.add_argument("--adapter", type=Path, required=True, help="ViT-Adapter Mask2Former model_final.pth")
    parts.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parts")
    parts.add_argument("output_dir", type=Path, help="folder to write the model and tokenizer to")

    synthetic = commands.add_parser(
        "make-synthetic",
        help="write a synthetic OmniAVS, Ref-AVS, gRefCOCO, image-text or audio-text dataset of coloured shapes "
        "(OmniAVS and audio-text need espeak-ng)",
    )
    synthetic.add_argument("out", type=Path, help="folder to write the dataset to (new or empty)")
    synthetic.add_argument(
        "--format",
        choices=("omniavs", "refavs", "grefcoco", "image_text", "audio_text"),
        default="omniavs",
        help="on-disk layout",
    )
    synthetic.add_argument(
        "--videos",
        type=int,
        default=10,
        help="number of videos (images for grefcoco and image_text, audio clips for audio_text)",
    )
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset")
    synthetic.add_argument("--split", help="put every video in this split (default: the format's usual split mix)")
    synthetic.add_argument(
        "--nulls-per-video",
        type=int,
        default=2,
        help="null expressions per OmniAVS video or gRefCOCO image, null rows per Ref-AVS null folder, presence "
        "questions per image_text image (default: 2)",
    )
    synthetic.add_argument(
        "--single-colour-rate",
        type=float,
        default=0.0,
        help="grefcoco and image_text: the share of images whose shapes all have one colour (default: 0)",
    )
    synthetic.add_argument(
        "--spoken-question-rate",
        type=float,
        default=0.0,
        help="image_text: the share of images whose first question is spoken by espeak-ng (default: 0)",
    )
    synthetic.add_argument(
        "--silent-name-nulls",
        action="store_true",
        help="omniavs: in silent clips, every other pair of null expressions names an absent object rather than "
        "asking for the sounding shape",
    )
    synthetic.add_argument(
        "--spoken-names",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: instead of the 8 types and the nulls, K speech expressions a clip, each naming one object, "
        "every other one absent (default: 0)",
    )
    synthetic.add_argument(
        "--present-names",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: K more expressions a clip, text and speech in turn, each naming one object of the clip by "
        "colour and shape (default: 0)",
    )
    synthetic.add_argument(
        "--spoken-pairs",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: K more speech expressions a clip, each naming two of its objects (default: 0)",
    )

    push = commands.add_parser(
        "push", help="publish a checkpoint to the Hugging Face Hub with its remote code and a model card"
    )
    push.add_argument("model_dir", type=Path, help="the checkpoint folder (save_pretrained, oisa convert, train.py)")
    push.add_argument("repo_id", help="the model repo to create or update, owner/name")
    push.add_argument(
        "--private", action="store_true", help="create the repo private (an existing one keeps its visibility)"
    )
    push.add_argument(
        "--card-template",
        default="fine-tune",
        help="model card template: oisa-1b, oisa-tiny-synthetic, fine-tune (default) or a template file",
    )
    push.add_argument("--metrics", type=Path, help="an eval.py metrics.json whose results go into the card")
    push.add_argument(
        "--card-field",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template field, VALUE read as YAML (e.g. license=mit; oisa-1b needs license); repeatable",
    )

    segment = commands.add_parser("segment", help="segment what an expression refers to in a video")
    segment.add_argument("video", type=Path, help="video file (mp4, mkv, webm, avi...) or folder of frames")
    segment.add_argument("--text", help="text expression; mark a sound with <audio> and an image with <image>")
    segment.add_argument("--speech", type=Path, help="spoken expression (any audio file)")
    segment.add_argument("--sound", type=Path, help="a sound that is part of the expression")
    segment.add_argument("--image", type=Path, help="an image that is part of the expression")
    segment.add_argument("--explain", action="store_true", help="ask the model to explain its answer")
    segment.add_argument("--soundtrack", type=Path, help="the video's audio as a separate file (default: its own)")
    segment.add_argument(
        "--model", help="checkpoint folder, Hub id or oisa-tiny-synthetic (the default)"
    )
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    segment.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    segment.add_argument("--chunk-size", type=int, default=8, help="frames through the mask head at once")
    segment.add_argument("--max-new-tokens", type=int, default=100)

    demo = commands.add_parser(
        "demo", help="segment a synthetic clip for several expression types with OISA-tiny-synthetic, with pictures"
    )
    demo.add_argument("--out", type=Path, default=Path("oisa-demo"), help="output folder (default: oisa-demo)")
    demo.add_argument("--model", default="oisa-tiny-synthetic", help="checkpoint folder, Hub id or oisa-tiny-synthetic")
    demo.add_argument("--seed", type=int, default=0, help="seed of the clip's motion")
    demo.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from modeling_oisa import MissingCheckpointError, OisaCheckpointError

    from .media import OisaInputError

    try:
        if args.command == "tiny-random":
            write_tiny_random(args.output_dir, args.seed, args.preset)
        elif args.command == "convert":
            convert_original(
                args.src, args.dst, args.audio_encoder_config, args.dtype, parse_config_overrides(args.config_overrides)
            )
        elif args.command == "init-from-parts":
            init_from_parts(args.internvl2, args.whisper, args.adapter, args.output_dir, args.seed)
        elif args.command == "make-synthetic":
            return make_synthetic(
                args.out,
                args.format,
                args.videos,
                args.seed,
                args.split,
                args.nulls_per_video,
                args.single_colour_rate,
                args.spoken_question_rate,
                args.silent_name_nulls,
                args.spoken_names,
                args.present_names,
                args.spoken_pairs,
            )
        elif args.command == "push":
            return push_checkpoint(args)
        elif args.command == "segment":
            segment_video(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.model, args.seed, args.device)
    except (OisaInputError, OisaCheckpointError, MissingCheckpointError) as error:
        logger.error("oisa %s: %s", args.command, error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
