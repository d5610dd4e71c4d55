"""What `oisa segment` and `oisa app` write for one expression on one video: masks, an overlay video, result.json."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from processing_oisa.media import VideoReader, VideoWriter
from processing_oisa.processing_oisa import AudioInput, OisaExpression
from processing_oisa.segmenter import OisaEncodedVideo, OisaSegmentation, OisaVideoSegmenter
from processing_oisa.visualization import contact_sheet, overlay_mask


def write_segmentation(
    segmenter: OisaVideoSegmenter,
    video: VideoReader | OisaEncodedVideo,
    expression: OisaExpression,
    out: Path,
    video_name: str,
    model_name: str,
    soundtrack: AudioInput | None = None,
    progress: Callable[[int, int], None] | None = None,
    overlay_name: str = "overlay.mp4",
    overlay_codec: str = "libx264",
) -> OisaSegmentation:
    """
    Segments `video` for `expression` and writes to `out`, chunk by chunk as the mask head goes: one PNG mask per
    frame (`masks/00000.png`...), the overlay video (`overlay_name`, encoded with `overlay_codec`, at the source's own
    frame times), `contact_sheet.png` (eight frames) and `result.json` (the answer and, per frame, its time, mask area
    and presence), naming the video `video_name` and the model `model_name`. Returns the result, without masks.
    `progress(done, total)` is called per chunk of frames.
    """
    reader = video.reader if isinstance(video, OisaEncodedVideo) else video
    info = reader.info
    sheet_tiles, sheet_labels = [], []
    sheet_frames = set(np.linspace(0, info.num_frames - 1, min(8, info.num_frames)).round().astype(int))
    # the source's own frame times, so that a variable frame rate keeps its timing
    times = info.timestamps
    increasing = all(later > earlier for earlier, later in zip(times, times[1:]))
    fps = info.num_frames / info.duration if info.duration > 0 else 1.0
    with VideoWriter(out / overlay_name, fps, timestamps=times if increasing else None, codec=overlay_codec) as writer:

        def write_chunk(start: int, frames: list, masks: np.ndarray) -> None:
            # each mask's PNG, its overlay into the video, a tile for the contact sheet
            (out / "masks").mkdir(parents=True, exist_ok=True)
            for index, frame, mask in zip(range(start, start + len(frames)), frames, masks):
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{index:05d}.png")
                overlay = overlay_mask(frame, mask)
                writer.write(overlay)
                if index in sheet_frames:
                    sheet_tiles.append(overlay)
                    sheet_labels.append(f"frame {index}  t={times[index]:.2f}s  area={int(mask.sum())}")

        result = segmenter(
            video,
            expression,
            soundtrack=soundtrack,
            progress=progress,
            on_masks=lambda start, frames, masks: write_chunk(start, frames, masks[0]),
            keep_masks=False,
        )
        if writer.count == 0:
            # no [SEG] in the answer, so no mask pass: every frame's mask is empty
            empty = np.zeros((1, info.height, info.width), dtype=bool)
            for index, frame in reader.iter_frames():
                write_chunk(index, [frame], empty)
    contact_sheet(sheet_tiles, sheet_labels).save(out / "contact_sheet.png")
    summary = {
        "video": video_name,
        "model": model_name,
        "expression_type": result.expression_type,
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
    if result.frame_sources is not None:
        # a model that sees some frames only (EEMC): how the video was batched, the frames it saw, and per frame the
        # frame whose mask it holds
        summary["batch"] = result.batch
        summary["sampled_frames"] = sorted(set(result.frame_sources))
        for frame, source in zip(summary["frames"], result.frame_sources):
            frame["mask_from"] = source
    temporary = out / "result.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    temporary.replace(out / "result.json")
    return result
