"""Overlays stay visible whatever the object's colour: a contrasting tint and a black or white outline."""

import numpy as np

from processing_oisa.visualization import TINTS, _edge, contrasting_tint, overlay_mask


def frame_with_square(colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    frame = np.full((40, 40, 3), 128, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    frame[mask] = colour
    return frame, mask


def test_a_red_object_is_not_tinted_red():
    frame, mask = frame_with_square((230, 20, 20))
    tint = contrasting_tint(frame[mask].mean(axis=0))
    assert not np.array_equal(tint, TINTS[0])
    overlay = overlay_mask(frame, mask)
    # inside the mask the colour moved far from the object's own
    assert np.abs(overlay[20, 20].astype(int) - frame[20, 20].astype(int)).max() > 60


def test_every_object_colour_gets_a_tint_far_from_it():
    for colour in [(230, 20, 20), (20, 230, 20), (20, 20, 230), (250, 250, 250), (5, 5, 5), (250, 230, 0)]:
        frame, mask = frame_with_square(colour)
        tint = contrasting_tint(frame[mask].mean(axis=0))
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


def test_the_overlay_is_the_blend_of_the_frame_in_float32():
    # the overlay looks each channel value's blend up in a table; it must equal blending the whole frame in float32
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:40, 8:50] = rng.random((35, 42)) < 0.8
    for alpha, colour in [(0.55, None), (0.3, (10, 200, 90)), (1.0, (255, 0, 220))]:
        tint = contrasting_tint(frame[mask].mean(axis=0)) if colour is None else np.float32(colour)
        expected = frame.astype(np.float32)
        expected[mask] = (1 - alpha) * expected[mask] + alpha * tint
        expected = expected.clip(0, 255).astype(np.uint8)
        overlay = overlay_mask(frame, mask, alpha=alpha, colour=colour)
        outline = _edge(mask)
        assert set(map(tuple, overlay[outline])) in ({(0, 0, 0)}, {(255, 255, 255)})
        assert np.array_equal(overlay[~outline], expected[~outline]), (alpha, colour)


def test_an_empty_mask_leaves_the_frame_as_it_is():
    frame = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(overlay_mask(frame, np.zeros((20, 30), dtype=bool)), frame)
