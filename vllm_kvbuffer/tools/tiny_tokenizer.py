"""The tokenizer of the tiny checkpoints: a byte-level BPE trained offline on a fixed corpus.

There is no model hub on the development and CI machines, so the tiny checkpoints
(:mod:`vllm_kvbuffer.tools.tiny_checkpoint`) carry their own tokenizer: exactly
:data:`VOCAB_SIZE` ids, the special tokens at ids 0..3, a ChatML-style chat template, and any text
encodable (all 256 bytes are in the initial alphabet). The corpus is built from a fixed word list
with a fixed seed, so the tokenizer never depends on a checkpoint's weight seed and every build
writes the same files.
"""

from __future__ import annotations

import pathlib
import random

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small fixed vocabulary; sentences are sampled from it with a fixed seed. Enough distinct
# words that BPE training reaches the full vocabulary from merges alone.
_WORDS = """
the a an of to in on at by for with from into over under after before between through about
and or but so if then else while when where which who whom whose what why how this that these
those it its they them their we us our you your he she his her i me my is are was were be been
being have has had do does did can could will would shall should may might must not no yes all
any some many much more most few less least each every other another same such only own very
model models token tokens layer layers head heads state states cache caches buffer buffers
kernel kernels attention linear gated delta rule decay gate gates value values key keys query
queries vector vectors matrix matrices memory memories write writes read reads flush flushes
batch batches request requests server servers engine engines worker workers scheduler prefix
prefill decode decoding sequence sequences length lengths block blocks page pages slot slots
speculative draft drafts accept accepted reject rejected verify verified target step steps
hello world quick brown fox jumps lazy dog cat sat mat tiny random weights testing test tests
once upon time there was little big small large fast slow early late first last next previous
number numbers zero one two three four five six seven eight nine ten hundred thousand million
red green blue yellow black white orange purple river mountain forest ocean island city town
morning evening night day week month year today tomorrow yesterday always never sometimes often
system user assistant question answer explain describe summarize translate write code python
function class return import print list dict string integer float true false none error result
"""

_PUNCT = [".", ",", "!", "?", ";", ":"]


def corpus() -> list[str]:
    """Built-in training text: fixed, so the tokenizer never depends on the weight seed."""
    words = _WORDS.split()
    rng = random.Random(20240531)
    lines = []
    for i in range(4000):
        n = rng.randint(4, 14)
        sent = " ".join(rng.choice(words) for _ in range(n))
        if i % 3 == 0:
            sent = sent.capitalize()
        if i % 7 == 0:
            sent += f" {rng.randint(0, 10**rng.randint(1, 6))}"
        if i % 11 == 0:
            sent = f"({sent})"
        if i % 13 == 0:
            sent = f'"{sent}"'
        lines.append(sent + rng.choice(_PUNCT))
    # Words in every casing and with a leading space, so common words become single tokens.
    lines.extend(" " + " ".join(words) for _ in range(3))
    lines.extend(" ".join(w.capitalize() for w in words) for _ in range(2))
    return lines


def build_tokenizer(out_dir: pathlib.Path, *, model_max_length: int,
                    extra_special_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """Train the tokenizer and save it HF-style into ``out_dir``; returns the special-token ids
    (``{token: id}``, in :data:`SPECIAL_TOKENS` order, then ``extra_special_tokens``, which get
    the ids after the trained vocabulary: ``VOCAB_SIZE``, ``VOCAB_SIZE + 1``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < VOCAB_SIZE:
        # Only if the corpus ran out of merges: keep every model id decodable.
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra_special_tokens],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if len(hf_tok) != VOCAB_SIZE + len(extra_special_tokens):
        raise RuntimeError(f"tokenizer has {len(hf_tok)} ids, expected "
                           f"{VOCAB_SIZE + len(extra_special_tokens)}")
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + extra_special_tokens}
    expected = list(range(len(SPECIAL_TOKENS))) + list(
        range(VOCAB_SIZE, VOCAB_SIZE + len(extra_special_tokens)))
    if list(ids.values()) != expected:
        raise RuntimeError(f"special token ids moved: {ids}")
    hf_tok.save_pretrained(str(out_dir))
    return ids
