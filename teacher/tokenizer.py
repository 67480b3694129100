"""Train the teacher's byte-level BPE tokenizer on the corpus train split.

Usage::

    python -m teacher.tokenizer --corpus data/corpus --out data/tokenizer --vocab 4096

The folder it writes (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) loads offline with
``transformers.AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from teacher.corpus import read_split

EOS = "<|endoftext|>"
#: Chat markers are reserved now so that a later chat fine-tune needs no resize.
SPECIAL_TOKENS: tuple[str, ...] = (EOS, "<|user|>", "<|assistant|>", "<|system|>")

#: A minimal chat template: role marker, content, end-of-text.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _texts(corpus_dir: Path, max_chars_per_doc: int = 50_000) -> Iterator[str]:
    # Long documents are truncated: their tail adds little new vocabulary and
    # slows the trainer (it keeps every word count in memory).
    for d in read_split(corpus_dir, "train"):
        yield d["text"][:max_chars_per_doc]


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int = 4096, model_max_length: int = 2048) -> None:
    """Train a byte-level BPE on the train split and save it for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps code indentation and line starts exact;
    # the byte-level alphabet guarantees no unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(corpus_dir), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(tmp))
    # Swap file by file (os.replace is atomic per file) so a crash never leaves
    # a half-written tokenizer.json in the target folder.
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the teacher tokenizer.")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--out", type=Path, default=Path("data/tokenizer"))
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args(argv)
    train_tokenizer(a.corpus, a.out, a.vocab)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(a.out))
    sample = "def f(x):\n    return x + 1  # ls -la | grep foo\n"
    ids = t(sample)["input_ids"]
    assert t.decode(ids) == sample, "tokenizer does not round-trip"
    print(json.dumps({"vocab": len(t), "sample_tokens": len(ids), "out": str(a.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
