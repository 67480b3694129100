"""Several processes, one trace: two gloo processes (as torchrun starts them) write the same trace
folder, reconstruction sums and scores as one process, and a run with a killed rank resumes."""

from __future__ import annotations

import datetime
import json
import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp

from conftest import make_tokenizer, write_jsonl

ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, seconds: int):
    """A spawned process joins the gloo group as torchrun would set it up; returns torch.distributed."""
    import torch
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds))
    return td


def _model(model, kw: dict):
    """``model`` as the stages take it, and the other arguments: ``layered`` (not a stage argument)
    opens it layer by layer in ``dtype``."""
    kw = dict(kw)
    if kw.pop("layered", False):
        from uspx.engine import open_source

        return open_source(model, streaming=True, dtype=kw.pop("dtype")), kw
    return model, kw


def _worker(rank: int, world: int, port: int, model: str, workload: str, out: str, crash: str | None,
            kw: dict, log: str | None) -> None:
    td = _join(rank, world, port, 30)
    try:
        if crash == "shard" and rank == 1:
            import uspx.trace.format as fmt
            import uspx.trace.run as run_mod

            real = fmt.record_rank_shard

            def record_then_die(out_dir, r, entry):
                real(out_dir, r, entry)
                os._exit(9)  # killed right after its first shard

            run_mod.record_rank_shard = record_then_die
        if (crash == "layer" or log) and rank == 1:
            import uspx.engine.runner as runner

            save = runner._save_state

            def save_then_die_or_log(state_dir, key, done, store, save_hidden):
                save(state_dir, key, done, store, save_hidden)
                if log:
                    with open(log, "a") as fh:
                        fh.write(f"{done}\n")
                if crash == "layer" and done == 1:
                    os._exit(9)  # killed once its first layer was saved

            runner._save_state = save_then_die_or_log
        from uspx.trace import trace

        opened, rest = _model(model, kw)
        trace(opened, workload, out, progress=False, **rest)
    finally:
        if td.is_initialized():
            td.destroy_process_group()


WHOLE = dict(items_per_shard=2, reconstruction=True)


def _spawn(model, workload, out, crash=None, kw=WHOLE, log=None):
    mp.start_processes(_worker, args=(2, _free_port(), str(model), str(workload), str(out), crash, kw,
                                      None if log is None else str(log)),
                       nprocs=2, start_method="spawn", join=True)


def _same_folders(a, b):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"] and ma["complete"] and mb["complete"]
    assert ma["options"] == mb["options"] and ma["model"] == mb["model"] and ma["workload"] == mb["workload"]
    for s in ma["shards"]:
        assert pq.read_table(a / s["file"]).equals(pq.read_table(b / s["file"]))
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    ra, rb = np.load(a / "reconstruction.npz"), np.load(b / "reconstruction.npz")
    assert set(ra.files) == set(rb.files) and all(np.array_equal(ra[k], rb[k]) for k in ra.files)
    assert not (a / ".ranks").exists()


def test_two_processes_write_the_trace_of_one(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.score import score
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "one", items_per_shard=2, reconstruction=True, progress=False)
    _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two")
    _same_folders(tmp_path / "two", tmp_path / "one")
    # and the scores read from either are the same
    a = score(tiny_gpt_oss_dir, tmp_path / "one", wl, tmp_path / "s1", ["frequency", "reconstruction"], progress=False)
    b = score(tiny_gpt_oss_dir, tmp_path / "two", wl, tmp_path / "s2", ["frequency", "reconstruction"], progress=False)
    assert a.table.select(["layer", "expert", "method", "value"]).equals(b.table.select(["layer", "expert", "method", "value"]))


def test_a_killed_rank_resumes(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "one", items_per_shard=2, reconstruction=True, progress=False)
    with pytest.raises(Exception):
        _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two", crash="shard")
    assert not json.loads((tmp_path / "two" / "manifest.json").read_text())["complete"]
    _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two")
    _same_folders(tmp_path / "two", tmp_path / "one")


