"""OISA's prompt strings, expression types, frame samplers and the Hermes-2 chat template, as released."""

import math
from dataclasses import dataclass


RELEASE_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

# Chat-ML with the MPT separator: no newline after <|im_end|> (the `Hermes-2` template of InternVL).
HERMES_2_CHAT_TEMPLATE = (
    "{% set system_message = '" + RELEASE_SYSTEM_MESSAGE + "' %}"
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "<|im_start|>system\n{{ system_message }}<|im_end|>"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the 8 OmniAVS expression types, in the order of the paper's splits I to VIII (`evaluate.py --datasets all`)
EXPRESSION_TYPES = (
    "text",
    "speech",
    "text_sound",
    "speech_sound",
    "text_image",
    "speech_image",
    "text_sound_image",
    "speech_sound_image",
)

_ASK = "Please segment the object this sentence describes in this video: "
_EXPLAIN = ", and explain why."

# (base question, question asking for an explanation) per expression type; `{expression}` is the text expression.
QUESTIONS = {
    "text": (_ASK + "<ref>{expression}</ref>", _ASK + "<ref>{expression}</ref>" + _EXPLAIN),
    "speech": (_ASK + "<ref><audio></ref>", _ASK + "<ref><audio></ref>" + _EXPLAIN),
    # the trailing period of this base question, and its absence in the two below, are as released
    "speech_sound": (
        _ASK + "<ref><audio></ref>, referring audio is <audio>.",
        _ASK + "<ref><audio></ref>, referring audio is <audio>" + _EXPLAIN,
    ),
    "speech_image": (
        _ASK + "<ref><audio></ref>, referring image is <image>",
        _ASK + "<ref><audio></ref>, referring image is <image>" + _EXPLAIN,
    ),
    "speech_sound_image": (
        _ASK + "<ref><audio></ref>, referring audio is <audio>, referring image is <image>",
        _ASK + "<ref><audio></ref>, referring audio is <audio>, referring image is <image>" + _EXPLAIN,
    ),
}
for _text_type in ("text_sound", "text_image", "text_sound_image"):
    QUESTIONS[_text_type] = QUESTIONS["text"]

POSITIVE_ANSWER = "Sure, it is [SEG]."
NULL_ANSWER = "No target matches this expression."


def expression_type(has_text: bool, has_speech: bool, has_sound: bool, has_image: bool) -> str:
    """The expression type of a combination of modalities: one of text or speech, plus optionally sound and image."""
    if has_text == has_speech:
        raise ValueError("An expression needs exactly one of text and speech (plus, optionally, a sound and an image).")
    parts = ["text" if has_text else "speech"] + (["sound"] if has_sound else []) + (["image"] if has_image else [])
    return "_".join(parts)


def question(expr_type: str, expression: str | None, explain: bool) -> str:
    """The user question of an expression type, with the `<audio>`/`<image>` placeholders it holds."""
    template = QUESTIONS[expr_type][1 if explain else 0]
    return template.format(expression=expression or "")


def target_answer(is_null: bool, explanation: str | None) -> str:
    """
    The training target: `[SEG]` or the null answer, with `Explanation: ...` when there is one. The release's null
    answer with an explanation had a double period (B11); data bugs are always fixed, so it has one.
    """
    answer = NULL_ANSWER if is_null else POSITIVE_ANSWER
    if explanation:
        answer = f"{answer} Explanation: {explanation}"
    return answer


@dataclass
class ParsedAnswer:
    """A generated answer: its text (special tokens dropped), whether it segments, and its explanation."""

    text: str
    has_seg: bool
    explanation: str


def parse_answer(text: str, has_seg: bool) -> ParsedAnswer:
    """Splits the explanation off an answer; an answer without `Explanation:` has an empty one (B13)."""
    _, found, explanation = text.partition("Explanation:")
    return ParsedAnswer(text=text.strip(), has_seg=has_seg, explanation=explanation.strip() if found else "")


def sample_release_frames(num_frames: int, count: int) -> list[int]:
    """
    The original sampler: the first and last frame plus `count - 2` frames at `1 + i * ((N - 2) // (count - 2))`.
    Asking for as many frames as there are, or more, gives every frame (the original crashed: B18).
    """
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    if count == 2:
        return [0, num_frames - 1]
    stride = (num_frames - 2) // (count - 2)
    return sorted({0, num_frames - 1, *(1 + i * stride for i in range(count - 2))})


def sample_linspace_frames(num_frames: int, count: int) -> list[int]:
    """`count` frames evenly spread over the video, first and last included (B17 fixed); no repeats."""
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


FRAME_SAMPLERS = {"release": sample_release_frames, "linspace": sample_linspace_frames}


def frame_token_modes(num_frames: int, max_visible: int, num_dense: int, sampler: str) -> list[int]:
    """
    Per frame: 2 dense (all its tokens), 1 pooled (one token) or 0 not shown to the LLM. Up to `max_visible` frames
    are shown, `num_dense` of them dense, both chosen by the sampler.
    """
    sample = FRAME_SAMPLERS[sampler]
    visible = sample(num_frames, min(num_frames, max_visible))
    dense = {visible[position] for position in sample(len(visible), min(len(visible), num_dense))}
    return [2 if index in dense else 1 if index in visible else 0 for index in range(num_frames)]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` tokens over `parts` segments, the first ones taking the remainder (as released)."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def audio_token_count(num_samples: int, sampling_rate: int = 16000, max_seconds: int = 30) -> int:
    """
    LLM tokens of an audio clip: mel frames (10 ms) -> stride-2 conv -> pooling by 2; about 25 a second, 750 max. The
    model computes the same count on tensors (`modeling_oisa.audio_token_counts`); this copy keeps the processor's
    remote code free of the model package.
    """
    mel_frames = min(num_samples, max_seconds * sampling_rate) // (sampling_rate // 100)
    after_conv = math.ceil(mel_frames / 2)
    return max((after_conv - 2) // 2 + 1, 0)
