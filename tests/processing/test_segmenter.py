import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, LogitsProcessor, LogitsProcessorList, pipeline

import processing_oisa  # noqa: F401  (registers the processor and the pipeline)
from modeling_oisa import OisaOutput
from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaProcessor, OisaVideoSegmenter, VideoReader, upsample_masks, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip, tone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    oisa_main(["tiny-random", str(folder)])
    return folder


@pytest.fixture(scope="module")
def processor(checkpoint):
    return AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def seg_model(checkpoint):
    """The tiny random model with its head pushed to answer `[SEG]`, so that masks are produced."""
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0
    return model


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    clip = make_shapes_clip(num_frames=11, height=60, width=84, fps=5.0, seed=2)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, clip.frames, clip.fps, clip.soundtrack)
    return path


def test_segments_every_frame_at_its_size(seg_model, checkpoint, clip_path):
    segmenter = OisaVideoSegmenter(seg_model, AutoProcessor.from_pretrained(checkpoint), max_new_tokens=4)
    result = segmenter(clip_path, OisaExpression(text="the red circle"))
    assert result.has_seg and result.expression_type == "text"
    assert result.masks.shape == (11, 60, 84) and result.masks.dtype == bool
    assert result.masks.any()
    assert result.presence_scores.shape == (11,) and np.all((result.presence_scores >= 0) & (result.presence_scores <= 1))
    assert len(result.timestamps) == 11


def test_streaming_equals_cached_and_expressions_share_one_pass(seg_model, checkpoint, clip_path, monkeypatch):
    processor = AutoProcessor.from_pretrained(checkpoint)
    expressions = [
        OisaExpression(text="the red circle"),
        OisaExpression(speech=tone(300, 1.2), sound=tone(660, 0.5), image=np.zeros((20, 20, 3), dtype=np.uint8)),
        OisaExpression(text="the shape like <image> making <audio>", sound=tone(880, 0.5),
                       image=np.zeros((20, 20, 3), dtype=np.uint8), explain=True),
    ]
    cached = OisaVideoSegmenter(seg_model, processor, chunk_size=4, max_new_tokens=4)(clip_path, expressions)
    calls = []
    original = seg_model.get_image_features
    monkeypatch.setattr(seg_model, "get_image_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    streamed = OisaVideoSegmenter(seg_model, processor, chunk_size=4, max_new_tokens=4, max_cached_frames=2)(
        clip_path, expressions)
    assert len(calls) == 3  # 11 frames in chunks of 4, once for the three expressions together
    assert [result.expression_type for result in streamed] == ["text", "speech_sound_image", "text_sound_image"]
    for first, second in zip(cached, streamed):
        assert first.answer == second.answer
        np.testing.assert_allclose(first.presence_scores, second.presence_scores, atol=1e-5)
        assert (first.masks != second.masks).mean() < 1e-3


def test_no_seg_in_the_answer_means_empty_masks(checkpoint, clip_path):
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] -= 50.0
    result = OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint), max_new_tokens=3)(
        clip_path, OisaExpression(text="nothing"))
    assert not result.has_seg and not result.masks.any() and result.masks.shape == (11, 60, 84)


def test_placeholder_tokens_are_never_generated(checkpoint, clip_path):
    # a head that favours the image and audio placeholders above everything: generating one would leave a placeholder
    # without its embeddings at the next step
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = model.config
    placeholders = [config.image_token_id, config.audio_token_id, config.sub_audio_token_id]

    def favour_placeholders(module, inputs, logits):
        logits[..., placeholders] += 1000.0
        return logits

    model.lm_head.register_forward_hook(favour_placeholders)
    processor = AutoProcessor.from_pretrained(checkpoint)
    result = OisaVideoSegmenter(model, processor, max_new_tokens=3)(clip_path, OisaExpression(text="the red circle"))
    assert result.answer and not set(processor.tokenizer(result.answer)["input_ids"]) & set(placeholders)


class ForceAnswer(LogitsProcessor):
    """Generation forced to the given ids, one a step."""

    def __init__(self, answer_ids: list[int]):
        self.answer_ids, self.step = answer_ids, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.answer_ids[self.step]] = 0.0
        self.step += 1
        return forced


