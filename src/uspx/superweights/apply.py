"""Zero or restore catalogued super weights in a copy of a model: ablate or restore exactly the
catalogued scalars, nothing else, and never in the source model.

The scalar's place comes from ``uspx.models.down_proj`` for the loaded model, and is checked
against the catalogue's ``param`` / ``storage_index``, so a catalogue from another layout or model
is refused instead of silently writing the wrong scalar.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from uspx.io import UspxError, read_json, write_json
from uspx.models import adapter_for, load_model
from uspx.models import down_proj as dp
from uspx.models.loading import resolve_model_path, stored_dtype

MODES = ("zero", "restore")


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint is stored in, so the copy keeps it (a bf16 teacher stays bf16)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise UspxError(f"{model_dir}: quantized checkpoint; dequantize it first (uspx writes plain safetensors)")
    return stored_dtype(model_dir)


def select_entries(cat: dict, entries: str | list) -> list[dict]:
    """``"all"`` (every super weight), indices into ``super_weights``, or entry dicts."""
    if entries == "all":
        chosen = list(cat.get("super_weights", []))
    else:
        chosen = []
        for e in entries:
            if isinstance(e, dict):
                chosen.append(e)
            else:
                try:
                    chosen.append(cat["super_weights"][int(e)])
                except (IndexError, ValueError):
                    raise UspxError(f"no super weight number {e!r} in the catalogue ({len(cat['super_weights'])} entries)") from None
    if not chosen:
        raise UspxError("no catalogue entries selected (the catalogue lists no super weight)")
    return chosen


def apply(
    model_dir: str | Path,
    catalogue: str | Path | dict,
    entries: str | list = "all",
    mode: str = "zero",
    out_dir: str | Path | None = None,
    *,
    trust_remote_code: bool = False,
) -> dict:
    """Write a copy of ``model_dir`` to ``out_dir`` with the chosen scalars zeroed or restored."""
    if mode not in MODES:
        raise UspxError(f"mode must be one of {MODES}, got {mode!r}")
    if out_dir is None:
        raise UspxError("give an output folder for the modified model copy")
    model_dir, out = Path(model_dir), Path(out_dir)
    if out.resolve() == model_dir.resolve():
        raise UspxError("the output folder must differ from the model folder (uspx never edits a model in place)")
    cat = read_json(catalogue) if not isinstance(catalogue, dict) else catalogue
    chosen = select_entries(cat, entries)
    model_dir = resolve_model_path(model_dir)
    lm = load_model(model_dir, dtype=_checkpoint_dtype(model_dir), trust_remote_code=trust_remote_code)
    adapter = adapter_for(lm.model)
    if adapter.family != cat["model"]["family"]:
        raise UspxError(f"catalogue is for a {cat['model']['family']} model, {model_dir} is {adapter.family}")
    done = []
    for ent in chosen:
        layer = adapter.layer(int(ent["layer"]))
        args = (adapter, layer, int(ent["expert"]), int(ent["col_model"]), int(ent["row_ff"]))
        param, index = dp.down_weight_index(*args)
        if param != ent["param"] or list(index) != list(ent["storage_index"]):
            raise UspxError(f"catalogue entry {param}{list(index)} disagrees with its stored place "
                            f"{ent['param']}{ent['storage_index']}: catalogue from another layout?")
        current = dp.get_down_weight(*args)
        stored = float(torch.tensor(float(ent["value"]), dtype=dp.down_weight_dtype(adapter, layer)))
        target = 0.0 if mode == "zero" else stored
        if current not in (stored, 0.0):
            raise UspxError(f"{param}{list(index)} holds {current:.6g}, neither the catalogued {stored:.6g} nor 0: "
                            "the catalogue belongs to another model")
        dp.set_down_weight(*args, target)
        done.append(dict(layer=ent["layer"], expert=ent["expert"], row_ff=ent["row_ff"], col_model=ent["col_model"],
                         param=param, storage_index=list(index), before=current, after=target))
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)  # safetensors
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out)
    record = dict(mode=mode, source=str(model_dir), source_fingerprint=lm.fingerprint,
                  catalogue_model_fingerprint=cat["model"]["fingerprint"], entries=done)
    write_json(out / "uspx_superweights_applied.json", record)
    return record
