import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tokenizer, save_tiny, write_jsonl
from uspx.io import UspxError
from uspx.models import adapter_for, load_model
from uspx.testing import TINY_CONFIGS
from uspx.trace import Trace, trace

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

ROWS = [
    {"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i * i}", "family": "code"} for i in range(5)
] + [{"text": f"the {i} quick brown foxes jump over lazy dogs " * (1 + i % 3), "family": "prose"} for i in range(4)]


def reference_routing(model, adapter, ids: torch.Tensor) -> dict[int, tuple]:
    """Per MoE layer: (logits, weights, index) from transformers' own modules, one unpadded sequence.

    The logits come from ``output_router_logits=True``; weights and ids from calling the family's
    own router (dbrx: its block's ``route_tokens_to_experts``) on the router's input.
    """
    inputs, expert_in = {}, {}
    handles = [
        l.router.register_forward_pre_hook(lambda m, a, i=l.index: inputs.__setitem__(i, a[0].detach()))
        for l in adapter.layers
    ] + [
        l.experts.register_forward_pre_hook(lambda m, a, i=l.index: expert_in.__setitem__(i, a[0].detach()))
        for l in adapter.layers
    ]
    with torch.no_grad():
        out = model(input_ids=ids[None], output_router_logits=True)
    for h in handles:
        h.remove()
    logits_by_layer = dict(zip([l.index for l in adapter.layers], out.router_logits))
    ref = {}
    with torch.no_grad():
        for l in adapter.layers:
            routed = l.router(inputs[l.index])
            if isinstance(routed, torch.Tensor):
                w, idx = l.block.route_tokens_to_experts(routed)
            else:
                _, w, idx = routed
            x = expert_in[l.index].reshape(-1, expert_in[l.index].shape[-1])
            ref[l.index] = (logits_by_layer[l.index].reshape(-1, adapter.num_experts), w, idx,
                            reference_norms(l.experts, x, idx.reshape(len(x), -1)))
    return ref


def reference_norms(experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||f_e(x)|| per (token, slot) from transformers' own eager expert loop (not the grouped kernel
    the model runs by default), called once per slot with that slot's expert alone at weight 1."""
    cfg = getattr(experts, "config", None)
    old = getattr(cfg, "_experts_implementation", None)
    if cfg is not None:
        cfg._experts_implementation = "eager"
    out = torch.zeros(idx.shape)
    try:
        with torch.no_grad():
            for j in range(idx.shape[1]):
                y = experts(x, idx[:, j : j + 1], torch.ones(len(x), 1, dtype=x.dtype))
                out[:, j] = y.reshape(len(x), -1).float().norm(dim=-1)
    finally:
        if cfg is not None:
            cfg._experts_implementation = old
    return out


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_trace_equals_transformers_routing(family, tmp_path):
    model_dir = save_tiny(family, tmp_path / "m")
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    manifest = trace(model_dir, wl, tmp_path / "t", batch_size=4, logits=True, norms=True, progress=False)
    lm = load_model(model_dir)
    adapter = adapter_for(lm.model)
    t = Trace(tmp_path / "t")
    df = t.table().to_pandas()
    items = t.items().to_pandas()
    tok = make_tokenizer()

    n_tokens = int(items["tokens"].sum())
    assert manifest["summary"]["tokens"] == n_tokens
    assert len(df) == n_tokens * len(adapter.layers)  # pads never counted
    for _, item in items.iterrows():
        rows = df[df["sample"] == item["sample"]]
        ids = torch.tensor(rows[rows["layer"] == adapter.layers[0].index]["token_id"].to_numpy())
        src = next(r for r in ROWS if (r.get("prompt") or r.get("text")) in tok.decode(ids.tolist()))
        assert item["family"] == src["family"]
        ref = reference_routing(lm.model, adapter, ids)
        for layer, (logits, w, idx, norms) in ref.items():
            got = rows[rows["layer"] == layer].sort_values("position")
            got_ids = np.stack(got["expert_ids"].to_numpy())
            got_w = np.stack(got["expert_weights"].to_numpy())
            assert np.array_equal(np.sort(got_ids, 1), np.sort(idx.numpy(), 1)), (family, layer)
            # rank order, highest weight first, whatever order the router returned them in
            ref_w = w.float().numpy()
            assert np.allclose(got_w, -np.sort(-ref_w, 1), atol=1e-6), (family, layer)
            order_got, order_ref = np.argsort(got_ids, 1), np.argsort(idx.numpy(), 1)
            np.testing.assert_allclose(
                np.take_along_axis(got_w, order_got, 1), np.take_along_axis(w.float().numpy(), order_ref, 1), atol=1e-5
            )
            np.testing.assert_allclose(np.stack(got["router_logits"].to_numpy()), logits.float().numpy(), rtol=1e-5, atol=1e-5)
            got_norms = np.stack(got["expert_norms"].to_numpy())
            np.testing.assert_allclose(np.take_along_axis(got_norms, order_got, 1),
                                       np.take_along_axis(norms.numpy(), order_ref, 1), rtol=1e-5, atol=1e-5)
        comp = rows[rows["layer"] == adapter.layers[0].index]
        assert comp["is_completion"].sum() == (
            len(ids) - item["completion_start"] if "completion" in src else len(ids)
        )


