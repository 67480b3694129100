"""Pruning against offload: what fits a GPU and how fast llama.cpp decodes, predicted from the config.

Decoding one token at batch 1 is bound by memory bandwidth: every weight the token uses is read
once. So the time per token is the bytes read from GPU memory over the GPU's bandwidth, plus the
bytes read from system memory over the CPU's, plus a fixed overhead (kernel launches, the GPU-CPU
hand-over of each layer whose experts stay on the CPU, sampling):

    t = B_gpu / BW_gpu + B_cpu / BW_cpu + overhead

A token reads: every attention and norm weight, the router, its top-k experts in each MoE layer (not
the others: that is what makes a MoE cheap), the whole output matrix, one row of the embedding
table, and the KV cache of the tokens before it. Pruning experts does not change these bytes: a
token still uses top-k experts per layer. What it changes is where they live. llama.cpp's
``--n-cpu-moe N`` keeps the experts of the first N layers in system memory (the rest, and every
non-expert weight but the embedding table, on the GPU); the best N for a model is the smallest that
fits. A pruned model needs fewer layers' experts on the CPU, or none, and reads more of each token
at GPU speed: that, and only that, is the speed-up pruning buys over offload.

Prefill (a prompt of many tokens in batches of ``ubatch``) is modelled as compute at the GPU's (or
CPU's) throughput, plus, for experts kept in system memory, their bytes streamed over PCIe once per
batch (llama.cpp copies CPU-resident weights to the GPU for large batches); on the CPU alone, plus
the bytes a batch reads once: every non-expert weight and the experts its tokens touch (most of
them: a batch of 32 tokens with top-4 of 32 experts touches 31 on average, of 16 all 16), which is
where pruning speeds up prefill on a CPU.

All figures are estimates: bandwidths are what a streaming read achieves (a preset's share of the
nominal peak, or a measurement), not what the data sheet says.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from uspx.io import UspxError
from uspx.plan.memory import MemoryEstimate, estimate, format_bytes, kv_cache_bytes, parse_size

GB = 10**9

# Effective streaming bandwidths, bytes per second: the nominal peak times the share a large
# sequential read reaches (about 0.8 on GPUs, 0.6-0.7 on desktop DDR; llama.cpp's own decode gets
# close to these on large models). Compute is dense bf16/fp16 matrix throughput actually reached.
GPU_PRESETS: dict[str, dict[str, float]] = {
    # name: memory bytes, nominal bandwidth (GB/s), effective share, effective TFLOPS
    "rtx2080": dict(memory=8 * 2**30, bandwidth=448, share=0.8, tflops=20),
    "rtx3060": dict(memory=12 * 2**30, bandwidth=360, share=0.8, tflops=25),
    "rtx3080": dict(memory=10 * 2**30, bandwidth=760, share=0.8, tflops=50),
    "rtx4060": dict(memory=8 * 2**30, bandwidth=272, share=0.8, tflops=30),
    "rtx4070": dict(memory=12 * 2**30, bandwidth=504, share=0.8, tflops=50),
    "rtx4090": dict(memory=24 * 2**30, bandwidth=1008, share=0.8, tflops=150),
    "rtx4000ada": dict(memory=20 * 2**30, bandwidth=360, share=0.8, tflops=50),
    "a4500": dict(memory=20 * 2**30, bandwidth=640, share=0.8, tflops=40),
    "h100": dict(memory=80 * 2**30, bandwidth=3350, share=0.8, tflops=500),
}
CPU_PRESETS: dict[str, dict[str, float]] = {
    # name: nominal bandwidth (GB/s), effective share, effective TFLOPS (all cores)
    "ddr4-2ch": dict(bandwidth=51.2, share=0.6, tflops=0.5),  # DDR4-3200, two channels
    "ddr5-2ch": dict(bandwidth=89.6, share=0.65, tflops=1.0),  # DDR5-5600, two channels
    "ddr5-8ch": dict(bandwidth=358, share=0.65, tflops=3.0),  # a server socket
}
PCIE_BANDWIDTH = 13 * GB  # PCIe 3.0/4.0 x16 as a host-to-device copy reaches it (13-25 GB/s)
OVERHEAD_S = 0.5e-3  # per decoded token: launches, sampling, synchronisation (llama.cpp, batch 1)
CPU_LAYER_OVERHEAD_S = 0.1e-3  # per decoded token and MoE layer whose experts run on the CPU
GPU_RESERVE = int(0.75 * 2**30)  # CUDA context and llama.cpp's compute buffers
# One llama.cpp CPU thread, measured with the gpt-oss-20b-shaped stand-in (MXFP4 experts, bf16 rest)
# on 2 AVX-512 cores (bench/offload_llama.py, docs/benchmarks.md): weight bytes decoded per second,
# and FLOPs per second in prefill
CPU_THREAD_RATE = 3.9e9
CPU_THREAD_FLOPS = 45e9


@dataclass(frozen=True)
class Hardware:
    """What the user's machine reads and computes per second. ``gpu_bytes`` 0: no GPU."""

    gpu_bytes: int = 0
    gpu_bandwidth: float = 0.0  # bytes/s, effective
    cpu_bandwidth: float = 40 * GB  # bytes/s, effective
    gpu_flops: float = 0.0  # effective, for prefill
    cpu_flops: float = 0.5e12
    pcie_bandwidth: float = PCIE_BANDWIDTH
    reserve_bytes: int = GPU_RESERVE
    overhead_s: float = OVERHEAD_S
    cpu_layer_overhead_s: float = CPU_LAYER_OVERHEAD_S
    name: str = "custom"
    # llama.cpp's CPU threads: few cores cannot use the memory's bandwidth, each thread's kernels
    # (dequantize and multiply) process only so many weight bytes and FLOPs per second
    cpu_threads: int | None = None
    cpu_thread_rate: float = CPU_THREAD_RATE
    cpu_thread_flops: float = CPU_THREAD_FLOPS

    @property
    def cpu_rate(self) -> float:
        """Bytes per second the CPU side reads while decoding: the memory's bandwidth, or what the
        threads' kernels process when that is less."""
        return min(self.cpu_bandwidth, self.cpu_threads * self.cpu_thread_rate) if self.cpu_threads else self.cpu_bandwidth

    @property
    def cpu_compute(self) -> float:
        return min(self.cpu_flops, self.cpu_threads * self.cpu_thread_flops) if self.cpu_threads else self.cpu_flops

    def describe(self) -> str:
        gpu = (f"GPU {format_bytes(self.gpu_bytes)} at {self.gpu_bandwidth / GB:.0f} GB/s" if self.gpu_bytes
               else "no GPU")
        threads = (f" ({self.cpu_threads} CPU threads: {self.cpu_rate / GB:.1f} GB/s of weights)"
                   if self.cpu_threads and self.cpu_rate < self.cpu_bandwidth else "")
        return f"{self.name}: {gpu}, system memory at {self.cpu_bandwidth / GB:.0f} GB/s{threads}"


