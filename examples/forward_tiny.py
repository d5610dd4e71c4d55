"""Load an OISA checkpoint with AutoModel and run one training forward and one generation on a random clip.

Usage: python examples/forward_tiny.py CHECKPOINT_DIR   (a folder written by `oisa tiny-random`)
"""

import sys

import torch
from transformers import AutoModel, AutoTokenizer

import modeling_oisa  # noqa: F401  (registers the `oisa` model type)


def main(checkpoint: str) -> None:
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = model.config
    size, dense_tokens = config.image_size, config.num_image_tokens

    # three frames (dense, pooled, hidden from the LLM), a 2 s soundtrack and a 1.3 s spoken expression
    image_token_modes = torch.tensor([2, 1, 0])
    pixel_values = torch.randn(3, 3, size, size)
    mel_lengths = torch.tensor([200, 130])
    soundtrack_tokens, speech_tokens = [int(n) for n in modeling_oisa.audio_token_counts(mel_lengths)]

    def image(tokens: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * tokens + "</img>"

    def audio(tokens: int) -> str:
        return "<aud>" + "<AUDIO_CONTEXT>" * tokens + "</aud>"

    half = soundtrack_tokens // 2
    user = (
        f"Frame1: {image(dense_tokens)}<sub_aud>{'<SUB_AUDIO_CONTEXT>' * (soundtrack_tokens - half)}</sub_aud>\n"
        f"Frame2: {image(1)}<sub_aud>{'<SUB_AUDIO_CONTEXT>' * half}</sub_aud>\n{audio(soundtrack_tokens)}\n"
        f"Please segment the object this sentence describes in this video: <ref>{audio(speech_tokens)}</ref>"
    )
    prompt = f"<|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n"
    answer = "Sure, it is [SEG].<|im_end|>"
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    input_ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
    labels = input_ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    gt_masks = torch.zeros(3, size, size)
    gt_masks[:, size // 4 : size // 2, size // 3 : 2 * size // 3] = 1.0

    inputs = {
        "pixel_values": pixel_values,
        "image_token_modes": image_token_modes,
        "input_features": torch.randn(2, 128, 3000),
        "audio_feature_lengths": mel_lengths,
        "audio_token_modes": torch.tensor([2, 1]),
    }
    model.train()
    output = model(input_ids=input_ids, labels=labels, gt_masks=gt_masks, **inputs)
    output.loss.backward()
    print(f"loaded {type(model).__name__} ({model.num_parameters():,} parameters) from {checkpoint}")
    print("training forward:", {name: round(getattr(output, name).item(), 4) for name in
                                ("loss", "lm_loss", "class_loss", "dice_loss", "bce_loss")})
    print("mask logits per frame:", tuple(output.mask_logits[0].shape))

    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=prompt_ids, max_new_tokens=8, do_sample=False, **inputs)
    print("generated ids:", generated[0, prompt_ids.shape[1] :].tolist())


if __name__ == "__main__":
    main(sys.argv[1])
