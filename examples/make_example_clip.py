"""Writes examples/shapes.mp4, the short clip the README segments: three coloured shapes, one of them sounding.

Usage: python examples/make_example_clip.py [OUTPUT]
"""

import sys
from pathlib import Path

from processing_oisa.data.synthetic_clips import make_shapes_clip
from processing_oisa.media import write_video


def main(output: Path) -> None:
    clip = make_shapes_clip(num_frames=24, height=240, width=320, fps=8.0, seed=7)
    write_video(output, clip.frames, clip.fps, clip.soundtrack)
    print(f"wrote {output}: 24 frames at 8 fps, the {clip.colours[clip.sounding]} {clip.sounding} sounds")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("shapes.mp4"))
