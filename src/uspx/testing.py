"""Tiny random models of the real transformers families, for tests and benchmarks.

They run the same code paths as the full-size models; their routing carries no structure, so they
check correctness, never quality.
"""

from __future__ import annotations

import string

import torch

from uspx.models.tiny import TINY_CONFIGS, tiny_config_kwargs

__all__ = ["CHARS", "TINY_CONFIGS", "char_tokenizer", "tiny_config", "tiny_model"]

CHARS = string.printable[:95]  # digits, letters, punctuation, space


def char_tokenizer():
    """A character tokenizer (ids < 100) that fits every tiny config's vocabulary, and any real one:
    for tests, and for benchmarks on random-weight checkpoints where no text means more than another."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_config(family: str):
    """The transformers config of ``family``'s tiny model (:mod:`uspx.models.tiny`)."""
    from transformers import AutoConfig

    kwargs = tiny_config_kwargs(family)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny model of ``family`` in eval mode.

    Router weights are scaled up so that routing is decisive (ties between near-equal logits would
    make comparisons fragile), and biases are randomised so that bias handling is exercised.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.normal_(0, 0.1)
            elif p.dim() >= 2 and ("router" in name or "gate.weight" in name):
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
        # Persistent 1-D float buffers are router state (deepseek's e_score_correction_bias, zero at
        # init): randomise them too, or a router that ignored them would pass every test.
        params = dict(model.named_parameters())
        for name, t in model.state_dict(keep_vars=True).items():
            if name not in params and t.dim() == 1 and t.is_floating_point():
                t.normal_(0, 0.1)
    model.eval()
    return model
