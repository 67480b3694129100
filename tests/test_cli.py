"""The CLI only wraps the API: check each stage command runs and chains through its files."""

import json

from typer.testing import CliRunner

from conftest import write_jsonl
from uspx.cli import app

ROWS = [{"prompt": f"x = {i} +", "completion": f" {i} * 2", "family": "code"} for i in range(20)]


def run(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_stage_commands_chain(tmp_path, tiny_gpt_oss_dir):
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    run("trace", tiny_gpt_oss_dir, wl, "-o", tmp_path / "t", "--split", "calibration", "--norms")
    run("score", tiny_gpt_oss_dir, tmp_path / "t", wl, "-o", tmp_path / "s", "--methods", "frequency,reap")
    run("select", tmp_path / "s", "--model", tiny_gpt_oss_dir, "--method", "reap", "--keep", "50%", "-o", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert all(len(v) == 4 for v in plan["kept"].values())
    run("prune", tiny_gpt_oss_dir, tmp_path / "plan.json", "-o", tmp_path / "m")
    out = run("eval", tmp_path / "m", wl, "--teacher", tiny_gpt_oss_dir, "-o", tmp_path / "e", "--no-speed")
    assert "verdict" in out
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["families"]["code"]["items"] > 0


def test_plan_budget_and_errors(tmp_path, tiny_gpt_oss_dir):
    out = run("plan", tiny_gpt_oss_dir, "--budget", "1GiB", "--context", "64", "-o", tmp_path / "p.json")
    assert "8 of 8 experts per layer fit" in out.replace("\n", " ")
    res = CliRunner().invoke(app, ["plan", str(tiny_gpt_oss_dir), "--budget", "1KiB"])
    assert res.exit_code == 1 and "smallest budget" in res.output.replace("\n", " ")
    res = CliRunner().invoke(app, ["families"])
    assert res.exit_code == 0 and all(f in res.output for f in ("gpt_oss", "mixtral", "dbrx", "jamba"))


def test_units_chain_through_score_select_and_prune(tmp_path, tiny_gpt_oss_dir):
    """score --units, select --units under a byte budget, prune: the export has the plan's shape."""
    from uspx.plan import memory as mem

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    run("trace", tiny_gpt_oss_dir, wl, "-o", tmp_path / "t", "--split", "calibration")
    run("score", tiny_gpt_oss_dir, tmp_path / "t", wl, "-o", tmp_path / "s", "--methods", "reconstruction",
        "--units", "experts,channels,heads", "--unit-methods", "reconstruction,activation", "--bootstrap", "10")
    assert (tmp_path / "s" / "units.parquet").exists()
    full = mem.estimate(mem.count_params(tiny_gpt_oss_dir), "fp32", context=0).weights_bytes
    out = run("select", tmp_path / "s", "--model", tiny_gpt_oss_dir, "--units", "experts,channels,heads",
              "--budget", str(int(full * 0.7)), "--context", "0", "--channel-step", "4", "-o", tmp_path / "plan.json")
    assert "expert width" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted_bytes"] <= int(full * 0.7) and plan["settings"]["units"] == ["experts", "channels", "heads"]
    run("prune", tiny_gpt_oss_dir, tmp_path / "plan.json", "-o", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    shape = plan["settings"]["shape"]
    assert (cfg["num_local_experts"], cfg["intermediate_size"], cfg["num_key_value_heads"]) == (
        shape["experts"], shape["width"], shape["kv_groups"])
    res = CliRunner().invoke(app, ["select", str(tmp_path / "s"), "--model", str(tiny_gpt_oss_dir), "--units",
                                   "experts,heads", "--keep", "50%", "-o", str(tmp_path / "p2.json")])
    assert res.exit_code != 0 and "--budget" in res.output + str(res.exception)  # main() prints a UspxError
