"""
Conversion into OISA's format, imported on demand: `original` converts the released `internvl_chat` checkpoints (and
writes ours back to that layout), `from_parts` assembles the stage-1 model from InternVL2, Whisper and ViT-Adapter
weights.
"""

from .original import DROPPED_ORIGINAL_KEYS, convert_original_checkpoint, convert_original_in_memory


__all__ = ["DROPPED_ORIGINAL_KEYS", "convert_original_checkpoint", "convert_original_in_memory"]
