"""The ``uspx`` command line. Every command only parses arguments and calls the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from uspx.io import FingerprintMismatch, UspxError, read_json, record_path, write_json
from uspx.progress import console

app = typer.Typer(
    help="uspx: find the experts of a Mixture-of-Experts model that carry your workload, and keep them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _set_threads(ctx: typer.Context, threads: Optional[int]) -> Optional[int]:
    """--threads' callback: set before the command runs, so that no command taking it can forget to;
    shell completion only parses, and sets nothing."""
    if threads is not None and not ctx.resilient_parsing:
        if threads < 1:
            raise UspxError(f"--threads must be >= 1, not {threads}")
        import torch

        torch.set_num_threads(threads)
    return threads


# Options that several commands share, declared once; defaults stay in each signature.
ModelArg = Annotated[str, typer.Argument(help="Local model folder, or 'default' for the bundled uspx teacher.")]
WorkloadArg = Annotated[str, typer.Argument(help="Workload JSONL file or text folder, or a bundled workload name (python_dev, shell_user, docs_writer, mixed, checked).")]
Streaming = Annotated[bool, typer.Option("--streaming", help="Run a decoder layer at a time from the safetensors files, never loading the whole model (models larger than memory; `uspx plan --streaming` predicts the peak).")]
ComputeDtype = Annotated[str, typer.Option("--dtype", "--compute-dtype", help="Precision the model computes in, loaded whole or layer by layer (--streaming): auto (the checkpoint's stored float type: fp32 stays fp32, bf16 stays bf16, MXFP4 experts decode to the type of the rest), bf16, fp16 or fp32.")]
Device = Annotated[Optional[str], typer.Option("--device", help="Where the model computes: the whole model is loaded there, or with --streaming each decoder layer (and the hidden states it needs) is moved there for its turn and back, e.g. cuda or cuda:1 (default: the CPU).")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="Place the whole model across devices with accelerate: auto, balanced, sequential, or a JSON file of module name -> device (0, cuda:1, cpu, disk); modules on disk are read from the safetensors files at each forward (taylor scores need every expert weight off disk).")]
MaxMemory = Annotated[Optional[str], typer.Option("--max-memory", help="With --device-map auto/balanced/sequential: the most each device may hold, e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest goes to disk).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run (off by default).")]
Threads = Annotated[Optional[int], typer.Option("--threads", callback=_set_threads, help="Torch threads for running the model (default: torch's; 1 is often fastest for small models or on a busy machine).")]
LlamaThreads = Annotated[Optional[int], typer.Option("--threads", help="llama.cpp's threads for the importance matrix and quantization.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward pass.")]
MaxLength = Annotated[Optional[int], typer.Option(help="Truncate items to this many tokens (default 512, or the model's context when shorter; the same in every command).")]
MaxTokens = Annotated[Optional[int], typer.Option(help="Subsample whole prompts to about this many tokens for model-based scores.")]
ToolFamilies = Annotated[Optional[str], typer.Option("--tool-families", help="With the capability score method: comma-separated families whose work goes to tools (virtual experts), e.g. arith.")]
Budget = Annotated[Optional[str], typer.Option(help="Memory budget for weights + KV cache, e.g. 8GiB.")]
Keep = Annotated[Optional[str], typer.Option(help="Experts to keep per layer instead of a budget: a share (50%) or a count.")]
BudgetContext = Annotated[int, typer.Option(help="Context length the budget's KV cache must hold.")]
KvDtype = Annotated[str, typer.Option(help="KV cache precision: fp32, bf16, fp16, fp8, int8, int4.")]
NonUniform = Annotated[bool, typer.Option("--non-uniform", help="Allow different counts per layer (export pads with never-routed experts).")]
Epsilon = Annotated[float, typer.Option(help="Largest acceptable loss increase per family (nats per token) for the verdict.")]
NoSpeed = Annotated[bool, typer.Option("--no-speed", help="Skip the prefill/decode speed measurement.")]
Samples = Annotated[int, typer.Option("--samples", help="Answers per checked item (pass@k); more than 1 needs --temperature.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature for checked items (0: greedy).")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per checked item unless the item sets max_new_tokens.")]
MaxPassDrop = Annotated[Optional[float], typer.Option("--max-pass-drop", help="Largest acceptable pass@1 drop against the original (the teacher) per checked family (items with answer, regex, json or tests checks), e.g. 0.05; adds a rule to the verdict.")]
StableKeep = Annotated[Optional[str], typer.Option(help="Until stable: experts kept per layer, a share (50%) or a count.")]
StableBudget = Annotated[Optional[str], typer.Option(help="Until stable: or a memory budget for weights + KV cache, e.g. 8GiB.")]
StableMethod = Annotated[str, typer.Option(help="Until stable: the score, from the trace: frequency, reap, ean (traced with norms) or reconstruction (sums computed while tracing).")]
StableBlock = Annotated[int, typer.Option(help="Until stable: items between two looks at the kept set.")]
StableSeed = Annotated[int, typer.Option(help="Until stable: seed of the items' order and of the resamples.")]
StableTolerance = Annotated[float, typer.Option(help="Until stable: the kept set's Jaccard index with the block before's must be at least 1 - tolerance.")]
StablePatience = Annotated[int, typer.Option(help="Until stable: blocks in a row within the tolerance before stopping.")]
Steps = Annotated[int, typer.Option(help="Training steps at most (early stopping on a validation slice of the calibration items may end sooner).")]
Minutes = Annotated[Optional[float], typer.Option(help="Stop training after this many minutes.")]
Kd = Annotated[float, typer.Option(help="Weight of token-level distillation from the original.")]
LayerWeight = Annotated[float, typer.Option(help="Weight of matching each MoE layer's output to the original's.")]
Tau = Annotated[float, typer.Option(help="Distillation temperature.")]
Generated = Annotated[int, typer.Option(help="Extra training items per calibration item: continuations the original writes from its prompt (0: none).")]
Others = Annotated[Optional[str], typer.Option(help="Workload whose held-out items show what specialising costs elsewhere (default for the bundled teacher: mixed).")]
ImatrixWorkload = Annotated[Optional[str], typer.Option("--imatrix-workload", help="Make llama.cpp's importance matrix (llama-imatrix) from this workload's calibration items and quantize by it.")]
ImatrixFile = Annotated[Optional[Path], typer.Option("--imatrix", help="An importance matrix file made by llama-imatrix (yours or a shared one).")]


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _open(model: str, *, streaming: bool, dtype: str, device: Optional[str] = None, device_map: Optional[str] = None,
          max_memory: Optional[str] = None, trust_remote_code: bool = False, own_gpu: bool = False):
    """The model opened once for every stage of a command: whole, or a decoder layer at a time
    (--streaming). Under torchrun a device map (one process's placement) is refused, and with
    ``own_gpu`` each process computes on its own GPU."""
    from uspx.dist import current
    from uspx.engine import open_source

    d = current()
    if d.active and (device_map is not None or max_memory is not None):
        raise UspxError(f"--device-map places one process's model across devices; this run has {d.world} "
                        "processes, each with its own copy: start it without torchrun")
    if own_gpu and device is None and d.device != "cpu":
        device = d.device
    return open_source(model, streaming=streaming, dtype=dtype, device=device, device_map=device_map,
                       max_memory=max_memory, trust_remote_code=trust_remote_code)


@app.command()
def families() -> None:
    """List the supported model families."""
    from uspx.models import ADAPTERS

    for name, cls in sorted(ADAPTERS.items()):
        console.print(f"{name:12s} model_type: {', '.join(cls.model_types)}")


@app.command()
def workload(
    path: WorkloadArg = "python_dev",
    heldout: float = typer.Option(0.2, help="Held-out share for items without a split."),
    model: str = typer.Option("default", help="Model whose tokenizer counts the tokens and what is truncated."),
    max_length: MaxLength = None,
) -> None:
    """Read and check a workload; print its families, splits, tokens and what the other commands truncate."""
    from transformers import AutoConfig, AutoTokenizer

    from uspx.models.loading import resolve_model_path
    from uspx.workload import default_max_length, encode, load_workload

    wl = load_workload(path, heldout_fraction=heldout)
    folder = resolve_model_path(model)
    length = max_length or default_max_length(AutoConfig.from_pretrained(folder))
    items = encode(wl, AutoTokenizer.from_pretrained(folder), length)  # counts what is truncated
    console.print(f"{sum(len(e.input_ids) for e in items)} tokens after truncation to {length} ({model}'s tokenizer)")
    for line in wl.summary.lines_of_text():
        console.print(line)
    console.print(f"fingerprint: {wl.fingerprint[:16]}")


@app.command()
def trace(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the trace (resumes if it holds a partial one)."),
    split: str = typer.Option("all", help="Which part of the workload: all, calibration or heldout."),
    batch_size: BatchSize = 8,
    max_length: MaxLength = None,
    logits: bool = typer.Option(False, "--logits", help="Also record full router logits."),
    norms: bool = typer.Option(False, "--norms", help="Also record each routed expert's output norm (for REAP/EAN)."),
    reconstruction: bool = typer.Option(False, "--reconstruction", help="Also compute the reconstruction score's sums in the same pass (`uspx score` then needs no model pass for it)."),
    items_per_shard: int = typer.Option(64, "--items-per-shard", help="Items per Parquet shard (the unit a killed run resumes from, and that torchrun's processes share out)."),
    until_stable: bool = typer.Option(False, "--until-stable", help="Trace the calibration items a --block at a time and stop once the kept set under --keep / --budget has settled (OUT: blocks/, trace/ of the items traced, workload.jsonl, scores/, stable.json; docs/stable.md)."),
    keep: StableKeep = None,
    budget: StableBudget = None,
    method: StableMethod = "frequency",
    block: StableBlock = 16,
    tolerance: StableTolerance = 0.05,
    patience: StablePatience = 2,
    seed: StableSeed = 0,
    streaming: Streaming = False,
    compute_dtype: ComputeDtype = "auto",
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
) -> None:
    """Record, for every real token and MoE layer, the experts chosen and their weights. Under
    `torchrun --nproc_per_node N -m uspx trace ...` the shards are shared out among the processes."""
    if until_stable:
        _trace_until_stable(model, workload, out, keep=keep, budget=budget, method=method, block=block,
                            tolerance=tolerance, patience=patience, seed=seed, batch_size=batch_size,
                            max_length=max_length, compute_dtype=compute_dtype)
        return
    if keep is not None or budget is not None:
        raise UspxError("--keep and --budget go with --until-stable")
    from uspx.dist import current
    from uspx.trace import trace as run_trace

    opened = _open(model, streaming=streaming, dtype=compute_dtype, device=device, device_map=device_map,
                   max_memory=max_memory, trust_remote_code=trust_remote_code, own_gpu=True)
    manifest = run_trace(opened, workload, out, split=split, batch_size=batch_size, max_length=max_length,
                         logits=logits, norms=norms, reconstruction=reconstruction, items_per_shard=items_per_shard)
    if not current().main:
        return
    m, s = manifest["model"], manifest["summary"]
    console.print(f"[bold]model[/]: {m['label']}  ({m['family']}, {len(m['moe_layers'])} MoE layers, "
                  f"{m['num_experts']} experts, top-{m['top_k']})")
    console.print(f"[bold]workload[/]: {manifest['workload']['source']}")
    for key in ("items", "skipped_empty", "duplicates", "truncated", "truncated_tokens", "tokens", "rows"):
        console.print(f"  {key}: {s[key]}")
    console.print(f"  families: {s['families']}  splits: {s['splits']}")
    console.print(f"trace written to {out} ({len(manifest['shards'])} shards)")


@app.command()
def plan(
    model: ModelArg = "default",
    budget: Optional[str] = typer.Option(None, help="Memory budget, e.g. 8GiB: prints how many experts per layer fit."),
    context: int = typer.Option(4096, help="Context length in tokens for the KV cache."),
    dtype: Optional[str] = typer.Option(None, help="Weights precision: fp32, bf16, fp16, int8, int4, mxfp4 (experts at 4.25 bits, rest bf16). Default: the checkpoint's, read from its weights, or from the config's quantization_config / dtype when the folder holds only a config."),
    kv_dtype: KvDtype = "bf16",
    batch: int = typer.Option(1, help="Sequences held in the KV cache at once."),
    experts_per_layer: Optional[int] = typer.Option(None, help="Size the model with this many experts per layer."),
    student: Optional[int] = typer.Option(None, "--student", help="Also size a dense student of this many experts per layer (`uspx student -m M`) beside the pruned MoE keeping as many."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also write the breakdown as JSON."),
    streaming: bool = typer.Option(False, "--streaming", help="Print the peak memory of a layer-by-layer trace / score / extract instead (any family)."),
    tokens: int = typer.Option(2048, help="With --streaming: workload tokens (all sequences together)."),
    seq_len: int = typer.Option(512, help="With --streaming: longest sequence, in tokens."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="With --streaming: the precision the layers compute in (auto: the checkpoint's stored float type; bf16, fp16, fp32)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Pruning against offload: the GPU's memory (8GiB) or a preset (rtx2080, rtx3060, rtx4060, rtx4070, rtx4090, rtx4000ada, a4500, h100); prints what fits and llama.cpp's predicted speed, full model with its best --n-cpu-moe against pruned ones. 0 or cpu: no GPU."),
    gpu_bandwidth: Optional[float] = typer.Option(None, "--gpu-bandwidth", help="With --gpu: the GPU's effective memory bandwidth in GB/s (a preset's: 80% of its peak)."),
    cpu_preset: Optional[str] = typer.Option(None, "--ram", help="With --gpu: system memory preset (ddr4-2ch, the default; ddr5-2ch; ddr5-8ch) or 'measure' (a short read of 512 MiB here)."),
    cpu_bandwidth: Optional[float] = typer.Option(None, "--ram-bandwidth", help="With --gpu: system memory's effective bandwidth in GB/s."),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="With --gpu: name the smallest pruning whose decode speed is this many times the full model's (e.g. 2)."),
    cpu_threads: Optional[int] = typer.Option(None, "--cpu-threads", help="With --gpu: llama.cpp's CPU threads; few threads process fewer weight bytes per second than the memory delivers (3.9 GB/s each, as measured on AVX-512 cores)."),
) -> None:
    """Memory of a model from its config alone (no weights loaded): weights per dtype, KV cache, experts
    that fit; with --gpu, pruning against llama.cpp's expert offload, predicted speed included."""
    from uspx.models.loading import resolve_model_path

    path = resolve_model_path(model)
    if dtype is None and not streaming and any(path.glob("*.safetensors")):
        from uspx.extract import checkpoint_dtype

        dtype = checkpoint_dtype(path)  # as the weights are stored; with no weights, None: the config's
    if gpu is not None:
        from uspx.plan import speed as sp

        hw, measured = sp.user_hardware(gpu, gpu_bandwidth=gpu_bandwidth, ram=cpu_preset, ram_bandwidth=cpu_bandwidth,
                                        cpu_threads=cpu_threads)
        result = sp.offload_plan(path, hw, dtype=dtype, context=context, kv_dtype=kv_dtype, speedup=speedup)
        sp.print_offload_plan(result)
        if measured is not None:
            console.print(f"system memory measured here: {measured:.1f} GB/s (one thread's read; all cores may read more)")
        if out is not None:
            write_json(out, result.as_dict())
        return
    from uspx.plan import estimate, fit_experts

    if streaming:
        from uspx.plan.streaming import print_streaming_plan

        result = print_streaming_plan(path, tokens, seq_len=seq_len, dtype=compute_dtype)
    elif budget is not None:
        from uspx.plan.select import runtime_notes

        fit = fit_experts(path, budget, context=context, dtype=dtype, kv_dtype=kv_dtype, batch=batch)
        console.print(fit.estimate)
        console.print(("[green]" if fit.fits else "[red]") + fit.message())
        for note in runtime_notes([fit.experts_per_layer], fit.estimate.params.top_k) if fit.fits else []:
            console.print(f"[yellow]runtime: {note}")
        console.print("whole experts only; fewer and narrower experts together (what `uspx extract --budget` cuts "
                      "by default) usually keep more: `uspx select --units experts,channels,heads` names that shape "
                      "and the runtimes that load it")
        result = dict(fit.estimate.breakdown(), budget_bytes=fit.budget_bytes, fits=fit.fits,
                      experts_per_layer_fit=fit.experts_per_layer, min_budget_bytes=fit.min_budget_bytes)
    else:
        est = estimate(path, dtype, context=context, kv_dtype=kv_dtype, batch=batch, experts_per_layer=experts_per_layer)
        console.print(est)
        result = est.breakdown()
    if student is not None and not streaming:
        from rich.table import Table

        from uspx.plan.memory import format_bytes, student_estimate

        st = student_estimate(path, student, dtype, context=context, kv_dtype=kv_dtype, batch=batch)
        table = Table(title=f"{student} experts per layer: pruned MoE vs dense student ({st['dtype']} weights, "
                            f"{context} tokens of {kv_dtype} KV cache)")
        for col in ("model", "weights", "KV cache", "total", "active params / token"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, key in (("pruned MoE", "pruned_moe"), ("dense student", "dense_student")):
            r = st[key]
            active = f"{r['active_params_per_token']:,}" if r["active_params_per_token"] is not None else "below top-k"
            table.add_row(name, format_bytes(r["weights_bytes"]), format_bytes(r["kv_bytes"]),
                          format_bytes(r["total_bytes"]), active)
        console.print(table)
        if budget is not None:
            fits = st["dense_student"]["total_bytes"] <= fit.budget_bytes
            console.print(("[green]" if fits else "[red]") + f"the dense student {'fits' if fits else 'does not fit'} "
                          f"in {format_bytes(fit.budget_bytes)}")
        result["student"] = st
    if out is not None:
        write_json(out, result)
        console.print(f"written to {out}")
    if result.get("fits") is False:
        raise typer.Exit(1)


@app.command()
def score(
    model: ModelArg = "default",
    trace_dir: Path = typer.Argument(..., help="Trace folder made by `uspx trace` from this model and workload."),
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for scores.parquet and scores.json."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all; with --streaming, the local ones the trace allows): frequency, reap, ean, ablation_natural, ablation_interventional, usage_x_marginal, taylor, reconstruction, l0 (learned masks on the whole model's output; needs --keep), l0_layer (learned masks on each layer's output alone; needs --keep; streams), capability (needs --tool-families), ablation_guided (interventional ablation from a share of its forwards, see --ablation-budget; needs --keep)."),
    split: str = typer.Option("calibration", help="Workload part to score on."),
    max_tokens: MaxTokens = None,
    bootstrap: int = typer.Option(200, help="Bootstrap resamples over prompts for the confidence intervals."),
    batch_size: BatchSize = 8,
    streaming: Streaming = False,
    compute_dtype: ComputeDtype = "auto",
    device: Device = None,
    sequential: Optional[str] = typer.Option(None, "--sequential", help="Experts each layer will keep (50% or a count): score every layer with the layers before it already pruned to that many (local methods)."),
    keep: Optional[str] = typer.Option(None, "--keep", help="With --methods l0 / l0_layer: the experts per layer the learned masks must keep (50% or a count)."),
    tool_families: ToolFamilies = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    units: str = typer.Option("experts", "--units", help="Unit types to score: experts, and channels (expert intermediate channels) and heads (KV groups and query heads), written to units.parquet."),
    ablation_budget: float = typer.Option(0.1, "--ablation-budget", help="With ablation_guided: the share of exhaustive ablation's forward passes to spend (0.1: 10x fewer)."),
    unit_methods: Optional[str] = typer.Option(None, "--unit-methods", help="Channel and head score methods (default: reconstruction, activation, attribution, fisher): also ablation (heads only; one pass over the prompts per head)."),
    until_stable: bool = typer.Option(False, "--until-stable", help="Score the trace's prompts a --block at a time (one method: frequency, reap, ean, reconstruction, taylor) and stop once the kept set under --keep / --budget has settled; OUT holds the scores of the prompts scored and stable.json (docs/stable.md)."),
    budget: Optional[str] = typer.Option(None, help="With --until-stable: the memory budget (weights + KV cache) the kept set must fit, instead of --keep."),
    block: int = typer.Option(16, help="With --until-stable: prompts between two looks at the kept set."),
    tolerance: StableTolerance = 0.05,
    patience: StablePatience = 2,
    seed: int = typer.Option(0, help="With --until-stable: seed of the prompts' order and of the resamples."),
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
) -> None:
    """Score every (layer, expert) for this workload: one table with tokens behind each value and a CI."""
    if until_stable:
        from uspx.stable import score_until_stable

        chosen = _csv(methods) or ["frequency"]
        if len(chosen) != 1:
            raise UspxError("--until-stable scores with one method (--methods NAME)")
        opened = _open(model, streaming=streaming, dtype=compute_dtype, device=device)
        res = score_until_stable(opened, trace_dir, workload, out, method=chosen[0], keep=keep, budget=budget,
                                 block=block, tolerance=tolerance, patience=patience, bootstrap=bootstrap, seed=seed,
                                 split=split, batch_size=batch_size)
        _print_stable(res, out)
        return
    from uspx.score import METHODS, score as run_score
    from uspx.score.api import check_arguments, default_methods

    chosen = _csv(methods) or (default_methods(trace_dir) if streaming or sequential else METHODS)
    # a typo must not cost a model load (what only a layer-by-layer run refuses is checked once opened)
    check_arguments(model, chosen, keep=keep, tool_families=_csv(tool_families), ablation_budget=ablation_budget,
                    sequential=sequential, bootstrap=bootstrap, max_tokens=max_tokens, units=units)
    opened = _open(model, streaming=streaming, dtype=compute_dtype, device=device, device_map=device_map,
                   max_memory=max_memory, trust_remote_code=trust_remote_code)
    table = run_score(opened, trace_dir, workload, out, methods=chosen, split=split, max_tokens=max_tokens,
                      bootstrap=bootstrap, batch_size=batch_size, sequential=sequential, keep=keep,
                      tool_families=_csv(tool_families), units=units, unit_methods=_csv(unit_methods),
                      ablation_budget=ablation_budget)
    console.print(f"{len(table.methods)} methods scored ({', '.join(table.methods)}); written to {out}")


@app.command("select")
def select_cmd(
    scores_dir: Path = typer.Argument(..., help="Scores folder made by `uspx score`."),
    model: str = typer.Option("default", help="Model the scores belong to (its config sizes the plan)."),
    out: Path = typer.Option(..., "-o", "--out", help="Plan file to write (JSON)."),
    method: Optional[str] = typer.Option(None, help="Score method to select by: one the table holds (default: reconstruction), or random (a seeded random ranking, the baseline)."),
    seed: int = typer.Option(0, help="With --method random: the seed."),
    budget: Budget = None,
    keep: Keep = None,
    context: BudgetContext = 4096,
    dtype: Optional[str] = typer.Option(None, help="Precision of the exported model (default: the checkpoint's)."),
    kv_dtype: KvDtype = "bf16",
    non_uniform: NonUniform = False,
    solver: str = typer.Option("lagrangian", help="lagrangian or greedy (non-uniform plans)."),
    units: str = typer.Option("experts", "--units", help="Unit types to choose under the budget: experts, channels, heads (e.g. experts,channels,heads; needs `uspx score --units` and --budget)."),
    unit_method: Optional[str] = typer.Option(None, "--unit-method", help="Channel and head score to select by (default: the same name as --method; reconstruction puts experts, channels and heads in one currency)."),
    channel_step: Optional[int] = typer.Option(None, "--channel-step", help="Expert width granularity in channels (default 8 up to 256 channels, else 32)."),
) -> None:
    """Choose the kept experts (and, with --units, expert channels and attention heads) under a
    memory budget (or a keep share) from a score table."""
    from uspx.extract import checkpoint_dtype
    from uspx.models import model_fingerprint
    from uspx.models.loading import resolve_model_path
    from uspx.plan.joint import select_plan
    from uspx.score import DEFAULT_METHOD, load_scores

    table = load_scores(scores_dir)
    path = resolve_model_path(model)
    fingerprint = model_fingerprint(path)  # from the files: no need to load a model that may not fit
    table.check(model=fingerprint)
    plan_obj = select_plan(table, scores_dir, path, units=units, method=method or DEFAULT_METHOD, budget=budget,
                           keep=keep, dtype=dtype or checkpoint_dtype(path), context=context, kv_dtype=kv_dtype,
                           uniform=not non_uniform, solver=solver, unit_method=unit_method, channel_step=channel_step,
                           seed=seed, model_fingerprint=fingerprint)
    plan_obj.save(out)
    console.print(plan_obj)
    if plan_obj.padding:
        console.print(f"[yellow]{plan_obj.padding}")
    for note in plan_obj.runtime_notes():
        console.print(f"[yellow]runtime: {note}")
    console.print(f"plan written to {out}")


@app.command()
def prune(
    model: ModelArg = "default",
    plan_file: Path = typer.Argument(..., help="Plan file made by `uspx select`."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the pruned checkpoint."),
    mask_only: bool = typer.Option(False, "--mask-only", help="Keep all shapes; disable dropped experts in the router instead."),
    streaming: bool = typer.Option(False, "--streaming", help="Verify the export layer by layer instead of loading the original and the export whole."),
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
) -> None:
    """Export the model pruned to the plan's experts, sliced on disk in its stored precision (MXFP4
    stays MXFP4); the export is reloaded and compared with the restricted original before it is
    put in place, and a failed check writes nothing."""
    from uspx.prune import export

    # the verification compares logits in float32: the original is opened in it, whole or layer by layer
    opened = _open(model, streaming=streaming, dtype="fp32", trust_remote_code=trust_remote_code)
    rec = export(opened, plan_file, out, physical=not mask_only, trust_remote_code=trust_remote_code)
    size = rec["size"]
    console.print(f"{rec['status']}: {out} ({rec['dtype']}); max |logit diff| after reload "
                  f"{rec['verification']['max_abs_logit_diff']:.2e} ({rec['verification']['reloaded_with']}); "
                  f"{size['actual_bytes']} bytes of tensors (predicted {size.get('predicted_bytes')})")


@app.command()
def channels(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the narrowed checkpoint."),
    width: str = typer.Option(..., "--width", help="Intermediate channels every expert keeps: a share (75%) or a count."),
    threads: Threads = None,
) -> None:
    """Narrow every expert to its best channels on the user's calibration items (the same width in
    every expert, as configs require); export, verify against the masked model, evaluate."""
    from uspx.narrow import export_channels

    rec = export_channels(model, workload, out, width=width)
    console.print(f"written {out}: experts {rec['original_width']} -> {rec['width']} channels; tensors "
                  f"{rec['bytes']['original'] / 2**20:.1f} -> {rec['bytes']['narrowed'] / 2**20:.1f} MiB; "
                  + _checked_and_evaluated(rec))


@app.command()
def heads(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the checkpoint with fewer attention heads."),
    groups: str = typer.Option(..., "--groups", help="KV groups (a key/value head with its query heads) every layer keeps: a share (50%) or a count."),
    threads: Threads = None,
) -> None:
    """Keep every layer's best KV groups on the user's calibration items (the same count in every
    layer), shrinking the KV cache; export, verify against the masked model, evaluate."""
    from uspx.narrow import export_heads

    rec = export_heads(model, workload, out, groups=groups)
    kv = rec["kv_bytes_per_token"]
    console.print(f"written {out}: KV groups {rec['original_kv_groups']} -> {rec['kv_groups']} per layer; KV cache "
                  f"{kv['original']} -> {kv['narrowed']} bytes per token; " + _checked_and_evaluated(rec))


def _checked_and_evaluated(rec: dict) -> str:
    """The verification and held-out part of a narrowed export's summary line."""
    return (f"max |logit diff| vs the masked model {rec['verification']['max_abs_logit_diff']:.2e}; held-out delta "
            + ", ".join(f"{f} {d:+.4f}" for f, d in rec["heldout"].items() if d is not None))


@app.command()
def attribution(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Folder for attribution.json."),
    sample: int = typer.Option(64, help="Channels removed for real to check the estimates (every KV group is)."),
    max_items: Optional[int] = typer.Option(None, help="Calibration items used (default: all)."),
    seed: int = 0,
    threads: Threads = None,
) -> None:
    """Estimate what removing every expert channel and every KV group would cost, from one forward
    and one backward (attribution patching), and check the estimates against true removal."""
    from uspx.engine.batches import pad_id_of
    from uspx.models import load_model
    from uspx.score.attribution import attribution as estimate, validate
    from uspx.workload import default_max_length, encode, load_workload

    lm = load_model(model)
    items = encode(load_workload(workload).part("calibration"), lm.tokenizer, default_max_length(lm.model.config))
    items = items[:max_items] if max_items else items
    pad = pad_id_of(lm.tokenizer)
    est = estimate(lm.model, items, pad)
    check = validate(lm.model, items, est, channels=sample, seed=seed, pad_id=pad)
    write_json(Path(out) / "attribution.json", dict(
        model=lm.fingerprint, items=len(items), loss=est.loss,
        channels={str(l): v.tolist() for l, v in est.channels.items()}, groups=est.groups.tolist(), validation=check))
    for kind in ("channels", "groups"):
        v = check[kind]
        console.print(f"{kind}: Spearman {v['spearman']:.3f} between estimated and true loss change over {v['units']} removals")


@app.command("prune-gguf")
def prune_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="A GGUF file of the model the plan was made on (any quantization)."),
    plan_file: Path = typer.Argument(..., help="Plan file made by `uspx select` (the same expert count in every layer)."),
    out: Path = typer.Option(..., "-o", "--out", help="The pruned GGUF file to write."),
) -> None:
    """Prune a GGUF file by a plan without dequantizing: kept experts copied byte for byte, the expert
    count patched, every kept byte checked against the source."""
    from uspx.prune.gguf_file import prune_gguf
    from uspx.prune.kept import resolve_kept

    ks = resolve_kept(plan_file).experts_only("prune-gguf")
    rec = prune_gguf(gguf_file, ks.kept, out, num_experts=ks.plan.num_experts)
    write_json(record_path(out), {**rec, "plan": str(plan_file)})
    console.print(f"written {out}: {rec['kept_count']} of {rec['experts']} experts per layer, "
                  f"{rec['bytes'] / 2**30:.2f} GiB (was {rec['source_bytes'] / 2**30:.2f} GiB); "
                  f"{rec['check']['bytes_compared']} bytes checked against the source")


