"""The ``uspx`` command line. Every command only parses arguments and calls the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from uspx.io import UspxError
from uspx.progress import console

app = typer.Typer(
    help="uspx: find the experts of a Mixture-of-Experts model that carry your workload, and keep them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

MODEL_ARG = typer.Argument("default", help="Local model folder, or 'default' for the bundled uspx teacher.")
WORKLOAD_ARG = typer.Argument(
    "python_dev", help="Workload JSONL file or text folder, or a bundled workload name (python_dev, shell_user, docs_writer, mixed)."
)
REMOTE = typer.Option(False, "--trust-remote-code", help="Allow a model's own Python code to run (off by default).")


@app.command()
def families() -> None:
    """List the supported model families."""
    from uspx.models import ADAPTERS

    for name, cls in sorted(ADAPTERS.items()):
        console.print(f"{name:12s} model_type: {', '.join(cls.model_types)}")


@app.command()
def workload(path: str = WORKLOAD_ARG, heldout: float = typer.Option(0.2, help="Held-out share for items without a split.")) -> None:
    """Read and check a workload; print its families and splits."""
    from uspx.workload import load_workload

    wl = load_workload(path, heldout_fraction=heldout)
    for line in wl.summary.lines_of_text():
        console.print(line)
    console.print(f"fingerprint: {wl.fingerprint[:16]}")


@app.command()
def trace(
    model: str = MODEL_ARG,
    workload: str = WORKLOAD_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the trace (resumes if it holds a partial one)."),
    split: str = typer.Option("all", help="Which part of the workload: all, calibration or heldout."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    max_length: Optional[int] = typer.Option(None, help="Truncate items to this many tokens (default: the model's context, at most 2048)."),
    logits: bool = typer.Option(False, "--logits", help="Also record full router logits."),
    norms: bool = typer.Option(False, "--norms", help="Also record each routed expert's output norm (for REAP/EAN)."),
    trust_remote_code: bool = REMOTE,
) -> None:
    """Record, for every real token and MoE layer, the experts chosen and their weights."""
    from uspx.trace import trace as run_trace

    manifest = run_trace(
        model, workload, out, split=split, batch_size=batch_size, max_length=max_length, logits=logits,
        norms=norms, trust_remote_code=trust_remote_code,
    )
    s = manifest["summary"]
    console.print(f"[bold]model[/]: {manifest['model']['label']}  ({manifest['model']['family']}, "
                  f"{len(manifest['model']['moe_layers'])} MoE layers, {manifest['model']['num_experts']} experts, top-{manifest['model']['top_k']})")
    console.print(f"[bold]workload[/]: {manifest['workload']['source']}")
    for key in ("items", "skipped_empty", "truncated", "truncated_tokens", "tokens", "rows"):
        console.print(f"  {key}: {s[key]}")
    console.print(f"  families: {s['families']}  splits: {s['splits']}")
    console.print(f"trace written to {out} ({len(manifest['shards'])} shards)")


@app.command()
def plan(
    model: str = MODEL_ARG,
    budget: Optional[str] = typer.Option(None, help="Memory budget, e.g. 8GiB: prints how many experts per layer fit."),
    context: int = typer.Option(4096, help="Context length in tokens for the KV cache."),
    dtype: str = typer.Option("bf16", help="Weights precision: fp32, bf16, fp16, int8, int4, mxfp4 (experts at 4.25 bits, rest bf16)."),
    kv_dtype: str = typer.Option("bf16", help="KV cache precision: fp32, bf16, fp16, fp8, int8, int4."),
    batch: int = typer.Option(1, help="Sequences held in the KV cache at once."),
    experts_per_layer: Optional[int] = typer.Option(None, help="Size the model with this many experts per layer."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also write the breakdown as JSON."),
) -> None:
    """Memory of a model from its config alone (no weights loaded): weights per dtype, KV cache, experts that fit."""
    from uspx.io import write_json
    from uspx.models.loading import resolve_model_path
    from uspx.plan import estimate, fit_experts

    path = resolve_model_path(model)
    result: dict = {}
    if budget is not None:
        fit = fit_experts(path, budget, context=context, dtype=dtype, kv_dtype=kv_dtype, batch=batch)
        console.print(fit.estimate)
        console.print(("[green]" if fit.fits else "[red]") + fit.message())
        result = dict(fit.estimate.breakdown(), budget_bytes=fit.budget_bytes, fits=fit.fits,
                      experts_per_layer_fit=fit.experts_per_layer, min_budget_bytes=fit.min_budget_bytes)
    else:
        est = estimate(path, dtype, context=context, kv_dtype=kv_dtype, batch=batch, experts_per_layer=experts_per_layer)
        console.print(est)
        result = est.breakdown()
    if out is not None:
        write_json(out, result)
        console.print(f"written to {out}")
    if result.get("fits") is False:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except UspxError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
