"""The stopword set S of proxy B (stopword-mass skew), built from the model's own tokenizer.

Super weights in dense models are known to shift probability mass towards stopwords when removed
(Yu et al. 2024). Which token ids are "stopwords" depends on the tokenizer, so the set is every
token that decodes to a common English function word (with or without a leading space, any case)
or to punctuation and whitespace only. Special tokens are never included.
"""

from __future__ import annotations

import string

import torch

FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet if then else of to in on at by for with from into onto upon
    about as than that this these those there here it its is are was were be been being am do does
    did have has had not no i you he she we they me him her us them my your his our their what which
    who whom whose when where why how all any each some such can could will would shall should may
    might must also just only very too up down out over under again off""".split()
)
_PUNCT_SPACE = set(string.punctuation) | set(string.whitespace) | {"\u2581", "\u0120", "\u010a"}


def is_stopword(text: str) -> bool:
    """Function word, or a non-empty string of punctuation and whitespace only."""
    if not text:
        return False
    if all(ch in _PUNCT_SPACE for ch in text):
        return True
    return text.strip().lower() in FUNCTION_WORDS


def stopword_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids below ``vocab_size`` (the model's logit width) whose token is a stopword."""
    n = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    ids = [i for i, t in enumerate(texts) if i not in special and is_stopword(t)]
    return torch.tensor(ids, dtype=torch.long)