@app.command("export")
def export_cmd(
    model_dir: Path = typer.Argument(..., help="An exported checkpoint folder, an extract run folder (its model/), or 'default' for the bundled teacher."),
    out: Path = typer.Option(..., "-o", "--out", help="The GGUF file to write."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf (llama.cpp, Ollama)."),
    llama_cpp: Optional[Path] = typer.Option(None, "--llama-cpp", help="llama.cpp's source: a checkout (with its programs in build/bin for --quant), or the llama-cpp-python source package (.tar.gz from `pip download llama-cpp-python --no-binary :all: --no-deps`); default $USPX_LLAMA_CPP."),
    outtype: str = typer.Option("auto", help="The converter's --outtype: f32, f16, bf16, q8_0 or auto (MXFP4 experts stay MXFP4)."),
    pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer", help="llama.cpp's name for the tokenizer's pre-tokenization when its converter does not recognise it (default: declared from tokenizer.json where uspx can tell)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantize with llama.cpp's llama-quantize: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, ... (its names)."),
    imatrix_workload: ImatrixWorkload = None,
    imatrix: ImatrixFile = None,
    threads: LlamaThreads = None,
) -> None:
    """Convert an export to GGUF with llama.cpp's own converter; with --quant, quantize it with
    llama-quantize, weighted by the user's calibration text (--imatrix-workload)."""
    from uspx.models.loading import resolve_model_path
    from uspx.prune.gguf_export import export_gguf, export_quantized

    if fmt != "gguf":
        raise UspxError(f"--format must be gguf, not {fmt!r} (Hugging Face checkpoints come from `uspx prune`)")
    folder = model_dir / "model" if (model_dir / "model" / "config.json").exists() else resolve_model_path(model_dir)
    if quant is None:
        if imatrix_workload or imatrix:
            raise UspxError("an importance matrix guides quantization: add --quant (e.g. Q4_K_M)")
        rec = export_gguf(folder, out, llama_cpp=llama_cpp, outtype=outtype, pre_tokenizer=pre_tokenizer)
    else:
        rec = export_quantized(folder, out, quant, llama_cpp=llama_cpp, outtype=outtype, pre_tokenizer=pre_tokenizer,
                               workload=imatrix_workload, imatrix=imatrix, threads=threads)
        write_json(record_path(out), rec)
    console.print(f"written {out} ({rec['bytes'] / 2**20:.1f} MiB) from {folder}; pre-tokenizer "
                  f"{(rec.get('conversion') or rec)['pre_tokenizer'] or 'recognised by the converter'}")
    if quant is not None:
        _print_quantized(rec)


def _print_quantized(rec: dict) -> None:
    types = ", ".join(f"{k} {v}" for k, v in sorted(rec["tensor_types"].items()))
    console.print(f"{rec['quant']}: {rec['parameter_bytes'] / 2**20:.2f} MiB of tensors ({types})"
                  + (f"; importance matrix from {rec['imatrix'].get('chunks')} chunks of the calibration items"
                     if rec.get("imatrix") and rec["imatrix"].get("chunks") else ""))
    for fb in rec.get("fallbacks") or []:
        console.print(f"[yellow]{fb['tensor']}: rows of {fb['columns']} are not whole blocks of {fb['block']} "
                      f"({fb['wanted']}); llama.cpp stored it as {fb['used']}")


@app.command("quantize")
def quantize_cmd(
    gguf_file: Path = typer.Argument(..., help="A GGUF file (an export, or a `uspx prune-gguf` output) in f32, f16 or bf16."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="The quantized GGUF file to write."),
    quant: str = typer.Option(..., "--quant", help="llama-quantize's type: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, ..."),
    imatrix_workload: ImatrixWorkload = None,
    imatrix: ImatrixFile = None,
    llama_cpp: Optional[Path] = typer.Option(None, "--llama-cpp", help="Folder of llama.cpp's programs (or a checkout with build/bin); default $USPX_LLAMA_CPP, then PATH."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write nothing: print llama.cpp's own prediction of the quantized size."),
    threads: LlamaThreads = None,
) -> None:
    """Quantize a GGUF file with llama.cpp's llama-quantize, optionally weighted by an importance
    matrix made on the user's calibration items."""
    from uspx.prune.gguf_export import quantize_gguf, quantize_guided

    if dry_run:
        rec = quantize_gguf(gguf_file, gguf_file, quant, imatrix=imatrix, llama_cpp=llama_cpp, dry_run=True)
        console.print(f"{rec['quant']}: llama.cpp predicts {rec['predicted_mib']} MiB ({rec['bits_per_weight']} bits "
                      f"per weight); {rec['fallback_tensors']} tensor(s) in a fallback type")
        return
    if out is None:
        raise UspxError("give the quantized file to write (-o OUT.gguf)")
    rec = quantize_guided(gguf_file, out, quant, workload=imatrix_workload, imatrix=imatrix, llama_cpp=llama_cpp,
                          threads=threads)
    write_json(record_path(out), rec)
    console.print(f"written {out} ({rec['bytes'] / 2**20:.1f} MiB) from {gguf_file}")
    _print_quantized(rec)


@app.command("eval")
def eval_cmd(
    candidate: str = typer.Argument(..., help="Exported model folder or GGUF file to evaluate (or 'default' with --plan); a GGUF (candidate or --teacher) runs in llama.cpp's Python binding."),
    workload: WorkloadArg = "python_dev",
    teacher: str = typer.Option("default", help="The original model."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="Evaluate the teacher restricted to this plan instead."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder or .json path for evaluation.json."),
    split: str = "heldout",
    epsilon: Epsilon = 0.05,
    budget: Optional[str] = typer.Option(None, help="Memory budget for the memory-fit rule, e.g. 8GiB."),
    context: int = 2048,
    max_length: MaxLength = None,
    batch_size: BatchSize = 8,
    no_speed: NoSpeed = False,
    streaming: Streaming = False,
    compute_dtype: ComputeDtype = "auto",
    device: Device = None,
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
    samples: Samples = 1,
    temperature: Temperature = 0.0,
    pass_k: Optional[str] = typer.Option(None, "--pass-k", help="Comma-separated k for pass@k (default: 1 and --samples)."),
    max_new_tokens: MaxNewTokens = 128,
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled answers."),
    max_pass_drop: MaxPassDrop = None,
    virtual_experts: Optional[str] = typer.Option(None, "--virtual-experts", help="calc: answer the checked items once more with the calculator (needs --probe), to see what the tool buys."),
    probe_dir: Optional[Path] = typer.Option(None, "--probe", help="With --virtual-experts calc: a probe made by `uspx probe` for the teacher or the candidate."),
) -> None:
    """Quality of a candidate against the teacher on held-out prompts, per family, with a verdict;
    items with checks (answer, regex, json, tests) are answered by both models and judged."""
    from uspx.evaluate.gguf import evaluate_gguf, is_gguf
    from uspx.evaluate.run import print_verdict
    from uspx.extract import QUALITY_COLUMNS

    ks = _csv(pass_k) or []
    if bad := [k for k in ks if not k.isdigit()]:
        raise UspxError(f"--pass-k takes whole numbers separated by commas (e.g. 1,5), not {bad[0]!r}")
    if is_gguf(candidate) or is_gguf(teacher):  # run by llama.cpp's binding; same metrics and verdict
        if plan_file or streaming or virtual_experts or device:
            raise UspxError("a GGUF file is evaluated whole by llama.cpp: --plan, --streaming, --device and "
                            "--virtual-experts do not apply")
        if max_pass_drop is not None or samples != 1 or temperature != 0.0 or ks:
            raise UspxError("a GGUF evaluation measures losses and speed; checked items are not answered in "
                            "llama.cpp: --max-pass-drop, --samples, --temperature and --pass-k do not apply")
        res = evaluate_gguf(teacher, candidate, workload, split=split, max_length=max_length, epsilon=epsilon,
                            memory_budget=budget, context=context, speed=not no_speed, threads=threads,
                            dtype="fp32" if compute_dtype == "auto" else compute_dtype, out=out, progress=True,
                            trust_remote_code=trust_remote_code)
    else:
        from uspx.evaluate import evaluate
        from uspx.virtual.sandbox import run_python

        opened = _open(teacher, streaming=streaming, dtype=compute_dtype, device=device,
                       trust_remote_code=trust_remote_code)
        if virtual_experts is None:
            tools = None
        else:
            from uspx.models import model_fingerprint
            from uspx.models.loading import resolve_model_path
            from uspx.virtual.generate import generate_with_tools

            if _csv(virtual_experts) != ["calc"]:
                raise UspxError("--virtual-experts: only calc has a detector (a probe) that decides when to call it")
            if probe_dir is None:
                raise UspxError("--virtual-experts calc needs --probe (train one with `uspx probe MODEL WORKLOAD -o DIR`)")
            models = {opened.fingerprint} | ({model_fingerprint(resolve_model_path(candidate))} if not plan_file else set())
            probe = _load_probe(probe_dir, models, "the teacher or the candidate")

            def tools(model, tokenizer, prompt, n):
                return generate_with_tools(model, tokenizer, prompt, probe, max_new_tokens=n)
        res = evaluate(opened, None if plan_file else candidate, workload, split=split, kept=plan_file,
                       max_length=max_length, batch_size=batch_size, epsilon=epsilon, memory_budget=budget,
                       context=context, speed=not no_speed, out=out, progress=True, trust_remote_code=trust_remote_code,
                       dtype=compute_dtype, samples=samples, temperature=temperature,
                       pass_k=[int(k) for k in ks] or None, max_new_tokens=max_new_tokens,
                       seed=seed, max_pass_drop=max_pass_drop, sandbox=run_python, virtual_experts=tools)
    for fam, row in res["families"].items():
        console.print(f"{fam:10s} " + "  ".join(f"{name} {row[k]:.4f}" for k, name in QUALITY_COLUMNS.items() if row.get(k) is not None))
    print_verdict(res)


def _load_probe(probe_dir: Path, fingerprints: set, whom: str):
    """A probe made by `uspx probe`, refused when trained on hidden states other than these models'."""
    from uspx.virtual.probe import Probe

    record = probe_dir / "probe.json"
    if record.exists() and read_json(record).get("model") not in (None, *fingerprints):
        raise FingerprintMismatch(f"{probe_dir} was trained on another model's hidden states; train one for {whom} "
                                  "(`uspx probe`)")
    return Probe.load(probe_dir)


@app.command()
def extract(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder: trace, scores, plan, model, evaluation, report (with --update: default RUN_DIR-NAME beside the run)."),
    update: bool = typer.Option(False, "--update", help="Update a finished run with new prompts: `uspx extract --update RUN_DIR NEW_WORKLOAD`. Traces only the new items, adds their sums to the run's, selects, exports and evaluates under the run's own settings, recovers from the run's recovered weights when it recovered, and reports the experts in and out and the quality before and after on the old and new held-out items; the run itself is left as it is."),
    budget: Budget = None,
    keep: Keep = None,
    context: BudgetContext = 4096,
    method: Optional[str] = typer.Option(None, help="Score method: frequency, reap, ean, ablation_natural, ablation_interventional, usage_x_marginal, taylor, reconstruction (the default), l0, l0_layer, ablation_guided; with --streaming the local ones (frequency, reap, ean, reconstruction, l0_layer)."),
    non_uniform: NonUniform = False,
    epsilon: Epsilon = 0.05,
    max_length: int = typer.Option(512, help="Truncate workload items to this many tokens."),
    max_tokens: MaxTokens = None,
    batch_size: BatchSize = 8,
    no_speed: NoSpeed = False,
    streaming: Streaming = False,
    compute_dtype: ComputeDtype = "auto",
    device: Device = None,
    sequential: bool = typer.Option(False, "--sequential", help="Score each layer with the layers before it already pruned to the kept count (local methods)."),
    units: Optional[str] = typer.Option(None, "--units", help="What to cut: experts (whole experts only) or any of experts,channels,heads. Default with --budget: the joint cut (fewer and narrower experts, fewer KV groups where they pay) when the model is in memory; otherwise whole experts."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="With a joint cut: also export and evaluate the whole-experts cut at the same budget and report its cost beside it."),
    max_pass_drop: MaxPassDrop = None,
    samples: Samples = 1,
    temperature: Temperature = 0.0,
    max_new_tokens: MaxNewTokens = 128,
    recover: bool = typer.Option(False, "--recover", help="Then distill the pruned model from the original (`uspx recover` with its defaults) and judge the recovered model."),
    recover_steps: Optional[int] = typer.Option(None, help="With --recover: training steps at most."),
    eval_workload: Optional[str] = typer.Option(None, "--eval-workload", help="Evaluate on every item of this workload instead of the held-out split of WORKLOAD (calibrate on one set of prompts, judge on another)."),
    tool_families: ToolFamilies = None,
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="MODEL.gguf only: llama-imatrix's importance matrix of the user's text instead of recording routing (frequency only)."),
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
) -> None:
    """The whole job: trace, score, select under a budget, prune, verify, export, evaluate, report.
    MODEL.gguf: statistics recorded in llama.cpp, scored (frequency, reap, ean), selected, the GGUF
    pruned in place and judged against the original in llama.cpp, without the Hugging Face checkpoint."""
    if update:
        from uspx.update import update as run_update

        if given := [name for name, v in (("--budget", budget), ("--keep", keep), ("--method", method),
                                          ("--units", units), ("--eval-workload", eval_workload),
                                          ("--streaming", streaming), ("--sequential", sequential),
                                          ("--non-uniform", non_uniform)) if v]:
            raise UspxError(f"--update keeps the run's own settings; drop {', '.join(given)}")
        run_update(model, workload, out, recover_steps=recover_steps, dtype=compute_dtype)
        return
    if out is None:
        raise UspxError("give the output folder (-o DIR)")
    if str(model).endswith(".gguf"):  # a GGUF alone: statistics from llama.cpp, the file pruned in place
        from uspx.gguf_extract import extract_gguf

        if given := [n for n, v in (("--streaming", streaming), ("--recover", recover), ("--units", units),
                                    ("--non-uniform", non_uniform), ("--sequential", sequential),
                                    ("--eval-workload", eval_workload)) if v]:
            raise UspxError(f"{model}: a GGUF extract does not take {', '.join(given)}")
        extract_gguf(model, workload, out, budget=budget, keep=keep, context=context, method=method, imatrix=imatrix,
                     max_length=max_length, tool_families=_csv(tool_families), threads=threads, epsilon=epsilon,
                     speed=not no_speed)
        return
    if imatrix is not None:
        raise UspxError("--imatrix gives the statistics of a GGUF model (MODEL.gguf)")
    from uspx.extract import check_arguments, extract as run_extract

    # a typo must not cost a model load (what only a layer-by-layer run refuses is checked once opened)
    check_arguments(model, budget=budget, keep=keep, method=method, tool_families=_csv(tool_families),
                    sequential=sequential, dtype=compute_dtype)
    opened = _open(model, streaming=streaming, dtype=compute_dtype, device=device, trust_remote_code=trust_remote_code)
    run_extract(opened, workload, out, budget=budget, keep=keep, context=context, method=method,
                uniform=not non_uniform, epsilon=epsilon, max_length=max_length, max_tokens=max_tokens,
                batch_size=batch_size, speed=not no_speed, trust_remote_code=trust_remote_code,
                dtype=compute_dtype, sequential=sequential, recover=recover,
                recover_steps=recover_steps, eval_workload=eval_workload, tool_families=_csv(tool_families),
                units=units, compare=compare, tasks=dict(max_pass_drop=max_pass_drop, samples=samples,
                                                         temperature=temperature, max_new_tokens=max_new_tokens))
    console.print(f"report: {out / 'report.json'}; model: {out / 'model'}")


@app.command()
def drift(
    run_dir: Path = typer.Argument(..., help="Folder of a finished `uspx extract` run."),
    new: str = typer.Argument(..., help="The new traffic: a workload (JSONL file, text folder or bundled name), or a trace folder of it made on the run's original model."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder: trace/ of the new traffic, evaluation.json, drift.json (default RUN_DIR/drift/NAME)."),
    model: Optional[str] = typer.Option(None, "--model", help="The run's original model, when it moved since the run (its fingerprint must be the run's)."),
    pruned: Optional[Path] = typer.Option(None, "--pruned", help="The pruned model whose loss is measured (default: the recovered one when the run recovered, else RUN_DIR/model)."),
    epsilon: Optional[float] = typer.Option(None, help="Margin of the loss bound, nats per token (default: the run's acceptance epsilon)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap draws per interval (prompts are the resampling unit)."),
    seed: int = 0,
    batch_size: BatchSize = 8,
    compute_dtype: ComputeDtype = "auto",
    threads: Threads = None,
) -> None:
    """Does new traffic still fit a pruned model? Shares of routing mass and score on the dropped experts against the calibration's spread, loss delta on the new items, and a verdict: covered, drifting or re-extract."""
    from uspx.drift import drift as run_drift, print_drift

    result = run_drift(run_dir, new, out, model=model, judged=pruned, epsilon=epsilon, bootstrap=bootstrap, seed=seed,
                       batch_size=batch_size, dtype=compute_dtype)
    print_drift(result)
    console.print(f"report: {Path(result['out']) / 'drift.json'}")


@app.command("import-routing")
def import_routing_cmd(
    files: list[Path] = typer.Argument(..., help="vLLM: one JSONL of completions with routed_experts; SGLang: the expert-distribution dump files (.pt) of one recorder mode."),
    fmt: str = typer.Option(..., "--format", help="vllm or sglang."),
    model: str = typer.Option(..., "--model", help="The model that served the traffic (local folder, or 'default')."),
    out: Path = typer.Option(..., "-o", "--out", help="New output folder: a trace (expert ids per token) or a score table (SGLang counts)."),
    family: str = typer.Option("serving", help="Family of the imported items."),
    dedupe: str = typer.Option("id", help="Duplicated requests: id (a request id seen before), tokens (also identical token ids), none."),
    keep_modes: str = typer.Option("1,2,3", "--keep-modes", help="SGLang per_token dumps: forward modes kept (ForwardMode: 1 EXTEND, 2 DECODE, 3 MIXED; verify passes of speculative decoding carry rejected drafts)."),
    bootstrap: int = typer.Option(200, help="SGLang count dumps: bootstrap resamples of forward passes for the intervals."),
) -> None:
    """Import the routing a vLLM or SGLang server recorded, as a uspx trace or a frequency score table."""
    from uspx.serving import import_routing, print_imported

    try:
        modes = tuple(int(m) for m in keep_modes.split(",") if m.strip())
    except ValueError:
        raise UspxError(f"--keep-modes takes comma-separated integers, not {keep_modes!r}") from None
    print_imported(import_routing(files, fmt, model, out, family=family, dedupe=dedupe, keep_modes=modes,
                                  bootstrap=bootstrap))


@app.command("trace-stable")
def trace_stable_cmd(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: blocks/ (a trace per block, resumable), scores/, stable.json."),
    keep: StableKeep = None,
    budget: StableBudget = None,
    context: int = typer.Option(4096, help="With --budget: the context the KV cache must hold."),
    method: StableMethod = "frequency",
    block: StableBlock = 16,
    tolerance: StableTolerance = 0.05,
    patience: StablePatience = 2,
    bootstrap: int = typer.Option(200, help="Resamples of the prompts for the kept set's stability and the scores' intervals."),
    seed: StableSeed = 0,
    batch_size: BatchSize = 8,
    max_length: MaxLength = None,
    compute_dtype: ComputeDtype = "auto",
    threads: Threads = None,
) -> None:
    """`uspx trace --until-stable`: trace the calibration items a block at a time and stop once the kept set under --keep / --budget has settled; scores of what was traced in OUT/scores."""
    _trace_until_stable(model, workload, out, keep=keep, budget=budget, method=method, block=block,
                        tolerance=tolerance, patience=patience, seed=seed, batch_size=batch_size,
                        max_length=max_length, compute_dtype=compute_dtype, bootstrap=bootstrap, context=context)


def _trace_until_stable(model: str, workload: str, out: Path, *, compute_dtype: str, **options) -> None:
    from uspx.stable import trace_until_stable

    _print_stable(trace_until_stable(model, workload, out, dtype=compute_dtype, **options), out)


def _print_stable(res: dict, out: Path) -> None:
    state = "stable" if res["stable"] else "not stable before the prompts ran out"
    console.print(f"{state}: {res['items']} of {res['calibration_items']} prompts, {res['tokens']} tokens; "
                  f"scores in {res['scores']}, history in {out / 'stable.json'}")


@app.command()
def recover(
    run_dir: Path = typer.Argument(..., help="Folder of a finished `uspx extract` run (its model/ is the pruned checkpoint)."),
    train: str = typer.Option("full", help="What trains: router (routers only), lora (routers + LoRA on attention and experts), full (every kept weight)."),
    steps: Steps = 300,
    minutes: Minutes = None,
    kd: Kd = 1.0,
    ce: float = typer.Option(0.0, help="Weight of cross-entropy on the calibration targets."),
    router_kd: float = typer.Option(0.0, "--router-kd", help="Weight of router distillation (the original's routing renormalised over the kept experts)."),
    layer: LayerWeight = 0.0,
    tau: Tau = 1.0,
    lr: Optional[float] = typer.Option(None, help="Learning rate (default by --train)."),
    batch_size: BatchSize = 8,
    lora_rank: int = 8,
    generated: Generated = 2,
    seed: int = 0,
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default RUN_DIR/recover)."),
    others: Others = None,
    epsilon: Epsilon = 0.05,
    streaming: bool = typer.Option(False, "--streaming", help="Train one decoder layer at a time from the files, for models larger than memory: each pruned layer learns the original layer's output and routing on the user's hidden states (--train router or full; --steps per layer; router KD and layer matching, both weighted 1 unless set)."),
    compute_dtype: str = typer.Option("auto", "--dtype", "--compute-dtype", help="Precision the models compute in (auto: the checkpoint's stored float type; bf16, fp16, fp32); what trains always trains in fp32."),
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Distill the pruned model of an extract run from the original, export it, and evaluate before and after."""
    from uspx.recover import Settings, recover as run_recover
    from uspx.recover.run import run_source

    settings = Settings(train=train, steps=steps, max_minutes=minutes, kd=kd, ce=ce, router_kd=router_kd, layer=layer,
                        tau=tau, lr=lr, batch_size=batch_size, lora_rank=lora_rank, generated=generated, seed=seed)
    original = _open(str(run_source(run_dir)), streaming=streaming, dtype=compute_dtype, device=device)
    res = run_recover(run_dir, original=original, settings=settings, out_dir=out, others=others, epsilon=epsilon,
                      dtype=compute_dtype)
    console.print(f"recovered checkpoint: {res['model']}; report: {Path(res['model']).parent / 'recover.json'}")


@app.command()
def student(
    run_dir: Path = typer.Argument(..., help="Folder of a finished `uspx extract` run (its scores choose the experts)."),
    experts_per_layer: Optional[int] = typer.Option(None, "--experts-per-layer", "-m", help="Experts merged into each layer's dense MLP (its width is this many experts')."),
    base: Optional[Path] = typer.Option(None, "--base", help="Instead of -m: a local Hugging Face causal LM folder (any family, any tokenizer) to distil the original into (RUN_DIR/dense-NAME)."),
    train: str = typer.Option("lora", help="With --base: lora (adapters on every linear layer, merged into the export) or full (every weight)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="With --base --train lora: the adapters' rank."),
    four_bit: bool = typer.Option(False, "--4bit", help="With --base: load the base in 4 bits (bitsandbytes NF4, QLoRA); needs a CUDA GPU."),
    weights: str = typer.Option("routed", help="Fixed weight of each merged expert: routed (its mean routing weight on the user's tokens) or router (the router's mean softmax)."),
    steps: Steps = 300,
    minutes: Minutes = None,
    kd: Kd = 1.0,
    ce: Optional[float] = typer.Option(None, help="Weight of cross-entropy on the calibration targets (default 0; 1 with --base)."),
    layer: LayerWeight = 0.0,
    tau: Tau = 1.0,
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 5e-4)."),
    group_lasso: float = typer.Option(0.0, "--group-lasso", help="Group lasso strength on each layer's channel blocks (one per merged expert); blocks driven to zero are reported."),
    generated: Generated = 2,
    seed: int = 0,
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default RUN_DIR/student-M)."),
    others: Others = None,
    epsilon: Epsilon = 0.05,
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure prefill and decode speed of the student and the pruned MoE."),
    threads: Threads = None,
) -> None:
    """Build a dense model from the user's top experts of every layer (-m), or distil the original into a dense base model of any family and tokenizer (--base); export it and compare it with the run's other candidates."""
    from uspx.recover import Settings
    from uspx.student import student as run_student

    if (experts_per_layer is None) == (base is None):
        raise UspxError("give exactly one of --experts-per-layer (a student built from the experts) and --base "
                        "(a dense model of your own to distil into)")
    if base is not None:
        from uspx.student.dense import dense_student

        settings = Settings(train=train, steps=steps, max_minutes=minutes, kd=kd, ce=1.0 if ce is None else ce,
                            layer=layer, tau=tau, lr=lr, lora_rank=lora_rank, generated=generated, seed=seed)
        res = dense_student(run_dir, base, settings=settings, four_bit=four_bit, out_dir=out, speed=speed,
                            epsilon=epsilon)
        console.print(f"dense student: {res['model']}; report: {Path(res['model']).parent / 'dense.json'}")
        return
    settings = Settings(train="full", steps=steps, max_minutes=minutes, kd=kd, ce=ce or 0.0, layer=layer, tau=tau,
                        lr=lr, generated=generated, seed=seed)
    res = run_student(run_dir, experts_per_layer=experts_per_layer, weighting=weights, settings=settings,
                      group_lasso=group_lasso, out_dir=out, others=others, epsilon=epsilon, speed=speed)
    console.print(f"student: {res['model']}; report: {Path(res['model']).parent / 'student.json'}")


@app.command()
def probe(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the probe (probe.safetensors, probe.json)."),
    family: str = typer.Option("arith", help="The workload family whose computations the tool takes over."),
    tool: str = typer.Option("calc", help="The tool the probe calls (calc)."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer whose hidden states the probe reads (default: the middle one)."),
    threads: Threads = None,
) -> None:
    """Train the detector that decides, from the model's hidden state, when to call a tool; report
    its precision and recall on held-out items against a regular expression."""
    from uspx.models import load_model
    from uspx.virtual.probe import train_probe
    from uspx.workload import load_workload

    lm = load_model(model)
    p, report = train_probe(lm.model, lm.tokenizer, load_workload(workload), family=family, tool=tool, layer=layer)
    p.save(out, record=dict(report=report, model=lm.fingerprint))
    write_json(Path(out) / "report.json", report)
    for name in ("probe", "regex"):
        d = report[name]
        console.print(f"{name}: precision {d['precision']} {d['precision_ci']}, recall {d['recall']} {d['recall_ci']} "
                      f"({report['heldout_positives']} held-out trigger tokens of {report['heldout_tokens']})")


@app.command()
def generate(
    model: ModelArg = "default",
    prompt: str = typer.Argument(..., help="The text to continue."),
    virtual_experts: str = typer.Option("calc", "--virtual-experts", help="Tools the model may hand work to: calc (needs --probe); datetime, units and python run through `uspx tool`."),
    probe_dir: Optional[Path] = typer.Option(None, "--probe", help="A probe made by `uspx probe` for this model."),
    max_new_tokens: int = 64,
    threads: Threads = None,
) -> None:
    """Generate, with the computations the probe detects done by tools and their exact results spliced in."""
    from uspx.models import load_model
    from uspx.virtual.generate import generate_with_tools

    tools = _csv(virtual_experts) or []
    if unknown := [t for t in tools if t not in ("calc", "datetime", "units", "python")]:
        raise UspxError(f"unknown tools {unknown}; choose from calc, datetime, units, python")
    if [t for t in tools if t != "calc"]:
        raise UspxError("only calc has a detector trained from the workloads' labels; datetime, units and python "
                        "run on explicit requests with `uspx tool NAME INPUT`")
    if probe_dir is None:
        raise UspxError("--virtual-experts calc needs --probe (train one with `uspx probe MODEL WORKLOAD -o DIR`)")
    lm = load_model(model)
    probe = _load_probe(probe_dir, {lm.fingerprint}, model)
    g = generate_with_tools(lm.model, lm.tokenizer, prompt, probe, max_new_tokens=max_new_tokens)
    console.print(prompt + g.text, markup=False, highlight=False, emoji=False)
    for c in g.calls:
        console.print(f"tool calc: {c.expression} = {c.result if c.result is not None else 'refused: ' + str(c.refused)}",
                      style="dim", markup=False, highlight=False, emoji=False)


@app.command()
def tool(
    name: str = typer.Argument(..., help="calc, datetime, units or python."),
    query: Optional[str] = typer.Argument(None, help="The tool's input, e.g. '2**64 / 3', 'weekday of 2026-11-29', '3 miles to km'."),
    allow_python: bool = typer.Option(False, "--allow-python", help="Let the python tool run the program (in its sandbox)."),
    check: bool = typer.Option(False, "--check", help="With python: start the sandbox and print what a program inside sees."),
) -> None:
    """Run one virtual-expert tool on an input: the same safe tools generation hands work to.
    The tool's text is printed verbatim."""
    from uspx.virtual.tools import TOOLS

    if name not in TOOLS:
        raise UspxError(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
    if check:
        from uspx.virtual.sandbox import describe

        if name != "python":
            raise UspxError("--check tests the python tool's sandbox: `uspx tool python --check`")
        typer.echo(describe())
        return
    if query is None:
        raise UspxError(f"`uspx tool {name}` needs an input")
    result = TOOLS[name](query, enabled=allow_python) if name == "python" else TOOLS[name](query)
    typer.echo(result.text)


@app.command()
def analyze(
    trace_dir: Path = typer.Argument(..., help="Trace folder made by `uspx trace`."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for report.html and report.json."),
    model: Optional[str] = typer.Option(None, help="The traced model: enables the causal and model-based sections."),
    workload: Optional[str] = typer.Option(None, help="Workload for model-based sections (default: the trace's own)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated sections: utilisation (alias cold), circuits (paths), dynamics (generation), cooperation (k), similarity (merge), attention (probe), prefetch (cache)."),
    cold_threshold: float = typer.Option(0.01, help="Share of routed tokens below which an expert is cold (when the data can tell)."),
    max_items: int = typer.Option(64, help="Workload items used by the model-based sections."),
    threads: Optional[int] = typer.Option(None, help="Torch threads for the model sections (1 is fastest on a busy machine)."),
) -> None:
    """How the model routes on this workload: one self-contained HTML report with plots, and JSON."""
    from uspx.analyze import analyze as run_analyze

    run_analyze(trace_dir, out, model=model, workload=workload, only=only, cold_threshold=cold_threshold,
                max_items=max_items, threads=threads)
    console.print(f"report: {out / 'report.html'} (numbers in {out / 'report.json'}, figures in {out / 'figures'})")


@app.command()
def superweights(
    model: ModelArg = "default",
    workload: WorkloadArg = "python_dev",
    out: Path = typer.Option(..., "-o", "--out", help="Folder for superweights.json (the catalogue) and report.md."),
    p_active_floor: float = typer.Option(0.01, help="Skip experts routed on fewer than this share of tokens."),
    routing_entropy_thr: str = typer.Option("auto", help="Position-entropy threshold for the selection rule: auto or a number (bits)."),
    co_spike_tau: str = typer.Option("auto", help="Co-spike score cut: auto (95th percentile under shuffled tokens) or a number."),
    router_bias: float = typer.Option(2.0, help="Beta added to the expert's router logit for interventional importance."),
    proxies: str = typer.Option("energy,stopwords", help="Micro-ablation gates before full evaluation."),
    score_modes: str = typer.Option("natural,interventional", help="Importance modes that must agree."),
    max_candidates: int = 128,
    apply_zero: Optional[str] = typer.Option(None, help="Zero catalogued scalars (all or 0,1,...) in a model copy instead of detecting."),
    apply_restore: Optional[str] = typer.Option(None, help="Restore catalogued scalars (all or 0,1,...) in a model copy."),
    apply_out: Optional[Path] = typer.Option(None, help="Where --apply-zero / --apply-restore write the model copy."),
    trust_remote_code: TrustRemoteCode = False,
    threads: Threads = None,
) -> None:
    """Routing-aware super-weight and super-expert detector for MoE experts, with a validation checklist."""
    from uspx.superweights import run_cli

    run_cli(model, workload, out, p_active_floor=p_active_floor, routing_entropy_thr=routing_entropy_thr,
            co_spike_tau=co_spike_tau, router_bias=router_bias, proxies=proxies, score_modes=score_modes,
            max_candidates=max_candidates, apply_zero=apply_zero, apply_restore=apply_restore,
            apply_out=apply_out, trust_remote_code=trust_remote_code)


def main() -> None:
    try:
        app()
    except UspxError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
