"""Overlays stay visible whatever the object's colour: a contrasting tint and a black or white outline."""

import numpy as np

from processing_oisa.visualization import TINTS, contrasting_tint, overlay_mask


def frame_with_square(colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    frame = np.full((40, 40, 3), 128, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    frame[mask] = colour
    return frame, mask


def test_a_red_object_is_not_tinted_red():
    frame, mask = frame_with_square((230, 20, 20))
    tint = contrasting_tint(frame[mask].astype(np.float32))
    assert not np.array_equal(tint, TINTS[0])
    overlay = overlay_mask(frame, mask)
    # inside the mask the colour moved far from the object's own
    assert np.abs(overlay[20, 20].astype(int) - frame[20, 20].astype(int)).max() > 60


def test_every_object_colour_gets_a_tint_far_from_it():
    for colour in [(230, 20, 20), (20, 230, 20), (20, 20, 230), (250, 250, 250), (5, 5, 5), (250, 230, 0)]:
        frame, mask = frame_with_square(colour)
        tint = contrasting_tint(frame[mask].astype(np.float32))
        assert np.linalg.norm(tint - np.array(colour, dtype=np.float32)) > 200, colour


def test_the_outline_is_black_or_white_and_only_on_the_edge():
    frame, mask = frame_with_square((230, 20, 20))
    overlay = overlay_mask(frame, mask)
    assert set(map(tuple, overlay[10, 10:30])) <= {(0, 0, 0), (255, 255, 255)}
    assert tuple(overlay[20, 20]) not in {(0, 0, 0), (255, 255, 255)}
    # outside the mask nothing changes
    assert np.array_equal(overlay[~mask], frame[~mask])


def test_a_given_colour_is_used():
    frame, mask = frame_with_square((128, 128, 128))
    overlay = overlay_mask(frame, mask, alpha=1.0, colour=(0, 200, 255))
    assert tuple(overlay[20, 20]) == (0, 200, 255)