def test_expert_norms_match_hand_computation(tmp_path):
    """||f_e(x)|| from the gpt_oss fused weights, written out here from gpt_oss's expert layout (gate/up interleaved)."""
    model_dir = save_tiny("gpt_oss", tmp_path / "m")
    trace(model_dir, write_jsonl(tmp_path / "w.jsonl", ROWS[:2]), tmp_path / "t", norms=True, progress=False)
    lm = load_model(model_dir)
    layer = lm.model.model.layers[1].mlp
    hidden = {}
    h = layer.experts.register_forward_pre_hook(lambda m, a: hidden.update(x=a[0].detach()))
    df = Trace(tmp_path / "t").table().to_pandas()
    first = df[(df["sample"] == 0) & (df["layer"] == 1)].sort_values("position")
    ids = torch.tensor(first["token_id"].to_numpy())
    with torch.no_grad():
        lm.model(input_ids=ids[None])
    h.remove()
    ex = layer.experts
    for t, (eids, norms) in enumerate(zip(first["expert_ids"], first["expert_norms"])):
        for e, n in zip(eids, norms):
            x = hidden["x"][t]
            gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            gate, up = gu[::2].clamp(max=ex.limit), gu[1::2].clamp(-ex.limit, ex.limit)
            y = ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]
            assert abs(float(y.detach().norm()) - float(n)) < 1e-4


def test_resume_after_sigkill_gives_identical_trace(tmp_path, tiny_gpt_oss_dir):
    rows = [{"prompt": f"item {i}: " + "abc " * (i % 17), "family": "f"} for i in range(240)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "full", items_per_shard=4, logits=True, progress=False)

    code = (
        "import torch; torch.set_num_threads(1); from uspx.trace import trace; "  # one thread, as here
        f"trace({str(tiny_gpt_oss_dir)!r}, {str(wl)!r}, {str(tmp_path / 'killed')!r}, items_per_shard=4, logits=True, progress=False)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"file"') >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; enlarge the workload"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = Trace(tmp_path / "killed", require_complete=False)
    assert not partial.manifest["complete"] and 3 <= len(partial.manifest["shards"]) < 60

    trace(tiny_gpt_oss_dir, wl, tmp_path / "killed", items_per_shard=4, logits=True, progress=False)
    a = Trace(tmp_path / "full").table()
    b = Trace(tmp_path / "killed").table()
    assert a.equals(b)
    assert not list((tmp_path / "killed").glob(".*tmp"))  # no leftovers of interrupted writes


def test_resume_removes_temp_files_of_a_killed_write(tmp_path, tiny_gpt_oss_dir):
    # A kill during atomic_path leaves ".<name>.<random>.tmp" beside the target; the resume cleans it.
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:3])
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    before = Trace(tmp_path / "t").table()
    stale = [tmp_path / "t" / ".manifest.json.x1y2.tmp", tmp_path / "t" / ".shard-000001.parquet.q9.tmp"]
    for f in stale:
        f.write_text("half")
    keep = tmp_path / "t" / "notes.tmp"  # not ours: no leading dot
    keep.write_text("user file")
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    assert not any(f.exists() for f in stale) and keep.exists()
    assert Trace(tmp_path / "t").table().equals(before)


