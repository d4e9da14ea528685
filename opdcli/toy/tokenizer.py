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


FORMS_VOCAB = 2048
FORMS_EMBEDDINGS = 384
"""Embedding / output rows of the forms world's models (the tokenizer's length padded)."""
FORMS_ENDOFTEXT = "<|endoftext|>"


def build_forms_tokenizer(vocab_size: int = FORMS_VOCAB, corpus_size: int = 6000):
    """The forms world's tokenizer: byte-level BPE (at most `vocab_size` tokens; Qwen's
    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` among them) trained offline on the rendered
    chat of `corpus_size` problems in every style. Digits are split one by one before the
    byte-level step, as Qwen's tokenizers do, so numbers are digit sequences and words and
    punctuation are merged. The world's small language supports fewer merges than
    `vocab_size`; the models pad their embeddings beyond the tokenizer (`FORMS_EMBEDDINGS`), as
    real checkpoints do. Deterministic: the corpus is seeded."""
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    from opdcli.toy.forms import STYLES, FormsTask

    specials = [FORMS_ENDOFTEXT, IM_START, IM_END]
    texts = []
    for j, style in enumerate(STYLES):
        task = FormsTask(style=style)
        for _, problem in zip(range(corpus_size // len(STYLES)), task.stream(seed=97 + j), strict=False):
            texts.append(f"{IM_START}user\n{problem.prompt}{IM_END}\n{IM_START}assistant\n{problem.solution}{IM_END}\n")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=FORMS_ENDOFTEXT, eos_token=IM_END)
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf
