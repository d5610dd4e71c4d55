"""OISA's special tokens, in the order of the released vocabulary, and the tokenizer attributes that name them."""

CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# In the order InternVL2 and then OISA's stage 1 add them, so ids follow the released vocabulary.
OISA_SPECIAL_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<aud>",
    "</aud>",
    "<AUDIO_CONTEXT>",
    "<frame>",
    "</frame>",
    "[SEG]",
    "<sub_audio>",
    "</sub_audio>",
    "<SUB_AUDIO_CONTEXT>",
]

# Attribute names under which the tokenizer exposes the tokens the processor and model use (`tokenizer.seg_token_id`).
NAMED_SPECIAL_TOKENS = {
    "image_start_token": "<img>",
    "image_end_token": "</img>",
    "image_token": "<IMG_CONTEXT>",
    "ref_start_token": "<ref>",
    "ref_end_token": "</ref>",
    "audio_start_token": "<aud>",
    "audio_end_token": "</aud>",
    "audio_token": "<AUDIO_CONTEXT>",
    "seg_token": "[SEG]",
    "sub_audio_start_token": "<sub_audio>",
    "sub_audio_end_token": "</sub_audio>",
    "sub_audio_token": "<SUB_AUDIO_CONTEXT>",
}