def test_a_kill_during_the_first_manifest_write_resumes(tmp_path, tiny_gpt_oss_dir):
    """The folder then holds only the manifest's temporary file: nothing was written, so the run
    starts as in an empty folder (and a folder with anything else of the user's is still refused)."""
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:3])
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / ".manifest.json.k1ll.tmp").write_text('{"format": "uspx-tr')
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "ref", progress=False)
    assert Trace(tmp_path / "t").table().equals(Trace(tmp_path / "ref").table())
    assert not list((tmp_path / "t").glob(".*.tmp"))
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / ".manifest.json.k1ll.tmp").write_text("{")
    (tmp_path / "u" / "mine.txt").write_text("user file")
    with pytest.raises(UspxError, match="not a trace folder"):
        trace(tiny_gpt_oss_dir, wl, tmp_path / "u", progress=False)
    assert (tmp_path / "u" / "mine.txt").exists()


def test_refuses_folder_of_another_model_or_foreign_files(tmp_path, tiny_gpt_oss_dir):
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:3])
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    other = save_tiny("gpt_oss", tmp_path / "other", seed=1)
    with pytest.raises(UspxError, match="already holds a trace of another model"):
        trace(other, wl, tmp_path / "t", progress=False)
    with pytest.raises(UspxError, match="other options"):
        trace(tiny_gpt_oss_dir, wl, tmp_path / "t", logits=True, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UspxError, match="not a trace folder"):
        trace(tiny_gpt_oss_dir, wl, tmp_path / "junk", progress=False)
    t = Trace(tmp_path / "t")
    with pytest.raises(UspxError, match="fingerprint"):
        t.check(model=load_model(other).fingerprint)


def test_cli_trace_prints_summary(tmp_path, tiny_gpt_oss_dir):
    from typer.testing import CliRunner

    from uspx.cli import app

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS + [{"prompt": ""}])
    res = CliRunner().invoke(app, ["trace", str(tiny_gpt_oss_dir), str(wl), "-o", str(tmp_path / "t"), "--max-length", "12"])
    assert res.exit_code == 0, res.output
    assert "skipped_empty: 1" in res.output
    assert "truncated: " in res.output and "truncated: 0" not in res.output


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])
def test_norm_capture_leaves_the_forward_unchanged(family):
    """With norms captured inside the forward the model computes the same logits to the bit, other
    hooks that re-run the experts directly do not disturb the capture, and leaving restores the module."""
    from uspx.testing import tiny_model
    from uspx.trace import RoutingRecorder

    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(2, int(model.config.vocab_size), (2, 9), generator=torch.Generator().manual_seed(1))
    layer = adapter.layers[0]
    before = dict(layer.experts.__dict__)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        def run_again(module, args):  # as score and superweights hooks do
            x = args[0].reshape(-1, args[0].shape[-1])
            adapter.expert_outputs(layer, x, args[1].reshape(len(x), -1))

        rerun = layer.experts.register_forward_pre_hook(run_again)
        with RoutingRecorder(adapter, norms=True) as rec:
            got = model(input_ids=ids).logits
        rerun.remove()
    assert torch.equal(got, want)
    assert layer.experts.__dict__.keys() == before.keys() and not layer.experts._forward_hooks
    for l in adapter.layers:
        r = rec.layers[l.index]
        x = hidden_of(model, l, ids)
        torch.testing.assert_close(r.norms, reference_norms(l.experts, x, r.index), rtol=1e-5, atol=1e-5)


def hidden_of(model, layer, ids) -> torch.Tensor:
    """The experts module's input [N, H] on ``ids``, from a plain forward."""
    got = {}
    h = layer.experts.register_forward_pre_hook(lambda m, a: got.update(x=a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got["x"].reshape(-1, got["x"].shape[-1])


def test_norms_without_a_capture_point_are_computed_again():
    """transformers' eager expert loop has no point to read the norms from: the routed experts run
    again and give the same norms as the grouped kernel's capture."""
    from uspx.testing import tiny_model
    from uspx.trace import RoutingRecorder

    model = tiny_model("qwen3_moe")
    adapter = adapter_for(model)
    ids = torch.randint(2, int(model.config.vocab_size), (2, 7), generator=torch.Generator().manual_seed(2))
    norms = {}
    for kernel in ("grouped_mm", "eager"):
        model.config._experts_implementation = kernel
        with torch.no_grad(), RoutingRecorder(adapter, norms=True) as rec:
            model(input_ids=ids)
        norms[kernel] = {i: r.norms for i, r in rec.layers.items()}
    for i, n in norms["eager"].items():
        torch.testing.assert_close(n, norms["grouped_mm"][i], rtol=1e-5, atol=1e-5)
        x = hidden_of(model, adapter.layer(i), ids)
        torch.testing.assert_close(n, reference_norms(adapter.layer(i).experts, x, rec.layers[i].index), rtol=1e-5, atol=1e-5)
