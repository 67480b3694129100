"""Several processes, one trace: two gloo processes (as torchrun starts them) write the same trace
folder, reconstruction sums and scores as one process, and a run with a killed rank resumes.

Starting a process costs seconds (each imports torch), so the two-process runs of this module are
started together by one module fixture: a start for each run that kills rank 1, then one start
that runs every other job in turn (the killed runs' resumes among them). The tests compare them
with one process's results."""

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
WHOLE = dict(items_per_shard=2, reconstruction=True)
# batch_size 2: seven batches, so each process runs several, of different lengths; two items per
# shard, so most shards hold tokens of both processes' batches
STREAMED = dict(layered=True, dtype="fp32", batch_size=2, items_per_shard=2, reconstruction=True, norms=True,
                logits=True)
ABLATION_RUNS = [(["ablation_natural", "frequency"], dict(bootstrap=20))]
# taylor's prompts and reconstruction's batches, whole model and layer by layer
TAYLOR_RUNS = [(["taylor", "reconstruction"], dict(bootstrap=20, batch_size=2)),
               (["reconstruction"], dict(bootstrap=20, batch_size=2, layered=True, dtype="fp32"))]
SCORE_COLUMNS = ["layer", "expert", "method", "value", "ci_low", "ci_high", "tokens"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(model, kw: dict):
    """``model`` as the stages take it, and the other arguments: ``layered`` (not a stage argument)
    opens it layer by layer in ``dtype``."""
    kw = dict(kw)
    if kw.pop("layered", False):
        from uspx.engine import open_source

        return open_source(model, streaming=True, dtype=kw.pop("dtype")), kw
    return model, kw


def _patch(module, name: str, make):
    """Replace ``module.name`` by ``make(original)``; returns the undo."""
    real = getattr(module, name)
    setattr(module, name, make(real))
    return lambda: setattr(module, name, real)


def _trace_job(rank: int, model: str, job: dict) -> list:
    """A trace; rank 1 dies after its first shard (``crash="shard"``) or its first saved layer
    (``crash="layer"``), or logs the layers it saves to ``job["log"]``."""
    import uspx.engine.runner as runner
    import uspx.trace.run as run_mod
    from uspx.trace import trace

    undo = []
    crash, log = job.get("crash"), job.get("log")
    if crash == "shard" and rank == 1:
        def record_then_die(real):
            def call(out_dir, r, entry):
                real(out_dir, r, entry)
                os._exit(9)  # killed right after its first shard
            return call

        undo.append(_patch(run_mod, "record_rank_shard", record_then_die))
    if (crash == "layer" or log) and rank == 1:
        def save_then_die_or_log(save):
            def call(state_dir, key, done, store, save_hidden):
                save(state_dir, key, done, store, save_hidden)
                if log:
                    with open(log, "a") as fh:
                        fh.write(f"{done}\n")
                if crash == "layer" and done == 1:
                    os._exit(9)  # killed once its first layer was saved
            return call

        undo.append(_patch(runner, "_save_state", save_then_die_or_log))
    opened, rest = _model(model, job["kw"])
    trace(opened, job["workload"], job["out"], progress=False, **rest)
    return undo


def _score_job(rank: int, model: str, job: dict) -> list:
    """Score runs from one trace; with ``log``, each process records what it ran: taylor's
    backwards (one per prompt) and reconstruction's batches."""
    import uspx.score.reconstruction as rec
    import uspx.score.taylor as tay
    from uspx.score import score

    undo = []
    if job.get("log"):
        def logged(name):
            def wrap(real):
                def call(*a, **k):
                    with open(f"{job['log']}.{rank}", "a") as fh:
                        fh.write(f"{name} {len(a[1]) if name == 'batches' else 1}\n")
                    return real(*a, **k)
                return call
            return wrap

        undo += [_patch(tay, "token_losses", logged("backward")), _patch(rec, "run", logged("batches"))]
    for i, (methods, kw) in enumerate(job["runs"]):
        opened, rest = _model(model, kw)
        score(opened, job["trace"], job["workload"], f"{job['out']}{i or ''}", methods, progress=False, **rest)
    return undo


def _extract_job(rank: int, model: str, job: dict) -> list:
    from uspx.extract import extract

    report = extract(model, job["workload"], job["out"], keep="50%", speed=False, progress=False)
    assert report["kept"]  # every rank returns rank 0's report
    return []


JOBS = {"trace": _trace_job, "score": _score_job, "extract": _extract_job}


def _worker(rank: int, world: int, port: int, model: str, jobs: list[dict]) -> None:
    """A spawned process joins the gloo group as torchrun would set it up and runs ``jobs`` in turn."""
    import torch
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for job in jobs:
            for undo in JOBS[job["kind"]](rank, model, job):
                undo()
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def _spawn(model, jobs: list[dict]) -> None:
    jobs = [{k: str(v) if k in ("workload", "out", "trace", "log") else v for k, v in j.items()} for j in jobs]
    mp.start_processes(_worker, args=(2, _free_port(), str(model), jobs), nprocs=2, start_method="spawn", join=True)


@pytest.fixture(scope="module")
def two(tiny_gpt_oss_dir, tmp_path_factory, one_thread) -> dict:
    """Every two-process run of the module (see the module's docstring), and what one process writes
    for the same traces; ``killed`` is what the killed runs had left before they were resumed."""
    from uspx.trace import trace

    d = tmp_path_factory.mktemp("dist")
    wl = write_jsonl(d / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, d / "one", progress=False, **WHOLE)
    opened, kw = _model(tiny_gpt_oss_dir, STREAMED)
    trace(opened, wl, d / "one-layered", progress=False, **kw)
    trace(tiny_gpt_oss_dir, wl, d / "t", progress=False)  # no reconstruction sums: score runs the model
    killed = {}
    for name, kw, crash in (("killed", WHOLE, "shard"), ("killed-layered", STREAMED, "layer")):
        with pytest.raises(Exception):
            _spawn(tiny_gpt_oss_dir, [dict(kind="trace", workload=wl, out=d / name, kw=kw, crash=crash)])
        stage = d / name / ".streaming" / "rank-00001-of-00002" / "state.json"
        killed[name] = dict(complete=json.loads((d / name / "manifest.json").read_text())["complete"],
                            layers_done=json.loads(stage.read_text())["layers_done"] if stage.exists() else None)
    _spawn(tiny_gpt_oss_dir, [
        dict(kind="trace", workload=wl, out=d / "two", kw=WHOLE),
        dict(kind="trace", workload=wl, out=d / "killed", kw=WHOLE),
        dict(kind="trace", workload=wl, out=d / "two-layered", kw=STREAMED),
        dict(kind="trace", workload=wl, out=d / "killed-layered", kw=STREAMED, log=d / "saved.txt"),
        dict(kind="extract", workload=wl, out=d / "extract"),
        dict(kind="score", workload=wl, trace=d / "t", out=d / "s-ablation", runs=ABLATION_RUNS),
        dict(kind="score", workload=wl, trace=d / "t", out=d / "s-taylor", runs=TAYLOR_RUNS, log=d / "ran"),
    ])
    return dict(dir=d, workload=wl, killed=killed)


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


def test_two_processes_write_the_trace_of_one(tiny_gpt_oss_dir, two, one_thread):
    from uspx.score import score

    d, wl = two["dir"], two["workload"]
    _same_folders(d / "two", d / "one")
    # and the scores read from either are the same
    a = score(tiny_gpt_oss_dir, d / "one", wl, d / "s1", ["frequency", "reconstruction"], progress=False)
    b = score(tiny_gpt_oss_dir, d / "two", wl, d / "s2", ["frequency", "reconstruction"], progress=False)
    assert a.table.select(["layer", "expert", "method", "value"]).equals(b.table.select(["layer", "expert", "method", "value"]))


def test_a_killed_rank_resumes(two):
    d = two["dir"]
    assert not two["killed"]["killed"]["complete"]
    _same_folders(d / "killed", d / "one")


def test_extract_under_two_processes_equals_one(tiny_gpt_oss_dir, two, tmp_path, one_thread):
    from uspx.extract import extract

    one = extract(tiny_gpt_oss_dir, two["workload"], tmp_path / "one", keep="50%", speed=False, progress=False)
    got = json.loads((two["dir"] / "extract" / "report.json").read_text())
    assert got["kept"] == one["kept"] and got["quality"] == one["quality"]


def test_ablations_shared_out_give_the_single_process_scores(tiny_gpt_oss_dir, two, tmp_path, one_thread):
    from uspx.score import load_scores, score

    d = two["dir"]
    (methods, kw), = ABLATION_RUNS
    one = score(tiny_gpt_oss_dir, d / "t", two["workload"], tmp_path / "s1", methods, progress=False, **kw)
    got = load_scores(d / "s-ablation")
    assert got.table.select(SCORE_COLUMNS).equals(one.table.select(SCORE_COLUMNS))
    assert got.meta["ablation_forwards"] == one.meta["ablation_forwards"]


def test_layer_by_layer_under_two_processes_writes_the_trace_of_one(two):
    from uspx.engine import make_batches
    from uspx.engine.batches import share
    from uspx.workload import encode, load_workload

    d = two["dir"]
    _same_folders(d / "two-layered", d / "one-layered")
    manifest = json.loads((d / "two-layered" / "manifest.json").read_text())
    assert manifest["options"]["streaming"] and manifest["streaming"]["first_layer"] == 0
    assert not (d / "two-layered" / ".streaming").exists()
    # the processes really shared the work: each ran whole batches of the one-process run, and
    # every token was in exactly one share
    encoded = encode(load_workload(two["workload"]), make_tokenizer(), manifest["options"]["max_length"])
    batches = make_batches(encoded, 2, 0, max_tokens=manifest["options"]["batch_tokens"])
    rows = [share(batches, r, 2)[1] for r in range(2)]
    assert len(batches) > 2 and all(len(r) for r in rows)
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(sum(len(e.input_ids) for e in encoded)))


