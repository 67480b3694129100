"""``tests`` checks run generated code only in the sandbox: a right completion passes, a wrong one
fails, and one that tries to escape or never ends fails without touching the host."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from conftest import require_sandbox
from uspx.evaluate.checks import judge
from uspx.workload import Checks, WorkloadItem


require_sandbox()


def runner(code: str):
    from uspx.virtual.sandbox import SandboxLimits, run_python

    return run_python(code, SandboxLimits(cpu_seconds=1, wall_seconds=2.0))


PROMPT = 'def add(a, b):\n    """Return a + b."""\n    return'
ITEM = WorkloadItem("add", "python", "heldout", PROMPT,
                    checks=Checks(tests="assert add(2, 3) == 5\nassert add(-1, 1) == 0", stop=("\ndef ",)))


def test_a_right_completion_passes_and_a_wrong_one_fails():
    assert judge(ITEM, " a + b\n\ndef other():\n    pass", runner).passed  # cut at the stop string
    wrong = judge(ITEM, " a - b", runner)
    assert not wrong.passed and "AssertionError" in wrong.failed[0]
    broken = judge(ITEM, " a +", runner)
    assert not broken.passed and "SyntaxError" in broken.failed[0]


def test_a_completion_that_tries_to_escape_fails_and_leaves_the_host_alone():
    folder = Path(tempfile.mkdtemp(prefix="uspx-check-"))
    folder.chmod(0o777)
    target = folder / "escaped"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        attack = (f" a + b\nopen({str(target)!r}, 'w').write('x')\n"
                  f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        out = judge(ITEM, attack, runner)
        assert not out.passed
        assert not target.exists()
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing from the sandbox reached the host's loopback
        reach = judge(ITEM, f" a + b\nimport socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                      runner)
        assert not reach.passed
    finally:
        listener.close()
        target.unlink(missing_ok=True)
        folder.rmdir()


def test_a_completion_that_never_ends_is_stopped_and_fails():
    out = judge(ITEM, " a + b\nwhile True:\n    pass\n", runner)
    assert not out.passed and "limit" in out.failed[0]  # CPU or wall time, whichever comes first


def test_every_check_kind_evaluates_end_to_end_in_the_cli(tiny_gpt_oss_dir, tmp_path, one_thread):
    import json

    from typer.testing import CliRunner

    from conftest import write_jsonl
    from uspx.cli import app

    rows = [{"id": "a", "family": "f", "split": "heldout", "prompt": "1 + 1 =", "answer": "2", "max_new_tokens": 4},
            {"id": "r", "family": "f", "split": "heldout", "prompt": "x", "regex": "(?s).*", "max_new_tokens": 4},
            {"id": "j", "family": "g", "split": "heldout", "prompt": "y", "json": True, "max_new_tokens": 4},
            {"id": "t", "family": "g", "split": "heldout", "prompt": "def f():\n    return", "tests": "assert True",
             "max_new_tokens": 4}]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    res = CliRunner().invoke(app, ["eval", str(tiny_gpt_oss_dir), str(wl), "--teacher", str(tiny_gpt_oss_dir),
                                   "-o", str(tmp_path / "e"), "--no-speed", "--max-pass-drop", "0"])
    assert res.exit_code == 0, res.output
    assert "task success on 4 checked items (greedy" in res.output and "verdict: pass" in res.output
    ev = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert ev["tasks"]["overall"]["checks"] == {"answer": 1, "regex": 1, "json": 1, "tests": 1}
    assert ev["tasks"]["families"]["f"]["teacher"]["format_valid"] == 1.0  # "(?s).*" matches any text
    items = [json.loads(x) for x in (tmp_path / "e" / "evaluation.items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in items] == ["a", "r", "j", "t"] and items[1]["teacher"]["passed"] == [True]


def test_an_update_with_new_tests_checks_measures_quality_on_losses(tiny_gpt_oss_dir, tmp_path, one_thread):
    """`uspx extract --update` with new held-out items that carry `tests` checks: the update's own
    evaluation answers them in the sandbox, and the before/after quality (losses only) covers them."""
    import json

    from conftest import write_jsonl
    from uspx.extract import extract
    from uspx.update import update

    old = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i}", "family": "code",
            "split": "heldout" if i % 5 == 0 else "calibration"} for i in range(20)]
    new = [{"prompt": f"def g{i}():\n    return", "completion": f" {i}", "family": "tested",
            "split": "heldout" if i % 4 == 0 else "calibration"} for i in range(12)]
    new = [dict(r, tests="assert True", max_new_tokens=2) if r["split"] == "heldout" else r for r in new]
    extract(tiny_gpt_oss_dir, write_jsonl(tmp_path / "old.jsonl", old), tmp_path / "run", keep="50%",
            method="frequency", speed=False, progress=False)
    result = update(tmp_path / "run", write_jsonl(tmp_path / "new.jsonl", new), tmp_path / "up", progress=False)
    assert json.loads((tmp_path / "up" / "update.json").read_text()) == json.loads(json.dumps(result))
    report = json.loads((tmp_path / "up" / "report.json").read_text())
    assert report["tasks"]["overall"]["checks"] == {"tests": 3}  # answered, in the sandbox
    new_quality = result["quality"]["new"]
    assert new_quality["before"]["tested"]["items"] == new_quality["after"]["tested"]["items"] == 3