@pytest.mark.parametrize("source", ["before_seg", "seg"])
@pytest.mark.parametrize("seg_last", [False, True], ids=["answer-goes-on", "answer-ends-at-seg"])
def test_the_seg_state_is_the_teacher_forced_one(seg_model, checkpoint, clip_path, monkeypatch, source, seg_last):
    """
    The state handed to the mask head, taken from generation's own hidden states (or, for the state at `[SEG]` when
    the answer ends there, from one pass over prompt + answer), equals a teacher-forced pass's state at the position
    that `seg_hidden_state_source` names.
    """
    processor = AutoProcessor.from_pretrained(checkpoint)
    config = seg_model.config
    words = processor.tokenizer("Sure it is", add_special_tokens=False)["input_ids"]
    answer_ids = [*words, config.seg_token_id] + ([] if seg_last else words)
    monkeypatch.setattr(config, "seg_hidden_state_source", source)
    embeds, states = [], []
    generate, segment = seg_model.generate, OisaVideoSegmenter._segment

    def forced_generate(**kwargs):
        embeds.append(kwargs["inputs_embeds"])
        return generate(**kwargs, logits_processor=LogitsProcessorList([ForceAnswer(answer_ids)]))

    monkeypatch.setattr(seg_model, "generate", forced_generate)
    forward, passes = seg_model.forward, []

    def counted_forward(*args, **kwargs):
        passes.append(kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else 1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(seg_model, "forward", counted_forward)
    monkeypatch.setattr(OisaVideoSegmenter, "_segment", lambda self, reader, seg_states, *args: states.append(
        seg_states) or segment(self, reader, seg_states, *args))
    segmenter = OisaVideoSegmenter(seg_model, processor, max_new_tokens=len(answer_ids))
    assert segmenter(clip_path, OisaExpression(text="the red circle")).has_seg
    # a pass over prompt + answer only when generation stopped before computing the state asked for
    prompt_length = embeds[0].shape[1]
    assert [length for length in passes if length > prompt_length] == (
        [prompt_length + len(answer_ids)] if seg_last and source == "seg" else []
    )
    monkeypatch.undo()
    with torch.no_grad():
        answer = seg_model.get_input_embeddings()(torch.tensor([answer_ids]))
        hidden = seg_model(inputs_embeds=torch.cat([embeds[0], answer], dim=1)).last_hidden_state[0]
    position = embeds[0].shape[1] + answer_ids.index(config.seg_token_id) - (source == "before_seg")
    torch.testing.assert_close(states[0], hidden[position][None], rtol=0, atol=1e-5)
    # the neighbouring positions differ: the test tells them apart
    for other in {position - 1, min(position + 1, hidden.shape[0] - 1)} - {position}:
        assert not torch.allclose(states[0], hidden[other][None], atol=1e-3)


def test_bfloat16_inference(seg_model, checkpoint, clip_path):
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0
    result = OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint), max_new_tokens=3)(
        clip_path, OisaExpression(text="the red circle"))
    assert result.has_seg and result.masks.shape == (11, 60, 84)


def test_frame_folder_and_silent_video(seg_model, checkpoint, tmp_path, caplog):
    clip = make_shapes_clip(num_frames=4, height=40, width=40, seed=3)
    for index, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(tmp_path / f"{index}.jpg")
    segmenter = OisaVideoSegmenter(seg_model, AutoProcessor.from_pretrained(checkpoint), max_new_tokens=3)
    with caplog.at_level("WARNING"):
        result = segmenter(VideoReader(tmp_path), OisaExpression(text="the green square"))
    assert caplog.text.count("has no audio track") == 1
    assert result.masks.shape == (4, 40, 40)


def test_mask_upsampling_modes(processor):
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 1, 1] = 3.0
    released = processor.post_process_masks(logits, (16, 16), mask_upsampling="binarize_then_upsample")
    fixed = processor.post_process_masks(logits, (16, 16), mask_upsampling="upsample_logits")
    # B15: upsampling the binary mask keeps every pixel with any weight from the positive cell, a dilation
    assert released.sum() > fixed.sum() > 0
    assert released[0, 4:8, 4:8].all()
    assert torch.equal(released, upsample_masks(logits, (16, 16), "binarize_then_upsample"))


