"""The tiny byte-level BPE tokenizer every tiny family shares (trained once per process on a small fixed corpus, then
copied) and the LLaVA-1.5 chat template it carries."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
"""Placeholder token that the processor expands to one token per visual patch."""

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}{{ item['text'] }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ ' ' }}{% endif %}{{ 'ASSISTANT:' }}{% endif %}"
)
r"""LLaVA-1.5 style chat template: ``USER: <image>\n{question} ASSISTANT:``."""

_CORPUS: tuple[str, ...] = (
    "USER: What colour is the square? ASSISTANT: The square is red.",
    "USER: What colour is the circle? ASSISTANT: The circle is blue.",
    "USER: How many shapes are in the image? ASSISTANT: There are three shapes.",
    "USER: Is the triangle on the left or on the right? ASSISTANT: The triangle is on the left.",
    "USER: Describe the image. ASSISTANT: A green rectangle is next to a yellow square.",
    "USER: What is in the top left corner? ASSISTANT: A small orange box.",
    "USER: Count the red squares. ASSISTANT: One, two, three, four, five.",
    "USER: Which shape is the largest? ASSISTANT: The big purple circle is the largest.",
    "USER: Are there any blue shapes? ASSISTANT: Yes, there is one blue shape.",
    "USER: Is there a white background? ASSISTANT: No, the background is black.",
    "What colour is the object on the right?",
    "What shape is in the middle of the picture?",
    "How many rectangles can you see?",
    "Where is the green square?",
    "Which colour appears most often?",
    "Is the red box above or below the blue box?",
    "The image shows a grey background with coloured rectangles.",
    "Red, green, blue, yellow, orange, purple, pink, brown, black, white and grey are colours.",
    "Squares, circles, triangles, rectangles, lines and dots are shapes.",
    "Zero, one, two, three, four, five, six, seven, eight, nine, ten.",
    "Left, right, top, bottom, centre, middle, above, below, next to.",
    "There is a small red square on the left and a large blue circle on the right.",
    "The yellow triangle is at the top and the green line is at the bottom.",
    "Please answer the question about the image in one short sentence.",
    "Look at the picture and tell me what you see.",
    "I can see two squares and one circle.",
    "The answer is yes.",
    "The answer is no.",
    "Thank you for the question.",
    "Can you describe the colours in this image?",
    "What is the colour of the biggest rectangle?",
    "How many colours are there in the picture?",
)

_VOCAB_SIZE = 400


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return it serialised.

    Returns:
        The JSON serialisation of the trained :class:`tokenizers.Tokenizer`. A string is cached rather than the
        object so that every caller gets an independent, freshly deserialised copy.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B:1",
        special_tokens=[("<s>", bos_id)],
    )
    return tokenizer.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tiny byte-level BPE tokenizer (trained once per process, then copied).

    Returns:
        A left-padding :class:`transformers.PreTrainedTokenizerFast` with ``<s>``/``</s>``/``<pad>``/``<unk>``
        and the ``<image>`` placeholder (also exposed as ``tokenizer.image_token``/``image_token_id``) as special
        tokens. ``<s>`` is prepended to every encoded sequence.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )
