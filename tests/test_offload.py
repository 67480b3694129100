"""Pruning against offload: the speed model on a hand-built model whose bytes are worked out here
(bf16: 2 bytes a weight), placements, the best --n-cpu-moe, and the smallest pruning for a speed-up."""

from __future__ import annotations

import json

import pytest

from uspx.io import UspxError
from uspx.models.params import ModelParams, Part
from uspx.plan import speed as sp

# 2 MoE layers of 8 experts, top-2; an expert is 1000 weights, its router row 10; embeddings and
# output 5000 each; attention 2000 weights and 100 vector entries; 4 KV elements per token per layer
PARAMS = ModelParams(model_type="hand", num_layers=2, moe_layers=(0, 1), num_experts=8, top_k=2,
                     expert=Part(1000), router_row=Part(10),
                     other={"embeddings": Part(5000), "lm_head": Part(5000), "attention": Part(2000, 100)},
                     kv_per_token=(4, 4), window=(None, None), stored_dtype="bf16")
HW = sp.Hardware(gpu_bytes=40000, gpu_bandwidth=1e6, cpu_bandwidth=1e5, gpu_flops=1e9, cpu_flops=1e8,
                 pcie_bandwidth=1e5, reserve_bytes=0, overhead_s=0.5e-3, cpu_layer_overhead_s=0.1e-3)


def test_bytes_read_per_token():
    from uspx.plan.memory import estimate

    tb = sp.token_bytes(estimate(PARAMS, context=100))
    # attention 2100 + output 5000 entries (24200 - 10000 embedding bytes) + 8 router rows x 2 layers
    assert tb.non_expert == (2100 + 5000) * 2 + 8 * 2 * 10 * 2 == 14520
    assert tb.experts_per_layer == 2 * 1000 * 2  # top-2 experts, whatever is kept
    assert sp.token_bytes(estimate(PARAMS, context=100), depth=50).kv == 50 * 8 * 2


def test_placements_and_the_best_n_cpu_moe():
    from uspx.plan.memory import estimate

    est = estimate(PARAMS, context=100)
    # all experts on the GPU: weights 24200 + 16 x 2020, minus the embedding table (kept in RAM), KV 1600
    p0 = sp.place(est, HW, 0)
    assert p0.gpu_bytes == 24200 + 16 * 2020 - 10000 + 1600 == 48120 and not p0.fits
    p1 = sp.best_placement(est, HW)
    assert p1.cpu_moe_layers == 1 and p1.fits and p1.gpu_bytes == 48120 - 8 * 2000
    # decode: GPU reads 14520 + 4000 at 1e6 B/s, RAM 4000 at 1e5 B/s, overheads 0.5 + 0.1 ms
    assert p1.read_gpu == 18520 and p1.read_cpu == 4000
    assert p1.decode_tokens_per_s == pytest.approx(1 / (0.01852 + 0.04 + 0.0005 + 0.0001))
    # prefill of a 512-token batch: 2 x active params x 512 at 1e9 FLOP/s, plus layer 0's 16000 expert
    # bytes over PCIe; active = attention 2100 + output 5000 + routers 160 + 2 x 2 x 1000
    active = 2100 + 5000 + 160 + 4000
    assert p1.prefill_tokens_per_s == pytest.approx(512 / (2 * active * 512 / 1e9 + 16000 / 1e5))
    cpu_only = sp.best_placement(est, sp.Hardware(cpu_bandwidth=1e5, overhead_s=0.5e-3))
    assert cpu_only.decode_tokens_per_s == pytest.approx(1 / ((14520 + 8000) / 1e5 + 0.0005))


def test_smallest_pruning_for_a_speedup():
    plan = sp.offload_plan(PARAMS, HW, context=100, keep=[8, 6, 4, 2], speedup=2.5)
    full = 1 / (0.01852 + 0.04 + 0.0006)
    assert plan.full.decode_tokens_per_s == pytest.approx(full)
    by_count = {p.experts_per_layer: p for p in plan.pruned}
    # 6 kept: 24200 + 12 x 2020 - 10000 + 1600 = 40040 > 40000, so one layer's experts stay in RAM
    assert by_count[6].cpu_moe_layers == 1
    # 5 kept (searched, not listed): 24200 + 10 x 2020 - 10000 + 1600 = 36000 fits whole; the router
    # rows read fall to 5 x 2 x 20 bytes
    assert plan.smallest_pruning.experts_per_layer == 5 and plan.smallest_pruning.cpu_moe_layers == 0
    whole5 = 1 / ((14200 + 200 + 8000) / 1e6 + 0.0005)
    assert plan.smallest_pruning.decode_tokens_per_s == pytest.approx(whole5)
    assert whole5 / full >= 2.5 > by_count[6].decode_tokens_per_s / full
    assert sp.offload_plan(PARAMS, HW, context=100, speedup=100).smallest_pruning is None
    with pytest.raises(UspxError, match="top-k at least"):
        sp.offload_plan(PARAMS, HW, keep=[1])


def test_presets_and_errors():
    hw = sp.hardware("rtx2080", cpu="ddr4-2ch")
    assert hw.gpu_bytes == 8 * 2**30 and hw.gpu_bandwidth == pytest.approx(448e9 * 0.8)
    assert hw.cpu_bandwidth == pytest.approx(51.2e9 * 0.6)
    assert sp.hardware(None, gpu_memory="8GiB", gpu_bandwidth=300, cpu_bandwidth=20).cpu_bandwidth == 20e9
    with pytest.raises(UspxError, match="bandwidth"):
        sp.hardware(None, gpu_memory="8GiB")
    with pytest.raises(UspxError, match="unknown GPU preset"):
        sp.hardware("gtx9999")
    assert sp.measure_cpu_bandwidth(megabytes=16, repeats=1) > 1e8


def test_cli_plan_gpu(tmp_path):
    from typer.testing import CliRunner

    from uspx.cli import app

    out = tmp_path / "offload.json"
    res = CliRunner().invoke(app, ["plan", "default", "--gpu", "16MiB", "--gpu-bandwidth", "100", "--ram-bandwidth",
                                   "10", "--speedup", "1.5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    full = rec["full"]
    assert rec["hardware"]["gpu_bytes"] == 16 * 2**20
    assert full["decode_tokens_per_s"] == pytest.approx(
        1 / (full["read_gpu"] / 100e9 + full["read_cpu"] / 10e9 + sp.OVERHEAD_S
             + sp.CPU_LAYER_OVERHEAD_S * full["cpu_moe_layers"]))
    assert "the smallest pruning that decodes 1.5x" in res.output


def test_few_cpu_threads_bound_the_cpu_side():
    """Two threads at 3.6 GB/s of weights each read 7.2 GB/s, below a 30 GB/s memory: decode and
    prefill on the CPU take the threads' rates."""
    from uspx.plan.memory import estimate

    hw = sp.Hardware(cpu_bandwidth=30e9, cpu_flops=0.5e12, cpu_threads=2, cpu_thread_rate=3.6e9,
                     cpu_thread_flops=17e9, overhead_s=0.5e-3)
    assert hw.cpu_rate == 7.2e9 and hw.cpu_compute == 2 * 17e9
    pl = sp.best_placement(estimate(PARAMS, context=100), hw, ubatch=32)
    assert pl.decode_tokens_per_s == pytest.approx(1 / ((14520 + 8000) / 7.2e9 + 0.0005))
    active = 2100 + 5000 + 160 + 4000
    # a batch of 32 tokens touches 8 x (1 - (6/8)^32) of the 8 experts in each layer, read once
    touched = 8 * (1 - 0.75**32)
    assert pl.prefill_tokens_per_s == pytest.approx(
        32 / (2 * active * 32 / 34e9 + (14520 + 2000 * touched * 2) / 7.2e9))
    assert sp.distinct_experts(32, 4, 32) == pytest.approx(32 * (1 - (28 / 32) ** 32))
    assert sp.Hardware(cpu_bandwidth=30e9, cpu_threads=16, cpu_thread_rate=3.6e9).cpu_rate == 30e9  # memory binds
