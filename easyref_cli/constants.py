"""Constants of the EasyRef computation and the tool's defaults. Torch-free."""

from __future__ import annotations

#: The instruction the public checkpoint was trained with (DESIGN §2 rule 1).
INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, capturing the essence and "
    "details described in this prompt:\n"
)
#: Qwen2-VL chat template pieces, with the default system message.
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
IMAGE_PLACEHOLDER = "<|vision_start|>{pads}<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

NUM_REFERENCE_TOKENS = 64
COND_IMAGE_SIZE = 336
#: qwen_vl_utils pre-resize bounds (DESIGN §2 rule 2).
PRE_RESIZE_FACTOR = 28
PRE_RESIZE_MIN_PIXELS = 4 * 28 * 28
PRE_RESIZE_MAX_PIXELS = 16384 * 28 * 28
#: The unconditional reference: one black square image with an empty caption (rule 6).
UNCOND_IMAGE_SIZE = 512

#: The official ``generate()``'s negative prompt when none is given (``ip_adapter.py``).
OFFICIAL_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_MLLM = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_ADAPTER = "zongzhuofan/EasyRef"
#: Qwen2-VL control tokens: never allowed inside user text (captions, instructions).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_pad|>",
)
#: ``--offload`` choices (accelerate CPU offload of SDXL for small GPUs).
OFFLOAD_CHOICES = ("none", "model", "sequential")