def hardware(gpu: str | None = None, *, gpu_memory: int | str | None = None, gpu_bandwidth: float | None = None,
             cpu: str | None = None, cpu_bandwidth: float | None = None, **overrides: Any) -> Hardware:
    """A :class:`Hardware` from presets (``gpu="rtx2080"``, ``cpu="ddr4-2ch"``) with the user's own
    figures on top (``gpu_memory="8GiB"``, bandwidths in GB/s, effective)."""
    kw: dict[str, Any] = {}
    names = []
    if gpu is not None:
        if gpu.lower() not in GPU_PRESETS:
            raise UspxError(f"unknown GPU preset {gpu!r}; known: {', '.join(GPU_PRESETS)} (or give --gpu SIZE "
                            "and --gpu-bandwidth GB/s)")
        p = GPU_PRESETS[gpu.lower()]
        kw.update(gpu_bytes=int(p["memory"]), gpu_bandwidth=p["bandwidth"] * p["share"] * GB,
                  gpu_flops=p["tflops"] * 1e12)
        names.append(gpu.lower())
    cpu_name = (cpu or "ddr4-2ch").lower()
    if cpu_name not in CPU_PRESETS:
        raise UspxError(f"unknown system-memory preset {cpu!r}; known: {', '.join(CPU_PRESETS)} (or give "
                        "--ram-bandwidth GB/s, or --ram measure)")
    c = CPU_PRESETS[cpu_name]
    kw.update(cpu_bandwidth=c["bandwidth"] * c["share"] * GB, cpu_flops=c["tflops"] * 1e12)
    names.append(cpu_name)
    if gpu_memory is not None:
        kw["gpu_bytes"] = parse_size(gpu_memory)
    if gpu_bandwidth is not None:
        kw["gpu_bandwidth"] = float(gpu_bandwidth) * GB
    if cpu_bandwidth is not None:
        kw["cpu_bandwidth"] = float(cpu_bandwidth) * GB
    if kw.get("gpu_bytes") and not kw.get("gpu_bandwidth"):
        raise UspxError("a GPU needs its memory bandwidth: --gpu-bandwidth GB/s, or a preset (--gpu rtx2080, ...)")
    if kw.get("gpu_bytes") and not kw.get("gpu_flops"):
        kw["gpu_flops"] = 20e12
    return Hardware(**kw, name="+".join(names), **overrides)


def user_hardware(gpu: str, *, gpu_bandwidth: float | None = None, ram: str | None = None,
                  ram_bandwidth: float | None = None, cpu_threads: int | None = None) -> tuple[Hardware, float | None]:
    """The machine ``uspx plan --gpu`` describes: ``gpu`` a preset, a memory size (``8GiB``) or
    ``0``/``cpu`` (none); ``ram`` a system-memory preset or ``measure`` (a short read here). Returns
    the hardware and the bandwidth measured here (GB/s; None when not measured)."""
    measured = ram is not None and ram.lower() == "measure"
    ram_bw = measure_cpu_bandwidth() / GB if measured else ram_bandwidth
    preset = gpu.lower() if gpu.lower() in GPU_PRESETS else None
    no_gpu = gpu.lower() in ("0", "cpu", "none")
    hw = hardware(preset, gpu_memory=None if preset or no_gpu else gpu, gpu_bandwidth=gpu_bandwidth,
                  cpu=None if measured else ram, cpu_bandwidth=ram_bw)
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise UspxError(f"--cpu-threads must be >= 1, not {cpu_threads}")
        hw = replace(hw, cpu_threads=cpu_threads)
    return hw, ram_bw if measured else None


def measure_cpu_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """System memory read bandwidth (bytes/s), measured: the best of ``repeats`` dot products of two
    arrays far larger than any cache (a read of both, BLAS's threads). A floor: llama.cpp's own
    kernels may read faster."""
    import numpy as np

    a = np.ones(megabytes * 2**20 // 8, dtype=np.float32)
    b = np.ones_like(a)
    np.dot(a, b)  # touch every page first; BLAS reads both arrays with its threads
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.dot(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


# ----- bytes per token ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBytes:
    """What decoding one token reads, split by where it lives."""

    non_expert: int  # attention, norms, routers, output matrix (the embedding table's one row aside)
    experts_per_layer: int  # top-k experts' bytes in one MoE layer
    moe_layers: int
    kv: int  # the KV cache of the tokens before it

    def split(self, cpu_moe_layers: int, on_gpu: bool) -> tuple[int, int]:
        """(bytes from GPU memory, bytes from system memory) with ``cpu_moe_layers`` layers' experts
        on the CPU; without a GPU everything is system memory."""
        if not on_gpu:
            return 0, self.non_expert + self.experts_per_layer * self.moe_layers + self.kv
        gpu_layers = self.moe_layers - cpu_moe_layers
        return (self.non_expert + self.experts_per_layer * gpu_layers + self.kv,
                self.experts_per_layer * cpu_moe_layers)


def token_bytes(est: MemoryEstimate, depth: int = 0) -> TokenBytes:
    """Bytes read to decode one token at position ``depth`` (its KV cache) of a model sized by
    :func:`uspx.plan.memory.estimate`. The embedding table's one row is left out (a few KiB)."""
    p = est.params
    router_rows = est.expert_bytes - _expert_only_bytes(est)
    non_expert = est.fixed_bytes - _embedding_bytes(est) + router_rows * est.experts_per_layer * p.num_moe_layers
    return TokenBytes(non_expert=int(non_expert),
                      experts_per_layer=_expert_only_bytes(est) * min(p.top_k, est.experts_per_layer),
                      moe_layers=p.num_moe_layers, kv=kv_cache_bytes(p, depth, est.kv_dtype) if depth else 0)


def _embedding_bytes(est: MemoryEstimate) -> int:
    """The embedding table's bytes at the estimate's precision (only one row of it is read)."""
    p, prec = est.params, est.precision
    part = p.other["embeddings"]
    if not p.other["lm_head"].total:
        return 0  # tied: the table is the output matrix, read whole every token anyway
    bits = prec.embedding_bits if prec.embedding_bits is not None else prec.other_bits
    return int(bits * part.matrix / 8 + prec.other_bits * part.vector / 8)


def _expert_only_bytes(est: MemoryEstimate) -> int:
    """One expert's own bytes, its router row aside."""
    p, prec = est.params, est.precision
    return est.expert_bytes - math.ceil(prec.bits(p.router_row, False) / 8)


def distinct_experts(kept: int, top_k: int, tokens: int) -> float:
    """Experts of one layer that a batch of ``tokens`` touches, expected under even routing: each
    expert is missed by a token with probability ``1 - top_k / kept``."""
    if kept <= 0:
        return 0.0
    return kept * (1 - (1 - min(top_k, kept) / kept) ** tokens)


# ----- predictions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """One model on one machine: what sits where, whether it fits, and the predicted speed."""

    experts_per_layer: int
    cpu_moe_layers: int  # llama.cpp's --n-cpu-moe
    fits: bool
    gpu_bytes: int  # resident on the GPU: weights, KV cache, reserve
    cpu_bytes: int  # resident in system memory
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    read_gpu: int  # bytes read from GPU memory per decoded token
    read_cpu: int  # bytes read from system memory per decoded token
    why: str = ""


def place(est: MemoryEstimate, hw: Hardware, cpu_moe_layers: int, *, depth: int = 0, ubatch: int = 512) -> Placement:
    """``est``'s model with the experts of ``cpu_moe_layers`` MoE layers in system memory."""
    p = est.params
    if not 0 <= cpu_moe_layers <= p.num_moe_layers:
        raise UspxError(f"--n-cpu-moe must be in 0..{p.num_moe_layers}, got {cpu_moe_layers}")
    tb = token_bytes(est, depth)
    on_gpu = hw.gpu_bytes > 0
    emb = _embedding_bytes(est)
    layer_experts = _expert_only_bytes(est) * est.experts_per_layer
    cpu_resident = emb + layer_experts * cpu_moe_layers if on_gpu else est.total_bytes - est.reserve_bytes
    gpu_resident = (est.weights_bytes - cpu_resident + est.kv_bytes + hw.reserve_bytes) if on_gpu else 0
    fits = not on_gpu or gpu_resident <= hw.gpu_bytes
    read_gpu, read_cpu = tb.split(cpu_moe_layers, on_gpu)
    seconds = (read_gpu / hw.gpu_bandwidth if read_gpu else 0.0) + read_cpu / hw.cpu_rate + hw.overhead_s
    seconds += hw.cpu_layer_overhead_s * (cpu_moe_layers if on_gpu else 0)
    active = est.active_params
    if on_gpu:
        per_batch = 2 * active * ubatch / hw.gpu_flops + (layer_experts * cpu_moe_layers) / hw.pcie_bandwidth
    else:
        # a batch's tokens touch most experts: each is read once per batch, as are the other weights
        touched = distinct_experts(est.experts_per_layer, p.top_k, ubatch)
        read = tb.non_expert + _expert_only_bytes(est) * touched * p.num_moe_layers
        per_batch = 2 * active * ubatch / hw.cpu_compute + read / hw.cpu_rate
    why = "" if fits else (f"needs {format_bytes(gpu_resident)} of GPU memory (weights, KV cache, "
                           f"{format_bytes(hw.reserve_bytes)} reserve), has {format_bytes(hw.gpu_bytes)}")
    return Placement(est.experts_per_layer, cpu_moe_layers, fits, int(gpu_resident), int(cpu_resident),
                     1.0 / seconds, ubatch / per_batch, int(read_gpu), int(read_cpu), why)


def best_placement(est: MemoryEstimate, hw: Hardware, **kw: Any) -> Placement:
    """The fastest placement that fits: the smallest ``--n-cpu-moe`` whose GPU share fits (more
    experts on the GPU are always faster); all experts on the CPU when even that does not fit.
    Without a GPU everything is in system memory and fits at once."""
    for cpu_layers in range(est.params.num_moe_layers + 1):
        pl = place(est, hw, cpu_layers, **kw)
        if pl.fits:
            break
    return pl


@dataclass(frozen=True)
class OffloadPlan:
    """The full model with llama.cpp's best offload against pruned models at each kept count."""

    hardware: Hardware
    dtype: str
    context: int
    full: Placement
    pruned: list[Placement] = field(default_factory=list)
    target_speedup: float | None = None
    smallest_pruning: Placement | None = None  # the most experts kept that still reaches the target

    def as_dict(self) -> dict:
        return asdict(self)  # nested records (hardware, placements) become dicts too


def offload_plan(config: Any, hw: Hardware, *, dtype: str | None = None, context: int = 4096, kv_dtype: str = "bf16",
                 keep: list[int] | None = None, speedup: float | None = None, depth: int = 0) -> OffloadPlan:
    """Predicted fit and speed of the full model (best ``--n-cpu-moe``) and of the model pruned to
    each count in ``keep`` (default: every count from the full one down to top-k), and the smallest
    pruning (the most experts kept) whose decode speed is at least ``speedup`` times the full
    model's."""
    def at(k: int | None) -> MemoryEstimate:  # each count sized on its own (llama-quantize's rules depend on it)
        return estimate(config, dtype, context=context, kv_dtype=kv_dtype, experts_per_layer=k)

    base = at(None)
    p = base.params
    shown = keep or {max(p.top_k, round(p.num_experts * i / 8)) for i in range(1, 9)}
    counts = sorted(set(shown), reverse=True)
    if bad := [k for k in counts if not p.top_k <= k <= p.num_experts]:
        raise UspxError(f"kept experts per layer must be in {p.top_k}..{p.num_experts} (top-k at least), got {bad}")
    searched = counts if speedup is None else range(p.top_k, p.num_experts + 1)  # a target: every count
    placed = {k: best_placement(base if k == p.num_experts else at(k), hw, depth=depth)
              for k in {*searched, p.num_experts}}
    full = placed[p.num_experts]
    smallest = max((k for k, pl in placed.items() if speedup is not None and pl.fits
                    and pl.decode_tokens_per_s >= speedup * full.decode_tokens_per_s), default=None)
    rows = {*counts} | ({smallest} if smallest is not None else set())  # the smallest pruning shown too
    pruned = [placed[k] for k in sorted(rows, reverse=True)]
    return OffloadPlan(hw, base.dtype, context, full, pruned, speedup, placed.get(smallest))


def print_offload_plan(plan: OffloadPlan) -> None:
    from rich.table import Table

    from uspx.progress import console

    t = Table(title=f"{plan.hardware.describe()}; {plan.dtype} weights, {plan.context} tokens of KV cache "
                    "(decode and prefill predicted for llama.cpp)")
    for col in ("experts", "--n-cpu-moe", "GPU", "RAM", "fits", "decode tok/s", "x full", "prefill tok/s"):
        t.add_column(col, justify="left" if col == "experts" else "right")

    def row(name: str, pl: Placement) -> None:
        t.add_row(name, str(pl.cpu_moe_layers), format_bytes(pl.gpu_bytes), format_bytes(pl.cpu_bytes),
                  "yes" if pl.fits else "no", f"{pl.decode_tokens_per_s:.1f}",
                  f"{pl.decode_tokens_per_s / plan.full.decode_tokens_per_s:.2f}", f"{pl.prefill_tokens_per_s:.0f}")
    num_experts = plan.full.experts_per_layer
    row(f"all {num_experts}", plan.full)
    for pl in plan.pruned:
        if pl.experts_per_layer != num_experts:
            row(f"{pl.experts_per_layer} ({100 * pl.experts_per_layer / num_experts:.0f}%)", pl)
    console.print(t)
    if plan.target_speedup is not None:
        s = plan.smallest_pruning
        console.print(f"the smallest pruning that decodes {plan.target_speedup:g}x the full model's speed: "
                      + (f"keep {s.experts_per_layer} of {num_experts} experts per layer "
                         f"({s.decode_tokens_per_s:.1f} tok/s, --n-cpu-moe {s.cpu_moe_layers})" if s else
                         "none (no kept count reaches it on this hardware)"))
