"""The toy world's tokenizer: character level over printable ASCII, built offline.

It is saved as a regular Hugging Face fast tokenizer with a Qwen-style chat template, so every
code path loads it with `AutoTokenizer.from_pretrained` exactly as it loads a hub tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_toy_tokenizer():
    """Return a `PreTrainedTokenizerFast` over printable ASCII plus newline and 4 specials."""
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, eos_token=IM_END, unk_token=UNK
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf
