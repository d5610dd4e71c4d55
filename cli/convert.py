"""
`oisa convert`: an original checkpoint to this package's format, with its processor: OISA's (the internvl_chat layout)
or EEMC's (the Ref-AVS baseline's released `ckpt_best_miou.pth`).
"""

import argparse
import json
import logging
from pathlib import Path


HELP = (
    "convert an original checkpoint to this package's format: OISA (internvl_chat layout, e.g. OISA-1B) or EEMC (the "
    "Ref-AVS baseline's ckpt_best_miou.pth)"
)
logger = logging.getLogger("oisa")

FAMILIES = ("oisa", "refavs")
# the options that name the parts an original EEMC checkpoint keeps elsewhere, as `from_pretrained` arguments
REFAVS_PARTS = {
    "text_encoder": "--text-encoder",
    "vggish": "--vggish",
    "vggish_pca_params": "--vggish-pca-params",
    "mask2former_config": "--mask2former-config",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="the original: an OISA checkpoint folder or Hub repo id, or EEMC's ckpt_best_miou.pth or a folder "
        "holding it",
    )
    parser.add_argument("dst", type=Path, help="folder to write the converted checkpoint to")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="the model the original is of (default: refavs, i.e. EEMC, for a .pth file or a folder holding "
        "ckpt_best_miou.pth, else oisa)",
    )
    parser.add_argument(
        "--audio-encoder-config",
        type=Path,
        default=None,
        help="OISA: WhisperConfig JSON of the checkpoint's audio encoder (gives its head count), unless one lies "
        "beside the weights as internomni_whisper_config.json or audio_encoder_config.json",
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="EEMC: the text encoder the original loads from the Hub, a folder or Hub repo id of "
        "distilbert/distilroberta-base (default: text_encoder/ beside the checkpoint)",
    )
    parser.add_argument(
        "--vggish",
        type=Path,
        default=None,
        help="EEMC: torchvggish's weights, vggish-10086976.pth (default: vggish.pth beside the checkpoint, if there; "
        "without them the model takes precomputed VGGish features)",
    )
    parser.add_argument(
        "--vggish-pca-params",
        type=Path,
        default=None,
        help="EEMC: torchvggish's PCA parameters, for an audio_config with postprocess=true (default: "
        "vggish_pca_params.pth beside the checkpoint); the original applies no PCA",
    )
    parser.add_argument(
        "--mask2former-config",
        type=Path,
        default=None,
        help="EEMC: the Mask2Former config.json the weights were trained from, for what they cannot say such as the "
        "Swin's image size (default: mask2former_config.json beside the checkpoint, else the released model's)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (auto: the checkpoint's)",
    )
    parser.add_argument(
        "--set",
        dest="config_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a size or setting the checkpoint cannot say, VALUE read as JSON. OISA: an OisaConfig field "
        "(adapter_n_points=4, adapter_interaction_indexes=[[0,5],[6,11]]) or a sub-config's "
        "(vision_config.num_attention_heads=16); EEMC: a RefAvsConfig field (profile=fixed, fusion_num_heads=8, "
        'audio_config={"postprocess": true}); repeatable',
    )


