"""When to call a tool, read from the model's hidden state: a linear probe, with a regular
expression as the baseline it must beat.

Labels come from the workload: a token is positive when its item belongs to the tool's family
(``arith`` for the calculator) and the text up to and including it ends with an arithmetic
expression and ``=``, so that what follows is a computed result. The probe is a logistic
regression on the hidden state after decoder layer ``layer`` at that token (standardised, classes
weighted by their frequency), trained on the calibration items and measured on the held-out ones:
precision and recall with 95% Wilson intervals, against the regular expression
:data:`TRIGGER` applied to the same tokens of every family.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from uspx.evaluate.stats import wilson
from uspx.io import UspxError, read_json, write_json

TRIGGER = re.compile(r"(?:^|\n)[ \t]*(-?\d[\d \t+\-*/().]*?)[ \t]*=[ \t]*$")  # "<arithmetic> =" ending a line so far


@dataclass
class Probe:
    """A linear probe over one layer's hidden states: ``sigmoid(((h - mean) / std) @ w + b) > threshold``."""

    layer: int
    weight: torch.Tensor  # [H]
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    threshold: float = 0.5
    tool: str = "calc"
    family: str = "arith"

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        z = (hidden.float() - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias)

    def fires(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scores(hidden) > self.threshold

    def save(self, folder: str | Path, record: dict | None = None) -> None:
        from safetensors.torch import save_file

        from uspx.io import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "probe.safetensors") as tmp:
            save_file({"weight": self.weight, "mean": self.mean, "std": self.std}, str(tmp))
        write_json(folder / "probe.json", dict(layer=self.layer, bias=self.bias, threshold=self.threshold,
                                               tool=self.tool, family=self.family, **(record or {})))

    @classmethod
    def load(cls, folder: str | Path) -> "Probe":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "probe.json").exists():
            raise UspxError(f"{folder}: no probe.json (train one with `uspx probe`)")
        meta, t = read_json(folder / "probe.json"), load_file(str(folder / "probe.safetensors"))
        return cls(int(meta["layer"]), t["weight"], float(meta["bias"]), t["mean"], t["std"],
                   float(meta["threshold"]), meta["tool"], meta["family"])


@dataclass
class Detection:
    """Precision and recall of a detector on labelled tokens, with 95% Wilson intervals."""

    true_positive: int
    false_positive: int
    false_negative: int
    precision: float | None
    precision_ci: tuple[float, float] | None
    recall: float | None
    recall_ci: tuple[float, float] | None


def detection(predicted: np.ndarray, labels: np.ndarray) -> Detection:
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return Detection(tp, fp, fn, tp / (tp + fp) if tp + fp else None, wilson(tp, tp + fp),
                     tp / (tp + fn) if tp + fn else None, wilson(tp, tp + fn))


def token_labels(text: str, offsets: list[tuple[int, int]], positive_family: bool) -> tuple[np.ndarray, np.ndarray]:
    """(labels, regex) per token of ``text``: the label rule (tool family and trigger) and the
    regular-expression baseline (trigger alone, whatever the family)."""
    regex = np.array([bool(TRIGGER.search(text[: end])) for _, end in offsets])
    return regex & positive_family, regex


def _hidden_and_labels(model, tokenizer, items, layer: int, family: str, max_length: int):
    from uspx.engine.forward import forward

    feats, labels, regex = [], [], []
    for it in items:
        text = it.prompt + (it.completion or "")
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, truncation=True,
                        max_length=max_length)
        if not enc["input_ids"]:
            continue
        out = forward(model, torch.tensor([enc["input_ids"]]), head=False, output_hidden_states=True)  # no logits needed
        feats.append(out.hidden_states[layer + 1][0].float().cpu())  # [0] is the embedding output
        lab, reg = token_labels(text, enc["offset_mapping"], it.family == family)
        labels.append(lab)
        regex.append(reg)
    return torch.cat(feats), np.concatenate(labels), np.concatenate(regex)


def train_probe(model, tokenizer, workload, *, family: str = "arith", tool: str = "calc", layer: int | None = None,
                steps: int = 300, max_length: int = 512, seed: int = 0) -> tuple[Probe, dict]:
    """Train the probe on ``workload``'s calibration items, measure it and the regular expression on
    its held-out items; returns the probe and the report."""
    n_layers = int(model.config.num_hidden_layers)
    layer = n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < n_layers:
        raise UspxError(f"--layer must lie in 0..{n_layers - 1}")
    if family not in workload.families:
        raise UspxError(f"{workload.source} has no {family!r} items to learn the {tool} trigger from")
    x, y, _ = _hidden_and_labels(model, tokenizer, workload.part("calibration").items, layer, family, max_length)
    if not y.any():
        raise UspxError(f"no calibration token of family {family!r} ends an arithmetic expression with '='")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = torch.from_numpy(y.astype(np.float32))
    pos_weight = torch.tensor(float((~y).sum()) / max(1.0, float(y.sum())))
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, pos_weight=pos_weight)
        loss = loss + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = Probe(layer, w.detach().clone(), float(b.detach()), mean, std, 0.5, tool, family)
    xh, yh, rh = _hidden_and_labels(model, tokenizer, workload.part("heldout").items, layer, family, max_length)
    fired = probe.fires(xh).numpy()
    report = dict(layer=layer, family=family, tool=tool, calibration_tokens=int(len(y)),
                  calibration_positives=int(y.sum()), heldout_tokens=int(len(yh)), heldout_positives=int(yh.sum()),
                  probe=asdict(detection(fired, yh)), regex=asdict(detection(rh, yh)),
                  label_rule=f"family {family!r} and the text so far ends with an arithmetic expression and '='",
                  regex_rule=TRIGGER.pattern)
    return probe, report
