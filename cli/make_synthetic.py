"""`oisa make-synthetic`: a synthetic OmniAVS, Ref-AVS, gRefCOCO, image-text or audio-text set of coloured shapes."""

import argparse
import logging
from pathlib import Path


HELP = (
    "write a synthetic OmniAVS, Ref-AVS, gRefCOCO, image-text or audio-text dataset of coloured shapes "
    "(OmniAVS and audio-text need espeak-ng)"
)
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder to write the dataset to (new or empty)")
    parser.add_argument(
        "--format",
        choices=("omniavs", "refavs", "grefcoco", "image_text", "audio_text"),
        default="omniavs",
        help="on-disk layout",
    )
    parser.add_argument(
        "--videos",
        type=int,
        default=10,
        help="number of videos (images for grefcoco and image_text, audio clips for audio_text)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset")
    parser.add_argument("--split", help="put every video in this split (default: the format's usual split mix)")
    parser.add_argument(
        "--nulls-per-video",
        type=int,
        default=2,
        help="null expressions per OmniAVS video or gRefCOCO image, null rows per Ref-AVS null folder, presence "
        "questions per image_text image (default: 2)",
    )
    parser.add_argument(
        "--single-colour-rate",
        type=float,
        default=0.0,
        help="grefcoco and image_text: the share of images whose shapes all have one colour (default: 0)",
    )
    parser.add_argument(
        "--spoken-question-rate",
        type=float,
        default=0.0,
        help="image_text: the share of images whose first question is spoken by espeak-ng (default: 0)",
    )
    parser.add_argument(
        "--silent-name-nulls",
        action="store_true",
        help="omniavs: in silent clips, every other pair of null expressions names an absent object rather than "
        "asking for the sounding shape",
    )
    parser.add_argument(
        "--spoken-names",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: instead of the 8 types and the nulls, K speech expressions a clip, each naming one object, "
        "every other one absent (default: 0)",
    )
    parser.add_argument(
        "--present-names",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: K more expressions a clip, text and speech in turn, each naming one object of the clip by "
        "colour and shape (default: 0)",
    )
    parser.add_argument(
        "--spoken-pairs",
        type=int,
        default=0,
        metavar="K",
        help="omniavs: K more speech expressions a clip, each naming two of its objects (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    from processing_oisa.data.synthetic import MissingProgramError, make_synthetic_dataset

    try:
        make_synthetic_dataset(
            args.out,
            args.format,
            args.videos,
            args.seed,
            split=args.split,
            nulls_per_video=args.nulls_per_video,
            single_colour_rate=args.single_colour_rate,
            spoken_question_rate=args.spoken_question_rate,
            silent_name_nulls=args.silent_name_nulls,
            spoken_names=args.spoken_names,
            present_names=args.present_names,
            spoken_pairs=args.spoken_pairs,
        )
    except (MissingProgramError, FileExistsError, ValueError) as error:
        logger.error("oisa make-synthetic: %s", error)
        return 2
    return 0