def parse_config_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs as a dict, each VALUE read as JSON (a bare word stays a string)."""
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


def is_refavs_original(src: str) -> bool:
    """Whether `src` names an original EEMC checkpoint by its form: a `.pth` file, or a folder holding the release."""
    from modeling_refavs.pretrained import ORIGINAL_CHECKPOINT_NAME, ORIGINAL_CHECKPOINT_SUFFIXES

    path = Path(src)
    return path.suffix in ORIGINAL_CHECKPOINT_SUFFIXES or (path / ORIGINAL_CHECKPOINT_NAME).is_file()


def run(args: argparse.Namespace) -> int:
    family = args.family or ("refavs" if is_refavs_original(args.src) else "oisa")
    if family == "refavs":
        return convert_refavs(args)
    return convert_oisa(args)


def convert_oisa(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from modeling_oisa import OisaCheckpointError
    from modeling_oisa.conversion import convert_original_checkpoint
    from processing_oisa.processing_oisa import OisaProcessor
    from processing_oisa.tokenization_oisa import NAMED_SPECIAL_TOKENS

    given = [option for name, option in REFAVS_PARTS.items() if getattr(args, name) is not None]
    if given:
        raise OisaCheckpointError(f"{', '.join(given)}: EEMC options, but {args.src} is converted as OISA (--family)")
    convert_original_checkpoint(
        args.src,
        args.dst,
        audio_encoder_config=args.audio_encoder_config,
        named_special_tokens=NAMED_SPECIAL_TOKENS,
        dtype=args.dtype,
        config_overrides=parse_config_overrides(args.config_overrides),
    )
    config, tokenizer = AutoConfig.from_pretrained(args.dst), AutoTokenizer.from_pretrained(args.dst)
    OisaProcessor.from_model_config(config, tokenizer).save_pretrained(args.dst)
    logger.info("converted %s to %s", args.src, args.dst)
    return 0


def convert_refavs(args: argparse.Namespace) -> int:
    """EEMC: the model converted through `from_pretrained`, saved in safetensors, with the text encoder's tokenizer and
    the processor built from them when the text encoder's folder has a tokenizer."""
    from modeling_oisa import OisaCheckpointError
    from modeling_refavs import RefAvsForReferringSegmentation
    from modeling_refavs.pretrained import ORIGINAL_CONFIG_FIELDS, TEXT_ENCODER_DIR, find_original_checkpoint

    if args.audio_encoder_config is not None:
        raise OisaCheckpointError("--audio-encoder-config: an OISA option; EEMC's audio encoder is VGGish (--vggish)")
    source = Path(args.src)
    if not source.exists():
        raise OisaCheckpointError(f"{args.src}: no such file or folder")
    checkpoint = find_original_checkpoint(source)
    if checkpoint is None:
        raise OisaCheckpointError(
            f"{args.src}: not an original EEMC checkpoint (a .pth state dict of REFAVS_Model_Base, or a folder holding "
            "ckpt_best_miou.pth)"
        )
    overrides = parse_config_overrides(args.config_overrides)
    unknown = sorted(set(overrides) - set(ORIGINAL_CONFIG_FIELDS))
    if unknown:
        raise OisaCheckpointError(
            f"--set {unknown[0]}: not a RefAvsConfig field the weights leave open (the sizes come from the weights); "
            f"one of {', '.join(ORIGINAL_CONFIG_FIELDS)}"
        )
    parts = {name: getattr(args, name) for name in REFAVS_PARTS if getattr(args, name) is not None}
    model = RefAvsForReferringSegmentation.from_pretrained(checkpoint, dtype=args.dtype, **parts, **overrides)
    tokenizer = load_refavs_tokenizer(args.text_encoder or checkpoint.parent / TEXT_ENCODER_DIR, model.config)
    model.save_pretrained(args.dst)
    if tokenizer is not None:
        save_refavs_processor(model.config, tokenizer, args.dst)
    logger.info("converted %s to %s", checkpoint, args.dst)
    return 0


# a tokenizer folder holds one of these; without them transformers builds an empty tokenizer from the config alone
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_refavs_tokenizer(text_encoder: str | Path, config):
    """The text encoder's tokenizer, or None (with a warning) when its folder has none; one that does not fit fails."""
    from transformers import AutoTokenizer

    from modeling_oisa import OisaCheckpointError

    folder = Path(text_encoder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer (%s): writing the model only", text_encoder, " or ".join(TOKENIZER_FILES))
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(text_encoder))
    except (OSError, ValueError, TypeError) as error:
        logger.warning("%s: no tokenizer loads (%s): writing the model only", text_encoder, str(error).splitlines()[0])
        return None
    if len(tokenizer) > config.text_config.vocab_size:
        raise OisaCheckpointError(
            f"{text_encoder}: its tokenizer has {len(tokenizer)} tokens, more than the text encoder's "
            f"{config.text_config.vocab_size}: not this text encoder's tokenizer"
        )
    # from_pretrained records how it was called among the kwargs that save_pretrained writes back
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def save_refavs_processor(config, tokenizer, dst: Path) -> None:
    """Saves EEMC's processor (or, where this installation has none, the tokenizer) to `dst`."""
    try:
        from processing_oisa.refavs_eemc.processing_refavs import RefAvsProcessor
    except ImportError:
        tokenizer.save_pretrained(dst)
        logger.warning("this installation has no EEMC processor: wrote the model and the tokenizer only")
        return
    RefAvsProcessor.from_model_config(config, tokenizer).save_pretrained(dst)