def test_post_process_masks_by_hand(processor):
    # 2x2 -> 4x4, bilinear with half-pixel centres: output row (or column) i reads source coordinate max(i/2 - 1/4, 0),
    # so source cell 0 weighs 1, 3/4, 1/4, 0 on outputs 0..3. One positive cell (logit 1) among -3s:
    # - binarise then upsample (B15): the 0/1 mask upsampled is positive wherever cell 0 has any weight: a 3x3 block;
    # - upsample the logits: -3 + 4 * w_row * w_col > 0 only where w_row * w_col > 3/4, i.e. at (0, 0) alone;
    # - probabilities: sigmoid(1) at (0, 0), sigmoid(3/4 * 1 + 1/4 * -3) = 1/2 at (0, 1), sigmoid(-3) at (3, 3).
    logits = torch.tensor([[[1.0, -3.0], [-3.0, -3.0]]])
    released = torch.zeros(1, 4, 4, dtype=torch.bool)
    released[0, :3, :3] = True
    fixed = torch.zeros(1, 4, 4, dtype=torch.bool)
    fixed[0, 0, 0] = True
    assert torch.equal(processor.post_process_masks(logits, (4, 4), mask_upsampling="binarize_then_upsample"), released)
    assert torch.equal(processor.post_process_masks(logits, (4, 4), mask_upsampling="upsample_logits"), fixed)
    probabilities = processor.post_process_masks(logits, (4, 4), mask_upsampling="upsample_logits", binarize=False)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (1, 4, 4)
    assert probabilities[0, 0, 0].item() == pytest.approx(1 / (1 + np.exp(-1)))
    assert probabilities[0, 0, 1].item() == pytest.approx(0.5)
    assert probabilities[0, 3, 3].item() == pytest.approx(1 / (1 + np.exp(3)))
    # a logit of exactly 0 is background in both modes
    for mode in ("binarize_then_upsample", "upsample_logits"):
        assert not processor.post_process_masks(torch.zeros(2, 2), (4, 4), mask_upsampling=mode).any()


def test_post_process_masks_of_the_model_output(processor):
    """One tensor (frames, h, w) per [SEG], each at its video's size; presence gating empties the absent frames."""
    logits = torch.tensor([[1.0, -3.0], [-3.0, -3.0]]).expand(2, 2, 2)
    present_then_absent = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    outputs = OisaOutput(mask_logits=(logits, logits), class_logits=(present_then_absent, present_then_absent))
    first, second = processor.post_process_masks(outputs, [(4, 4), (8, 8)], mask_upsampling="binarize_then_upsample")
    assert first.shape == (2, 4, 4) and second.shape == (2, 8, 8)
    assert first[:, :3, :3].all() and not first[:, 3].any() and second[1].any()
    gated = processor.post_process_masks(outputs, (4, 4), mask_upsampling="binarize_then_upsample",
                                         presence_gating=True)
    assert torch.equal(gated[0][0], first[0]) and not gated[0][1].any()
    probabilities = processor.post_process_masks(outputs, torch.tensor([4, 4]), mask_upsampling="upsample_logits",
                                                 binarize=False, presence_gating=True)
    assert probabilities[0][0, 0, 0] > 0.5 and not probabilities[0][1].any()
    with pytest.raises(ValueError, match="mask_upsampling"):
        processor.post_process_masks(logits, (4, 4), mask_upsampling="nearest")
    with pytest.raises(ValueError, match="presence logits"):
        processor.post_process_masks(logits, (4, 4), mask_upsampling="upsample_logits", presence_gating=True)
    with pytest.raises(ValueError, match="2 mask logits but 3 sizes"):
        processor.post_process_masks(outputs, [(4, 4)] * 3, mask_upsampling="upsample_logits")


