"""Routing-aware super-weight and super-expert detection for MoE models.

``detect(model, workload, out_dir, ...)`` writes ``superweights.json`` (the catalogue) and
``report.md``; ``apply(model_dir, catalogue, entries, mode, out_dir)`` zeroes or restores
catalogued scalars in a model copy; ``run_cli(...)`` takes the CLI's flags as given on the
command line.
"""

from __future__ import annotations

from pathlib import Path

from uspx.io import UspxError
from uspx.superweights.apply import apply
from uspx.superweights.detect import detect


def _number_or_auto(value: str | float, name: str) -> str | float:
    if isinstance(value, (int, float)) or str(value).strip().lower() == "auto":
        return value if isinstance(value, (int, float)) else "auto"
    try:
        return float(value)
    except ValueError:
        raise UspxError(f"--{name} must be 'auto' or a number, got {value!r}") from None


def _entries(spec: str) -> str | list[int]:
    if spec.strip().lower() == "all":
        return "all"
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UspxError(f"entries must be 'all' or comma-separated numbers, got {spec!r}") from None


def run_cli(
    model: str,
    workload: str,
    out: str | Path,
    *,
    p_active_floor: float = 0.01,
    routing_entropy_thr: str = "auto",
    co_spike_tau: str = "auto",
    router_bias: float = 2.0,
    proxies: str = "energy,stopwords",
    score_modes: str = "natural,interventional",
    max_candidates: int = 128,
    apply_zero: str | None = None,
    apply_restore: str | None = None,
    apply_out: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """``uspx superweights MODEL WORKLOAD -o OUT --p-active-floor F --routing-entropy-thr auto|X
    --co-spike-tau auto|X --router-bias B --proxies energy,stopwords --score-modes natural,interventional
    [--max-candidates N] [--apply-zero all|0,1 | --apply-restore all|0,1 --apply-out DIR]``.

    With ``--apply-zero`` / ``--apply-restore`` the detector does not run: the catalogue
    ``OUT/superweights.json`` is read and the chosen entries are zeroed / restored in a copy of
    MODEL written to ``--apply-out``. Returns the catalogue, or the apply record.
    """
    if apply_zero is not None and apply_restore is not None:
        raise UspxError("give --apply-zero or --apply-restore, not both")
    if apply_zero is not None or apply_restore is not None:
        mode, spec = ("zero", apply_zero) if apply_zero is not None else ("restore", apply_restore)
        if apply_out is None:
            raise UspxError(f"--apply-{mode} needs --apply-out DIR for the modified copy")
        return apply(model, Path(out) / "superweights.json", _entries(spec), mode, apply_out, trust_remote_code=trust_remote_code)
    return detect(
        model, workload, out,
        p_active_floor=p_active_floor,
        routing_entropy_thr=_number_or_auto(routing_entropy_thr, "routing-entropy-thr"),
        co_spike_tau=_number_or_auto(co_spike_tau, "co-spike-tau"),
        router_bias=router_bias,
        proxies=tuple(p for p in proxies.split(",") if p.strip()),
        score_modes=tuple(m for m in score_modes.split(",") if m.strip()),
        max_candidates=max_candidates,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )


__all__ = ["apply", "detect", "run_cli"]