def test_a_killed_rank_resumes_layer_by_layer(two):
    d = two["dir"]
    assert two["killed"]["killed-layered"] == dict(complete=False, layers_done=1)
    assert (d / "saved.txt").read_text().split() == ["2"]  # rank 1 ran only its second layer again
    _same_folders(d / "killed-layered", d / "one-layered")


def _ran(log, rank):
    lines = [l.split() for l in (log.parent / f"{log.name}.{rank}").read_text().splitlines()]
    return {k: sum(int(n) for name, n in lines if name == k) for k in ("backward", "batches")}


def test_taylor_and_reconstruction_shared_out_give_the_single_process_scores(tiny_gpt_oss_dir, two, tmp_path,
                                                                             one_thread):
    """taylor's prompts and reconstruction's batches (whole model, and layer by layer) are shared out
    and their per-prompt sums added. Each prompt's sums come from exactly one process and the others
    add exact zeros, so the tables are compared for equality, not within a tolerance."""
    from uspx.score import load_scores, score

    d = two["dir"]
    one = []
    for i, (m, kw) in enumerate(TAYLOR_RUNS):
        opened, rest = _model(tiny_gpt_oss_dir, kw)
        one.append(score(opened, d / "t", two["workload"], tmp_path / f"s1-{i}", m, progress=False, **rest))
    for i, want in enumerate(one):
        got = load_scores(d / f"s-taylor{i or ''}")
        assert got.table.select(SCORE_COLUMNS).equals(want.table.select(SCORE_COLUMNS)), TAYLOR_RUNS[i]
    assert (one[0].to_pandas().query("method == 'taylor'").value > 0).any()
    # the work was shared: each process ran some of the backwards and batches, none ran them twice
    ran = [_ran(d / "ran", r) for r in range(2)]
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
