"""uspx extract --update: the updated run equals what the fresh path computes on old + new items,
experts in and out from the two plans by hand, the run left as it was when the update fails, the
warm start of recovery tensor by tensor."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny, write_jsonl
from uspx.extract import extract
from uspx.io import FingerprintMismatch, UspxError
from uspx.score import load_scores, score
from uspx.trace import trace
from uspx.update import update

OLD = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code",
        "split": "heldout" if i % 5 == 0 else "calibration"} for i in range(25)]
NEW = [{"prompt": f"ls -la /tmp/dir{i} | grep", "completion": f" file{i}.sh && echo done {i}", "family": "shell",
        "split": "heldout" if i % 4 == 0 else "calibration"} for i in range(16)]


@pytest.fixture
def workloads(tmp_path):
    return write_jsonl(tmp_path / "old.jsonl", OLD), write_jsonl(tmp_path / "new.jsonl", NEW + OLD[:3])


def files_of(folder):
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_update_equals_the_fresh_path_on_old_and_new_items(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    old_wl, new_wl = workloads
    run = tmp_path / "run"
    before = extract(tiny_gpt_oss_dir, old_wl, run, keep="50%", method="reconstruction", speed=False, progress=False)
    untouched = files_of(run)
    res = update(run, new_wl, tmp_path / "up", progress=False)
    assert files_of(run) == untouched

    # the new items: the 16 of NEW (the 3 repeated OLD items are not added twice), 12 of them calibration
    assert res["new_workload"]["added"] == 16 and res["new_workload"]["already_in_run"] == 3
    whole = tmp_path / "up" / "workload.jsonl"
    lines = [json.loads(l) for l in whole.read_text().splitlines()]
    assert [l["prompt"] for l in lines] == [r["prompt"] for r in OLD + NEW]

    # the fresh path: one trace of every calibration item of old + new, scored as uspx score does
    trace(tiny_gpt_oss_dir, whole, tmp_path / "fresh", split="calibration", reconstruction=True, progress=False)
    fresh = score(tiny_gpt_oss_dir, tmp_path / "fresh", whole, tmp_path / "fresh_scores", methods=["reconstruction"],
                  progress=False).to_pandas()
    updated = load_scores(tmp_path / "up" / "scores").to_pandas()
    assert len(updated) == len(fresh) == 2 * 8
    assert (updated["tokens"].to_numpy() == fresh["tokens"].to_numpy()).all()
    assert (updated["n_prompts"] == 20 + 12).all()
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(updated[col].to_numpy(), fresh[col].to_numpy(), rtol=1e-5, atol=1e-12)
    # the concatenated trace's routing rows are the fresh trace's (frequency read from each)
    freq = [score(tiny_gpt_oss_dir, t, whole, tmp_path / f"freq{i}", methods=["frequency"], progress=False)
            .to_pandas()["value"].to_numpy() for i, t in enumerate((tmp_path / "up" / "trace", tmp_path / "fresh"))]
    np.testing.assert_allclose(freq[0], freq[1], rtol=1e-6)

    # tokens traced now: the new calibration items only, as the fresh trace counts them
    items = pq.read_table(tmp_path / "fresh" / "items.parquet").to_pandas()
    assert res["tokens_traced"]["new"] == int(items["tokens"][items["sample"] >= 20].sum())
    assert res["tokens_traced"]["total"] == int(items["tokens"].sum())

    # kept: the 4 highest fresh scores per layer; experts in and out from the two plan files by hand
    after = json.loads((tmp_path / "up" / "plan.json").read_text())["kept"]
    for layer in (0, 1):
        rows = fresh[fresh["layer"] == layer].sort_values("expert")
        assert set(after[str(layer)]) == set(np.argsort(-rows["value"].to_numpy(), kind="stable")[:4].tolist())
    old_kept = json.loads((run / "plan.json").read_text())["kept"]
    by_hand = [dict(layer=int(l), kept_in=sorted(set(after[l]) - set(old_kept[l])),
                    kept_out=sorted(set(old_kept[l]) - set(after[l])), channels_changed=[]) for l in sorted(old_kept)]
    assert res["changes"] == by_hand
    assert res["experts_swapped"] == sum(len(c["kept_in"]) for c in by_hand)
    assert res["scores"] == dict(methods={"reconstruction": "trace"}, units=["experts"])  # no model pass for scores

    # quality: each model evaluated on each set of held-out items alone, as uspx eval does
    from uspx.evaluate import evaluate

    new_only = write_jsonl(tmp_path / "new_only.jsonl", NEW)
    for when, model in (("before", run / "model"), ("after", tmp_path / "up" / "model")):
        for name, wl in (("old", old_wl), ("new", new_only)):
            ev = evaluate(tiny_gpt_oss_dir, model, wl, split="heldout", speed=False)
            got = res["quality"][name][when]
            assert got["all"]["delta"] == pytest.approx(ev["overall"]["delta"], rel=1e-6, abs=1e-9), (name, when)
            assert got["all"]["tokens"] == ev["overall"]["tokens"]
            assert set(got) == set(ev["families"]) | {"all"}
    assert res["quality"]["old"]["before"]["all"]["delta"] == pytest.approx(before["overall_delta"], abs=1e-9)
    assert json.loads((tmp_path / "up" / "update.json").read_text()) == json.loads(json.dumps(res))


def test_a_failed_update_leaves_the_run_and_resumes(tmp_path, tiny_gpt_oss_dir, workloads, one_thread, monkeypatch):
    import importlib

    export_mod = importlib.import_module("uspx.prune.export")  # the module: uspx.prune.export is also the function
    old_wl, new_wl = workloads
    run = tmp_path / "run"
    extract(tiny_gpt_oss_dir, old_wl, run, keep="50%", method="reconstruction", speed=False, progress=False)
    untouched = files_of(run)

    def fails(verification, tolerance):
        raise UspxError("the reloaded export differs from the restricted model")

    monkeypatch.setattr(export_mod, "_require", fails)
    with pytest.raises(UspxError, match="reloaded export differs"):
        update(run, new_wl, tmp_path / "up", progress=False)
    assert files_of(run) == untouched
    assert not (tmp_path / "up" / "update.json").exists() and not (tmp_path / "up" / "model").exists()
    traced = (tmp_path / "up" / "new-trace" / "manifest.json").stat().st_mtime_ns

    monkeypatch.undo()
    res = update(run, new_wl, tmp_path / "up", progress=False)
    assert (tmp_path / "up" / "new-trace" / "manifest.json").stat().st_mtime_ns == traced  # not traced again
    assert res["verdict"] in ("pass", "fail") and (tmp_path / "up" / "update.json").exists()
    assert files_of(run) == untouched


def test_update_refuses_another_model_and_a_clashing_id(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    old_wl, new_wl = workloads
    run = tmp_path / "run"
    extract(tiny_gpt_oss_dir, old_wl, run, keep="50%", method="frequency", speed=False, progress=False)
    other = save_tiny("gpt_oss", tmp_path / "other", seed=1)
    with pytest.raises(FingerprintMismatch, match="not the model"):
        update(run, new_wl, tmp_path / "up", model=other, progress=False)
    clash = write_jsonl(tmp_path / "clash.jsonl", [{**OLD[0], "id": "a"}, {**NEW[0], "id": "b"}])
    old_ids = write_jsonl(tmp_path / "old_ids.jsonl", [{**r, "id": f"x{i}"} for i, r in enumerate(OLD)])
    extract(tiny_gpt_oss_dir, old_ids, tmp_path / "run2", keep="50%", method="frequency", speed=False, progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**NEW[1], "id": "x1"}])
    with pytest.raises(UspxError, match="'x1' is also in"):
        update(tmp_path / "run2", bad, tmp_path / "up2", progress=False)
    with pytest.raises(UspxError, match="not a finished"):
        update(tmp_path / "nothing", clash, tmp_path / "up3", progress=False)


def test_recovery_starts_from_the_run_s_recovered_weights(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    from uspx.recover import Settings, recover

    old_wl, new_wl = workloads
    run = tmp_path / "run"
    extract(tiny_gpt_oss_dir, old_wl, run, keep="50%", method="reconstruction", speed=False, progress=False)
    recover(run, settings=Settings(steps=2, batch_size=4, eval_every=1, generated=0, lr=1e-2), others=old_wl,
            progress=False)
    res = update(run, new_wl, tmp_path / "up", recover_steps=1, progress=False)
    assert res["recovery"] is not None and (tmp_path / "up" / "recover" / "model" / "config.json").exists()

    start = load_file(str(tmp_path / "up" / "recover" / "start" / "model.safetensors"))
    old = load_file(str(run / "recover" / "model" / "model.safetensors"))
    original = load_file(str(tiny_gpt_oss_dir / "model.safetensors"))
    old_kept = {int(l): v for l, v in json.loads((run / "plan.json").read_text())["kept"].items()}
    new_kept = {int(l): v for l, v in json.loads((tmp_path / "up" / "plan.json").read_text())["kept"].items()}
    expert_names = 0
    for name, value in start.items():
        if ".mlp.experts." in name or ".mlp.router." in name:
            layer = int(name.split(".")[2])
            for j, e in enumerate(new_kept[layer]):  # slot j of the export holds expert e
                want = old[name][old_kept[layer].index(e)] if e in old_kept[layer] else original[name][e]
                assert torch.equal(value[j], want), (name, e)
            expert_names += 1
        else:  # attention, norms, embeddings: the recovered ones
            assert torch.equal(value, old[name]), name
    assert expert_names == 2 * 6  # per layer: gate_up, its bias, down, its bias, router weight and bias
    swapped = sum(len(set(new_kept[l]) - set(old_kept[l])) for l in new_kept)
    assert res["recovery"]["warm_start"]["original_slots"] == swapped * 6
    # the recovered model's quality on the new held-out items, as uspx eval measures it
    from uspx.evaluate import evaluate
    from uspx.workload import load_workload

    max_length = json.loads((run / "trace" / "manifest.json").read_text())["options"]["max_length"]
    ev = evaluate(tiny_gpt_oss_dir, tmp_path / "up" / "recover" / "model", tmp_path / "up" / "workload.jsonl",
                  split="heldout", max_length=max_length, speed=False)
    new_ids = {i.id for i in load_workload(new_wl).part("heldout").items if i.family == "shell"}
    rows = [r for r in ev["items"] if r["id"] in new_ids and r["tokens"]]
    want = sum(r["tokens"] * (r["loss_candidate"] - r["loss_teacher"]) for r in rows) / sum(r["tokens"] for r in rows)
    assert res["quality"]["new"]["after"]["all"]["delta"] == pytest.approx(want, abs=1e-9)


def test_the_command_updates_and_keeps_the_run_s_settings(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    from typer.testing import CliRunner

    from uspx.cli import app

    old_wl, new_wl = workloads
    run = tmp_path / "run"
    extract(tiny_gpt_oss_dir, old_wl, run, keep="50%", method="frequency", speed=False, progress=False)
    refused = CliRunner().invoke(app, ["extract", "--update", str(run), str(new_wl), "--keep", "25%"])
    assert isinstance(refused.exception, UspxError) and "drop --keep" in str(refused.exception)
    done = CliRunner().invoke(app, ["extract", "--update", str(run), str(new_wl)])
    assert done.exit_code == 0, done.output
    res = json.loads((tmp_path / "run-new" / "update.json").read_text())  # the default folder beside the run
    assert res["run"] == str(run) and res["new_workload"]["added"] == 16
    report = json.loads((tmp_path / "run-new" / "report.json").read_text())
    assert report["method"] == "frequency" and report["keep"] == "50%" and set(report["counts"].values()) == {4}


def test_a_joint_cut_reports_the_channels_and_heads_that_changed(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    old_wl, new_wl = workloads
    run = tmp_path / "run"
    before = extract(tiny_gpt_oss_dir, old_wl, run, budget="120KiB", context=64, speed=False, progress=False)
    assert before["units"] != ["experts"] and before["shape"]["width"] < before["shape"]["original_width"]
    res = update(run, new_wl, tmp_path / "up", progress=False)
    a, b = (json.loads((d / "plan.json").read_text()) for d in (run, tmp_path / "up"))
    assert json.loads((tmp_path / "up" / "report.json").read_text())["units"] == before["units"]
    for change in res["changes"]:
        l = str(change["layer"])
        old = dict(zip(a["kept"][l], a["channels"]["kept"][l]))
        new = dict(zip(b["kept"][l], b["channels"]["kept"][l]))
        assert change["channels_changed"] == sorted(e for e in set(old) & set(new) if old[e] != new[e])
        assert change["kept_in"] == sorted(set(new) - set(old))
    assert res["channels_changed"] == sum(len(c["channels_changed"]) for c in res["changes"]) > 0  # the shell items move channels
    heads = [int(l) for l in a["heads"]["kept"] if a["heads"]["kept"][l] != b["heads"]["kept"][l]] if a.get("heads") else []
    assert res["heads_changed"] == sorted(heads)


def test_an_updated_run_updates_again(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    old_wl, new_wl = workloads
    third = write_jsonl(tmp_path / "third.jsonl", [{"text": f"Dear reader, chapter {i} begins here.", "family": "prose",
                                                   "split": "heldout" if i % 3 == 0 else "calibration"} for i in range(9)])
    extract(tiny_gpt_oss_dir, old_wl, tmp_path / "run", keep="50%", method="frequency", speed=False, progress=False)
    first = update(tmp_path / "run", new_wl, tmp_path / "up", progress=False)
    second = update(tmp_path / "up", third, tmp_path / "up2", progress=False)
    assert second["tokens_traced"]["previous"] == first["tokens_traced"]["total"]
    items = pq.read_table(tmp_path / "up2" / "trace" / "items.parquet").to_pandas()
    assert items["sample"].tolist() == list(range(20 + 12 + 6))
    assert second["tokens_traced"]["total"] == int(items["tokens"].sum())
    assert set(second["quality"]["new"]["after"]) == {"prose", "all"}
    assert set(second["quality"]["old"]["after"]) == {"code", "shell", "all"}


def test_a_layer_by_layer_run_updates_layer_by_layer(tmp_path, tiny_gpt_oss_dir, workloads, one_thread):
    from uspx.engine import open_source

    old_wl, new_wl = workloads
    plans = []
    for name, streaming in (("whole", False), ("layered", True)):
        extract(open_source(tiny_gpt_oss_dir, streaming=streaming), old_wl, tmp_path / name, keep="50%",
                method="reconstruction", speed=False, progress=False)
        update(tmp_path / name, new_wl, tmp_path / f"{name}-up", progress=False)
        plans.append(json.loads((tmp_path / f"{name}-up" / "plan.json").read_text())["kept"])
    assert json.loads((tmp_path / "layered-up" / "new-trace" / "manifest.json").read_text())["options"]["streaming"]
    assert plans[0] == plans[1]


def test_a_capability_run_keeps_its_tool_families(tmp_path, tiny_gpt_oss_dir, one_thread):
    old = write_jsonl(tmp_path / "old.jsonl", OLD + [dict(r, family="shell") for r in NEW[:8]])
    new = write_jsonl(tmp_path / "new.jsonl", NEW[8:])
    extract(tiny_gpt_oss_dir, old, tmp_path / "run", keep="50%", method="capability", tool_families=["shell"],
            speed=False, progress=False)
    update(tmp_path / "run", new, tmp_path / "up", progress=False)
    meta = json.loads((tmp_path / "up" / "scores" / "scores.json").read_text())
    assert meta["options"]["capability"]["tool_families"] == ["shell"]


def test_update_keeps_the_runs_task_checks(tmp_path, tiny_gpt_oss_dir, one_thread):
    """A run judged on checked items with a pass-drop limit is updated under the same options."""
    checked = [dict(r, regex="(?s).*", max_new_tokens=2) if r["split"] == "heldout" else r for r in OLD]
    old_wl, new_wl = write_jsonl(tmp_path / "old.jsonl", checked), write_jsonl(tmp_path / "new.jsonl", NEW[:8])
    tasks = dict(samples=2, temperature=0.7, seed=3, max_new_tokens=4, max_pass_drop=0.25)
    extract(tiny_gpt_oss_dir, old_wl, tmp_path / "run", keep="50%", method="frequency", speed=False, progress=False,
            tasks=tasks)
    update(tmp_path / "run", new_wl, tmp_path / "up", progress=False)
    report = json.loads((tmp_path / "up" / "report.json").read_text())
    settings = report["tasks"]["settings"]
    assert (settings["samples"], settings["temperature"], settings["seed"], settings["max_new_tokens"]) == (2, 0.7, 3, 4)
    drops = [c for c in report["acceptance"]["checks"] if c["rule"] == "pass_drop"]
    assert [(c["family"], c["threshold"]) for c in drops] == [("code", 0.25)]
    # every answer matches "(?s).*", so neither model loses an item: the rule passes
    assert all(c["ok"] and c["value"] == 0 for c in drops)


def test_changes_and_heads_of_two_plans_by_hand():
    """Experts in and out, channels moved inside experts kept by both, and heads changed, on two
    plans written out by hand."""
    from uspx.update import changes, heads_changed

    before = {"kept": {"0": [1, 2, 3], "1": [0, 1]},
              "channels": {"kept": {"0": [[0, 1], [2, 3], [4, 5]], "1": [[0, 1], [1, 2]]}},
              "heads": {"kept": {"0": [0, 2], "1": [1, 3]}}}
    after = {"kept": {"0": [2, 3, 4], "1": [0, 1]},
             "channels": {"kept": {"0": [[2, 3], [4, 6], [0, 1]], "1": [[0, 1], [1, 2]]}},
             "heads": {"kept": {"0": [0, 2], "1": [1, 2]}}}
    got = {c.layer: (c.kept_in, c.kept_out, c.channels_changed) for c in changes(before, after)}
    # layer 0: expert 4 in, 1 out; 2 keeps [2, 3]; 3 moves from [4, 5] to [4, 6]
    assert got == {0: ([4], [1], [3]), 1: ([], [], [])}
    assert heads_changed(before, after) == [1] and heads_changed(before, before) == []
    assert heads_changed({"kept": {}}, after) == [0, 1]  # against a plan keeping every head: each layer cut
    with pytest.raises(UspxError, match="different layers"):
        changes(before, {"kept": {"0": [1, 2, 3]}})