def test_the_segmenter_and_the_pipeline_post_process_with_the_processor(seg_model, checkpoint, clip_path, monkeypatch):
    calls = []

    def post_process_masks(self, outputs, original_sizes, mask_upsampling, binarize=True, presence_gating=False):
        calls.append((tuple(original_sizes), mask_upsampling, binarize, presence_gating))
        shape = (*outputs.mask_logits.shape[:-2], *original_sizes)
        return torch.ones(shape, dtype=torch.bool) if binarize else torch.full(shape, 0.25)

    monkeypatch.setattr(OisaProcessor, "post_process_masks", post_process_masks)
    processor = AutoProcessor.from_pretrained(checkpoint)
    result = OisaVideoSegmenter(seg_model, processor, chunk_size=4, max_new_tokens=4)(
        clip_path, OisaExpression(text="the red circle"), return_probabilities=True)
    assert result.has_seg and result.masks.all() and np.all(result.probabilities == 0.25)
    config = seg_model.config
    # 11 frames in chunks of 4: masks and probabilities of each chunk
    assert calls == [((60, 84), config.mask_upsampling, binarize, config.use_presence_gating)
                     for _ in range(3) for binarize in (True, False)]
    calls.clear()
    pipe = pipeline("referring-audio-visual-segmentation", model=seg_model, processor=processor)
    output = pipe({"video": str(clip_path), "text": "the red circle"}, chunk_size=4, max_new_tokens=4)
    assert output["masks"].shape == (11, 60, 84) and output["masks"].all()
    assert calls == [((60, 84), config.mask_upsampling, True, config.use_presence_gating)] * 3


def test_pipeline_task(checkpoint, clip_path):
    pipe = pipeline("referring-audio-visual-segmentation", model=str(checkpoint), dtype=torch.float32)
    output = pipe({"video": str(clip_path), "text": "the red circle"}, max_new_tokens=2)
    assert output["masks"].shape == (11, 60, 84) and isinstance(output["answer"], str)


@pytest.mark.slow
def test_pipeline_equals_the_segmenter_on_a_multimodal_expression(seg_model, checkpoint, clip_path, tmp_path):
    """Speech, sound, image and explain, with a soundtrack other than the video's own: the pipeline's result is the
    segmenter's, field for field."""
    import soundfile

    soundtrack = tmp_path / "soundtrack.wav"
    soundfile.write(soundtrack, tone(440, 2.2), 16000)
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[5:15, 5:15] = (255, 0, 0)
    inputs = {"speech": tone(300, 1.2), "sound": tone(660, 0.5), "image": image, "explain": True}
    processor = AutoProcessor.from_pretrained(checkpoint)
    expected = OisaVideoSegmenter(seg_model, processor, chunk_size=4, max_new_tokens=4)(
        clip_path, OisaExpression(**inputs), soundtrack=soundtrack)
    pipe = pipeline("referring-audio-visual-segmentation", model=seg_model, processor=processor)
    output = pipe({"video": str(clip_path), **inputs}, soundtrack=soundtrack, chunk_size=4, max_new_tokens=4)
    assert expected.has_seg and expected.masks.any() and expected.expression_type == "speech_sound_image"
    assert output["expression_type"] == expected.expression_type
    assert (output["answer"], output["explanation"]) == (expected.answer, expected.explanation)
    assert output["timestamps"] == expected.timestamps
    np.testing.assert_array_equal(output["masks"], expected.masks)
    np.testing.assert_allclose(output["presence_scores"], expected.presence_scores, rtol=0, atol=1e-6)


def test_segment_command_writes_masks_overlay_sheet_and_result(seg_model, checkpoint, clip_path, tmp_path):
    seg_model.save_pretrained(tmp_path / "model")
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    speech = tmp_path / "speech.wav"
    import soundfile

    soundfile.write(speech, tone(300, 1.0), 16000)
    gc.unfreeze()
    try:
        code = oisa_main(["segment", str(clip_path), "--speech", str(speech), "--model", str(tmp_path / "model"),
                          "--out", str(out), "--max-new-tokens", "3"])
        # the loaded modules and model are left out of the garbage collector's passes (and of its last one at exit)
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert code == 0 and frozen > 10_000
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 11 and np.asarray(Image.open(masks[0])).shape == (60, 84)
    result = json.loads((out / "result.json").read_text())
    assert result["expression_type"] == "speech" and result["segmented"] is True
    assert [frame["mask_area"] for frame in result["frames"]] == [int((np.asarray(Image.open(m)) > 0).sum()) for m in masks]
    assert VideoReader(out / "overlay.mp4").info.num_frames == 11
    assert Image.open(out / "contact_sheet.png").size[0] > 0


def test_segment_command_reports_bad_input(checkpoint, tmp_path, caplog):
    code = oisa_main(["segment", str(tmp_path / "missing.mp4"), "--text", "x", "--model", str(checkpoint),
                      "--out", str(tmp_path / "out")])
    assert code == 2 and "missing.mp4 does not exist" in caplog.text