def _extract_worker(rank: int, world: int, port: int, model: str, workload: str, out: str) -> None:
    td = _join(rank, world, port, 60)
    try:
        from uspx.extract import extract

        report = extract(model, workload, out, keep="50%", speed=False, progress=False)
        assert report["kept"]  # every rank returns rank 0's report
    finally:
        td.destroy_process_group()


def test_extract_under_two_processes_equals_one(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.extract import extract

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    one = extract(tiny_gpt_oss_dir, wl, tmp_path / "one", keep="50%", speed=False, progress=False)
    mp.start_processes(_extract_worker, args=(2, _free_port(), str(tiny_gpt_oss_dir), str(wl), str(tmp_path / "two")),
                       nprocs=2, start_method="spawn", join=True)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["kept"] == one["kept"] and two["quality"] == one["quality"]


def _score_worker(rank: int, world: int, port: int, model: str, workload: str, trace_dir: str, out: str,
                  runs: list | None = None, log: str | None = None) -> None:
    td = _join(rank, world, port, 60)
    try:
        from uspx.score import score

        if log:  # what this process ran: taylor's backwards (one per prompt), reconstruction's batches
            import uspx.score.reconstruction as rec
            import uspx.score.taylor as tay

            def logged(name, real):
                def call(*a, **k):
                    with open(f"{log}.{rank}", "a") as fh:
                        fh.write(f"{name} {len(a[1]) if name == 'batches' else 1}\n")
                    return real(*a, **k)
                return call

            tay.token_losses = logged("backward", tay.token_losses)
            rec.run = logged("batches", rec.run)
        for i, (methods, kw) in enumerate(runs or [(["ablation_natural", "frequency"], dict(bootstrap=20))]):
            opened, rest = _model(model, kw)
            score(opened, trace_dir, workload, f"{out}{i or ''}", methods, progress=False, **rest)
    finally:
        td.destroy_process_group()


def test_ablations_shared_out_give_the_single_process_scores(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.score import load_scores, score
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    one = score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s1", ["ablation_natural", "frequency"],
                progress=False, bootstrap=20)
    mp.start_processes(_score_worker, args=(2, _free_port(), str(tiny_gpt_oss_dir), str(wl), str(tmp_path / "t"),
                                            str(tmp_path / "s2")), nprocs=2, start_method="spawn", join=True)
    two = load_scores(tmp_path / "s2")
    cols = ["layer", "expert", "method", "value", "ci_low", "ci_high", "tokens"]
    assert two.table.select(cols).equals(one.table.select(cols))
    assert two.meta["ablation_forwards"] == one.meta["ablation_forwards"]


# batch_size 2: seven batches, so each process runs several, of different lengths; two items per
# shard, so most shards hold tokens of both processes' batches
STREAMED = dict(layered=True, dtype="fp32", batch_size=2, items_per_shard=2, reconstruction=True, norms=True,
                logits=True)


def test_layer_by_layer_under_two_processes_writes_the_trace_of_one(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.engine import make_batches
    from uspx.engine.batches import share
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    opened, kw = _model(tiny_gpt_oss_dir, STREAMED)
    trace(opened, wl, tmp_path / "one", progress=False, **kw)
    _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two", kw=STREAMED)
    _same_folders(tmp_path / "two", tmp_path / "one")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["options"]["streaming"] and manifest["streaming"]["first_layer"] == 0
    assert not (tmp_path / "two" / ".streaming").exists()
    # the processes really shared the work: each ran whole batches of the one-process run, and
    # every token was in exactly one share
    from uspx.workload import encode, load_workload

    encoded = encode(load_workload(wl), make_tokenizer(), manifest["options"]["max_length"])
    batches = make_batches(encoded, 2, 0, max_tokens=manifest["options"]["batch_tokens"])
    rows = [share(batches, r, 2)[1] for r in range(2)]
    assert len(batches) > 2 and all(len(r) for r in rows)
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(sum(len(e.input_ids) for e in encoded)))


def test_a_killed_rank_resumes_layer_by_layer(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    opened, kw = _model(tiny_gpt_oss_dir, STREAMED)
    trace(opened, wl, tmp_path / "one", progress=False, **kw)
    with pytest.raises(Exception):
        _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two", crash="layer", kw=STREAMED)
    stage = tmp_path / "two" / ".streaming" / "rank-00001-of-00002"
    assert json.loads((stage / "state.json").read_text())["layers_done"] == 1
    assert not json.loads((tmp_path / "two" / "manifest.json").read_text())["complete"]
    _spawn(tiny_gpt_oss_dir, wl, tmp_path / "two", kw=STREAMED, log=tmp_path / "saved.txt")
    assert (tmp_path / "saved.txt").read_text().split() == ["2"]  # rank 1 ran only its second layer again
    _same_folders(tmp_path / "two", tmp_path / "one")


def _ran(log, rank):
    lines = [l.split() for l in (log.parent / f"{log.name}.{rank}").read_text().splitlines()]
    return {k: sum(int(n) for name, n in lines if name == k) for k in ("backward", "batches")}


def test_taylor_and_reconstruction_shared_out_give_the_single_process_scores(tiny_gpt_oss_dir, tmp_path, one_thread):
    """taylor's prompts and reconstruction's batches (whole model, and layer by layer) are shared out
    and their per-prompt sums added. Each prompt's sums come from exactly one process and the others
    add exact zeros, so the tables are compared for equality, not within a tolerance."""
    from uspx.score import load_scores, score
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)  # no reconstruction sums: score runs the model
    runs = [(["taylor", "reconstruction"], dict(bootstrap=20, batch_size=2)),
            (["reconstruction"], dict(bootstrap=20, batch_size=2, layered=True, dtype="fp32"))]
    one = []
    for i, (m, kw) in enumerate(runs):
        opened, rest = _model(tiny_gpt_oss_dir, kw)
        one.append(score(opened, tmp_path / "t", wl, tmp_path / f"s1-{i}", m, progress=False, **rest))
    mp.start_processes(_score_worker, args=(2, _free_port(), str(tiny_gpt_oss_dir), str(wl), str(tmp_path / "t"),
                                            str(tmp_path / "s2-"), runs, str(tmp_path / "ran")),
                       nprocs=2, start_method="spawn", join=True)
    cols = ["layer", "expert", "method", "value", "ci_low", "ci_high", "tokens"]
    for i, want in enumerate(one):
        got = load_scores(tmp_path / (f"s2-{i}" if i else "s2-"))
        assert got.table.select(cols).equals(want.table.select(cols)), runs[i]
    assert (one[0].to_pandas().query("method == 'taylor'").value > 0).any()
    # the work was shared: each process ran some of the backwards and batches, none ran them twice
    ran = [_ran(tmp_path / "ran", r) for r in range(2)]
    calibration = sum(r["split"] == "calibration" for r in ROWS)
    assert all(r["backward"] > 0 and r["batches"] > 0 for r in ran)
    assert sum(r["backward"] for r in ran) == calibration  # one backward per prompt (every one has targets)
    assert sum(r["batches"] for r in ran) == 2 * -(-calibration // 2)  # two runs of ceil(P / 2) batches


def test_learned_masks_are_refused_under_several_processes(tmp_path, monkeypatch):
    import uspx.score.api as api
    from uspx.dist import Dist
    from uspx.io import UspxError

    monkeypatch.setattr(api, "current", lambda: Dist(0, 2))  # the check precedes any collective
    with pytest.raises(UspxError, match="l0_layer run as one sequence in one process.*2 processes"):
        api._score("default", tmp_path / "t", "python_dev", tmp_path / "s", ["frequency", "l0_layer"], keep="50%",
                  progress=False)
    assert not (tmp_path / "s").exists()
