"""``uspx extract --update RUN_DIR NEW_WORKLOAD``: an ``uspx extract`` run brought up to date with
the user's new prompts, tracing only those.

    OUT/workload.jsonl   the run's workload followed by the new items not already in it
    OUT/new-trace/       the new calibration items traced on the run's model (resumable)
    OUT/trace/           the run's trace and the new one as one trace (uspx.trace.concat)
    OUT/scores, plan.json, model/, evaluation.json, report.json
                         uspx extract on the whole workload, from that trace
    OUT/recover/         when the run recovered: recovery warm-started from its recovered weights
    OUT/update.json      what changed (experts in and out per layer), quality before and after on
                         the old and the new held-out items, and what the update cost

What is a sum over tokens is not computed again: the old items' routing and reconstruction sums
are the run's trace, and ``uspx score`` reads frequency, REAP, EAN and reconstruction from the
concatenated trace without a model pass. What needs the model (channel and head scores of a joint
cut, ablations, taylor) is computed over every calibration item.

The run itself is only read, and the update is written to another folder: a failure anywhere
(the export's verification included) leaves the run as it was and the new folder without
``update.json``, which is written last; running the same command again resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from uspx.io import FingerprintMismatch, UspxError, read_json, write_json, write_text
from uspx.progress import Clock, console
from uspx.workload import Workload, WorkloadItem, load_workload

if TYPE_CHECKING:
    from uspx.engine import Opened

FILENAME = "update.json"
FORMAT = "uspx-update/1"


@dataclass
class Previous:
    """What the update needs of a finished ``uspx extract`` run."""

    path: Path
    report: dict
    plan: dict
    trace: dict  # the calibration trace's manifest
    scores: dict  # the score table's scores.json
    recovered: Path | None  # the recovered model, when the run recovered
    recover_settings: dict | None

    @property
    def judged(self) -> Path:
        """The model the run's verdict is about."""
        return self.recovered if self.recovered is not None else self.path / "model"


@dataclass
class LayerChange:
    """Experts of one MoE layer that the update took in and left out, and (a joint cut) the experts
    kept by both whose kept channels differ."""

    layer: int
    kept_in: list[int]  # kept now, dropped before
    kept_out: list[int]  # kept before, dropped now
    channels_changed: list[int] = field(default_factory=list)


def read_previous(run_dir: str | Path) -> Previous:
    """The finished run in ``run_dir`` (its report, plan and trace), or an error naming what is missing."""
    run = Path(run_dir)
    for need in ("report.json", "plan.json", "trace/manifest.json", "model/config.json", "scores/scores.json"):
        if not (run / need).exists():
            raise UspxError(f"{run}: not a finished `uspx extract` run ({need} is missing)")
    report = read_json(run / "report.json")
    if (report.get("evaluated_on") or {}).get("split", "heldout") != "heldout":
        raise UspxError(f"{run}: evaluated on another workload (--eval-workload); an update judges on held-out items")
    recovered, settings = None, None
    if (run / "recover" / "recover.json").exists() and (run / "recover" / "model" / "config.json").exists():
        recovered, settings = run / "recover" / "model", read_json(run / "recover" / "recover.json")["settings"]
    return Previous(run, report, read_json(run / "plan.json"), read_json(run / "trace" / "manifest.json"),
                    read_json(run / "scores" / "scores.json"), recovered, settings)


def combine(old: Workload, new: Workload) -> tuple[list[WorkloadItem], int]:
    """The new items not already in ``old`` (same id and content), and how many were; a new item
    with an old item's id but other content is an error naming it."""
    by_id = {i.id: i for i in old.items}
    added, repeated = [], 0
    for item in new.items:
        seen = by_id.get(item.id)
        if seen is None:
            added.append(item)
        elif asdict(seen) == asdict(item):
            repeated += 1
        else:
            raise UspxError(f"{new.source}: item id {item.id!r} is also in {old.source} with other content; "
                            "give it another id")
    return added, repeated


def write_workload(items: list[WorkloadItem], path: Path) -> Workload:
    """``items`` as a JSONL workload (ids, families and splits written out, so that reading it gives
    the same items and fingerprint), read back."""
    lines = []
    for i in items:
        obj: dict = {"id": i.id, "family": i.family, "split": i.split}
        obj.update({"messages": i.messages} if i.messages is not None else {"prompt": i.prompt})
        if i.completion is not None:
            obj["completion"] = i.completion
        if i.checks is not None:  # the checks set, each in its JSONL form (unset: None, False or no stop)
            c = asdict(i.checks)
            obj.update({k: c[k] for k in ("answer", "regex", "tests", "max_new_tokens", "json", "stop")
                        if c[k] not in (None, False, ())})
        lines.append(json.dumps(obj, ensure_ascii=False))
    write_text(path, "\n".join(lines) + "\n")
    wl = load_workload(path)
    if [asdict(i) for i in wl.items] != [asdict(i) for i in items]:
        raise UspxError(f"{path}: the workload written does not read back as the items given")
    return wl


def changes(before: dict, after: dict) -> list[LayerChange]:
    """Per MoE layer of two plans (as saved), the experts kept now and not before, kept before and
    not now, and kept by both with other channels."""
    old, new = _kept(before), _kept(after)
    if sorted(old) != sorted(new):
        raise UspxError(f"the plans cut different layers ({sorted(old)} and {sorted(new)})")
    old_ch, new_ch = _channels(before), _channels(after)
    return [LayerChange(l, sorted(set(new[l]) - set(old[l])), sorted(set(old[l]) - set(new[l])),
                        sorted(e for e in set(old[l]) & set(new[l]) if old_ch.get((l, e)) != new_ch.get((l, e))))
            for l in sorted(old)]


def heads_changed(before: dict, after: dict) -> list[int]:
    """Decoder layers whose kept query heads differ between two plans (as saved)."""
    old, new = (((p.get("heads") or {}).get("kept")) or {} for p in (before, after))
    return sorted(int(l) for l in set(old) | set(new) if old.get(l) != new.get(l))


def _kept(plan: dict) -> dict[int, list[int]]:
    return {int(l): sorted(int(e) for e in v) for l, v in plan["kept"].items()}


def _channels(plan: dict) -> dict[tuple[int, int], list[int]]:
    """(layer, expert) -> its kept channels (empty when the plan keeps experts whole)."""
    kept = ((plan.get("channels") or {}).get("kept")) or {}
    return {(int(l), int(e)): list(c) for l, lists in kept.items() for e, c in zip(plan["kept"][l], lists)}


def default_out(run_dir: str | Path, new_workload: str | Path) -> Path:
    """``RUN_DIR-NAME`` beside the run, NAME the new workload's file or folder name."""
    run = Path(run_dir)
    return run.parent / f"{run.name}-{Path(str(new_workload)).stem}"


def update(run_dir: str | Path, new_workload: str | Path | Workload, out_dir: str | Path | None = None, *,
           model: str | Path | Opened | None = None, recover_steps: int | None = None, dtype: str = "auto",
           progress: bool = True) -> dict:
    """Update the finished ``uspx extract`` run in ``run_dir`` with the items of ``new_workload``
    into ``out_dir`` (default :func:`default_out`); returns (and writes) ``update.json``.

    The run's own settings decide everything: its model (``model`` only says where it is now; its
    fingerprint must be the run's), score method, budget or kept count, context, units, truncation
    and batches. When the run recovered, the update recovers too, starting from the run's recovered
    weights (``recover_steps`` caps the training; default: the run's own settings).
    """
    from uspx.dist import current
    from uspx.extract import extract

    if current().active:  # the steps around extract's (concatenation, warm start) are one process's
        raise UspxError("run `uspx extract --update` in one process, not under torchrun")
    clock = Clock()
    prev = read_previous(run_dir)
    out = _out_folder(prev, new_workload, out_dir)
    if (out / FILENAME).exists():
        console.print(f"{out} already holds this update")
        return read_json(out / FILENAME)
    old_wl, new_wl = _old_workload(prev), load_workload(new_workload)
    added, repeated = combine(old_wl, new_wl)
    added_wl = Workload(new_wl.source, added, new_wl.summary, new_wl.heldout_fraction)
    if not added_wl.part("calibration").items:
        raise UspxError(f"{new_wl.source}: no new calibration items ({repeated} already in the run)")
    opened = _open(prev, model, dtype)  # once the workloads are known to hold new work
    out.mkdir(parents=True, exist_ok=True)
    whole = write_workload(old_wl.items + added, out.resolve() / "workload.jsonl")  # the report names it
    tokens = _trace_new(opened, prev, whole, added_wl, out, progress)
    clock.done("trace new items")
    report = extract(opened, whole, out, **_extract_options(prev), dtype=dtype, progress=progress)
    clock.done("score + select + export + evaluate")
    warm = None
    if prev.recovered is not None:
        warm = _recover(prev, opened, whole, out, report, recover_steps, dtype, progress)
        clock.done("recover")
    quality = _quality(opened, prev, out, bool(report.get("recovered")), whole, old_wl, added_wl, dtype)
    clock.done("quality before and after")
    result = _result(prev, out, new_wl, added_wl, repeated, tokens, report, warm, quality,
                     dict(clock.seconds, total=clock.total))
    write_json(out / FILENAME, result)
    print_update(result)
    return result


def _out_folder(prev: Previous, new_workload: str | Path | Workload, out_dir: str | Path | None) -> Path:
    source = new_workload.source if isinstance(new_workload, Workload) else str(new_workload)
    out = Path(out_dir) if out_dir is not None else default_out(prev.path, source)
    if out.resolve() == prev.path.resolve():
        raise UspxError(f"{out}: the update goes to another folder than the run it updates")
    return out


def _open(prev: Previous, model: str | Path | Opened | None, dtype: str) -> Opened:
    """The run's original model (where ``model`` says, else where the report names it), opened as
    the run opened it; another model is an error."""
    from uspx.engine import open_source

    opened = open_source(model if model is not None else prev.report["model"]["source"], dtype=dtype,
                         streaming=bool(prev.report.get("streaming")))
    if opened.fingerprint != prev.report["model"]["fingerprint"]:
        raise FingerprintMismatch(f"{opened.path} is not the model {prev.path} was extracted from")
    return opened


def _old_workload(prev: Previous) -> Workload:
    wl = load_workload(prev.report["workload"]["source"])
    if wl.fingerprint != prev.report["workload"]["fingerprint"]:
        raise FingerprintMismatch(f"{wl.source} changed since {prev.path} was extracted for it")
    return wl


def _trace_new(opened: Opened, prev: Previous, whole: Workload, added: Workload, out: Path, progress: bool) -> dict:
    """The new calibration items traced as the run's trace was (``out/new-trace``), then the run's
    trace and that one as the trace of every calibration item of ``whole`` (``out/trace``);
    returns the tokens traced now and in all."""
    from uspx.trace import trace
    from uspx.trace.concat import concatenate

    o = prev.trace["options"]
    if o.get("split") != "calibration":
        raise UspxError(f"{prev.path / 'trace'}: traces split {o.get('split')!r}, not the calibration items")
    streamed = {k: o[k] for k in ("batch_tokens",) if k in o}
    manifest = trace(opened, added, out / "new-trace", split="calibration", batch_size=o["batch_size"],
                     max_length=o["max_length"], logits=o["logits"], norms=o["norms"],
                     reconstruction=bool(o.get("reconstruction")), items_per_shard=o["items_per_shard"],
                     progress=progress, **streamed)
    whole_trace = concatenate([prev.path / "trace", out / "new-trace"], whole.part("calibration"), out / "trace")
    return dict(new=manifest["summary"]["tokens"], previous=prev.trace["summary"]["tokens"],
                total=whole_trace["summary"]["tokens"])


def _extract_options(prev: Previous) -> dict:
    """:func:`uspx.extract.extract`'s arguments that reproduce the run's settings."""
    from uspx.extract import run_epsilon

    r, p, o = prev.report, prev.plan, prev.trace["options"]
    scored = prev.scores.get("options") or {}
    solver = p["solver"]["name"] if not p.get("uniform", True) else "lagrangian"
    return dict(budget=r.get("budget"), keep=r.get("keep"), context=r["context"],
                kv_dtype=(p.get("settings") or {}).get("kv_dtype", "bf16"), method=r["method"],
                uniform=p.get("uniform", True), solver=solver, epsilon=run_epsilon(r),
                batch_size=o["batch_size"], max_length=o["max_length"], speed=r.get("speed") is not None,
                sequential=scored.get("sequential") is not None, units=r.get("units", ["experts"]),
                compare="whole_experts" in r, tool_families=(scored.get("capability") or {}).get("tool_families"),
                tasks=_task_options(r))


def _task_options(report: dict) -> dict:
    """The run's task-check options, read back from its report: how checked items were answered and
    the largest pass@1 drop per family (a family the run had no limit for gets the strictest)."""
    settings = (report.get("tasks") or {}).get("settings")
    if not settings:
        return {}
    drops = {c["family"]: c["threshold"] for c in (report.get("acceptance") or {}).get("checks", [])
             if c.get("rule") == "pass_drop"}
    limits = set(drops.values())
    max_pass_drop = {**drops, "*": min(limits)} if len(limits) > 1 else (limits.pop() if limits else None)
    return dict(samples=settings["samples"], temperature=settings["temperature"], pass_k=settings["pass_k"],
                max_new_tokens=settings["max_new_tokens"], seed=settings["seed"], max_pass_drop=max_pass_drop)


def _recover(prev: Previous, opened: Opened, whole: Workload, out: Path, report: dict, steps: int | None,
             dtype: str, progress: bool) -> dict:
    """Recovery of the new pruned model, started from the run's recovered weights where the two
    plans keep the same units; returns what the warm start took over."""
    from uspx.extract import recover_run, run_epsilon
    from uspx.recover import Settings

    settings = Settings(**{**prev.recover_settings, **({} if steps is None else {"steps": steps})})
    start, taken = warm_start(opened, prev, out)
    recover_run(report, out, whole, opened, settings=settings, start=start, max_length=prev.trace["options"]["max_length"],
                epsilon=run_epsilon(prev.report), dtype=dtype, progress=progress)
    return taken


def warm_start(opened: Opened, prev: Previous, out: Path) -> tuple[Path | None, dict]:
    """``out/recover/start``: the new pruned checkpoint with every stored tensor, or expert slot of
    one, that both plans keep alike taken from the run's recovered model; (None, why) when the
    checkpoints cannot be matched tensor by tensor."""
    import torch

    from uspx.engine.checkpoint import Checkpoint, write_replacing
    from uspx.engine.source import FromCheckpoint
    from uspx.prune.export import RECORD

    src = FromCheckpoint(Path(opened.path), torch.float32)  # the skeleton only
    old_layout, new_layout = _layout(src, prev.path / "plan.json"), _layout(src, out / "plan.json")
    if old_layout is None or new_layout is None:
        return None, dict(reason=f"{src.adapter.family}: narrower experts are cut in memory, not tensor by tensor")
    old_ckpt, new_ckpt = Checkpoint(prev.recovered), Checkpoint(out / "model")
    replace, counts = {}, dict(tensors=0, expert_slots=0, original_slots=0)
    for name, (new_slice, old_slice) in _pairs(new_layout, old_layout).items():
        value = _matched(new_slice, old_slice, new_ckpt, old_ckpt, counts)
        if value is not None:
            replace[name] = value
    start = out / "recover" / "start"
    if (start / "config.json").exists():
        import shutil

        shutil.rmtree(start)  # written again: the plan it matched may have changed since
    write_replacing(out / "model", start, replace, skip_files=(RECORD,))
    return start, counts


def _layout(src, plan_path: Path):
    """Stored tensor name -> its slice in the checkpoint exported from ``plan_path`` (None when the
    family cuts that plan in memory)."""
    from uspx.plan import load_plan
    from uspx.prune.export import export_layout

    plan = load_plan(plan_path)
    joint = bool(plan.channels or plan.heads)
    if joint and not src.adapter.cuts_on_disk:
        return None
    layout = export_layout(src, plan.kept_set(), plan if joint else None)  # as the export wrote it
    return {s.name: s for slices in layout.files.values() for s in slices}


def _pairs(new: dict, old: dict) -> dict:
    """New stored name -> (its slice, the old slice cut from the same source tensor, or None): a
    layout cuts one slice from each source tensor."""
    by_source = {s.source: s for s in old.values()}
    return {name: (s, by_source.get(s.source)) for name, s in new.items()}


def _same(a, b) -> bool:
    import torch

    return (a is None and b is None) or (a is not None and b is not None and a[0] == b[0] and torch.equal(a[1], b[1]))


def _matched(new, old, new_ckpt, old_ckpt, counts: dict):
    """The new tensor with what the old recovered one holds of the same units, or None when nothing
    matches (the new one stays the original's)."""
    if old is None or new.fill is not None or old.fill is not None:  # a filler expert is no one's weights
        return None
    if new.slots is None:  # a whole tensor (or one expert's own): taken when cut alike
        if not _same(new.index, old.index) or new.spec.shape != old.spec.shape:
            return None
        counts["tensors"] += 1
        return old_ckpt.get(old.name)
    value, held, r = new_ckpt.get(new.name).clone(), old_ckpt.get(old.name), new.rows_per_expert
    taken = 0
    for j, e in enumerate(new.slots):
        if (e in new.fillers or e not in old.slots or e in old.fillers
                or not _same((new.expert_index or {}).get(e), (old.expert_index or {}).get(e))):
            counts["original_slots"] += 1
            continue
        i = old.slots.index(e)
        value[j * r : (j + 1) * r] = held[i * r : (i + 1) * r]
        taken += 1
    counts["expert_slots"] += taken
    return value if taken else None


def _quality(opened: Opened, prev: Previous, out: Path, recovered: bool, whole: Workload, old_wl: Workload,
             added: Workload, dtype: str) -> dict:
    """Held-out loss delta, per family and overall, of the run's judged model (``before``) and the
    update's (``after``), on the old held-out items and on the new ones. What the runs already
    measured is read (the run's own evaluation covers the old items; the update's evaluation of
    old and new items together, or its recovery's, is split by item); only the run's model on the
    new items is evaluated here."""
    from uspx.evaluate import evaluate

    def run(model: Path, wl: Workload) -> list[dict]:  # losses only: checked items are not answered here
        losses = Workload(wl.source, [replace(i, checks=None) for i in wl.items], wl.summary, wl.heldout_fraction)
        return evaluate(opened, model, losses, split="heldout", max_length=prev.trace["options"]["max_length"],
                        speed=False, dtype=dtype)["items"]

    old_ids = {i.id for i in old_wl.part("heldout").items}
    new_ids = {i.id for i in added.part("heldout").items}
    # the update's judged model on old and new items together, as recovery or the extract evaluated it
    after = read_json(out / "recover" / "recover.json")["heldout_items"] if recovered else \
        read_json(out / "evaluation.json")["items"]
    if prev.recovered is not None:  # the run judged its recovered model on its held-out items
        before_old = {f: dict(delta=v["delta"], tokens=v["tokens"])
                      for f, v in read_json(prev.path / "recover" / "recover.json")["heldout"]["after"].items()}
    else:
        before_old = _deltas(read_json(prev.path / "evaluation.json")["items"], old_ids)
    return dict(
        old=dict(before=before_old, after=_deltas(after, old_ids)),
        new=dict(before=_deltas(run(prev.judged, added), new_ids), after=_deltas(after, new_ids)) if new_ids else None,
    )


def _deltas(items: list[dict], ids: set[str]) -> dict:
    """Loss delta (nats per token, token-weighted as ``uspx eval`` weighs it) and tokens per family
    and over all of the evaluated ``items`` whose id is in ``ids``."""
    rows = [r for r in items if r["id"] in ids and r["tokens"]]
    out = {}
    for fam in sorted({r["family"] for r in rows}) + ["all"]:
        part = [r for r in rows if fam == "all" or r["family"] == fam]
        tokens = sum(r["tokens"] for r in part)
        delta = sum(r["tokens"] * (r["loss_candidate"] - r["loss_teacher"]) for r in part) / tokens if tokens else None
        out[fam] = dict(delta=delta, tokens=tokens, items=len(part))
    return out


def _result(prev: Previous, out: Path, new_wl: Workload, added: Workload, repeated: int, tokens: dict, report: dict,
            warm: dict | None, quality: dict, seconds: dict) -> dict:
    plan = read_json(out / "plan.json")
    layer_changes = changes(prev.plan, plan)
    return dict(
        format=FORMAT, run=str(prev.path), out=str(out), model=report["model"],
        new_workload=dict(source=new_wl.source, fingerprint=new_wl.fingerprint, items=len(new_wl.items),
                          added=len(added.items), already_in_run=repeated,
                          calibration=len(added.part("calibration").items), heldout=len(added.part("heldout").items)),
        tokens_traced=tokens, scores=_score_sources(out), changes=[asdict(c) for c in layer_changes],
        experts_swapped=sum(len(c.kept_in) for c in layer_changes),
        channels_changed=sum(len(c.channels_changed) for c in layer_changes),
        heads_changed=heads_changed(prev.plan, plan),
        shape=dict(before=prev.report.get("shape"), after=report.get("shape")),
        recovery=None if prev.recovered is None else dict(warm_start=warm, model=report["recovered"]["model"]),
        quality=quality, verdict=report["acceptance"]["verdict"], seconds=seconds,
    )


def _score_sources(out: Path) -> dict:
    """Where the updated scores come from: "trace" (the old and new items' sums, no model pass) or
    "model" (computed again over every calibration item), per method, and the unit types scored."""
    meta = read_json(out / "scores" / "scores.json")
    return dict(methods=meta.get("method_source", {}), units=(meta.get("options") or {}).get("units", ["experts"]))


def print_update(result: dict) -> None:
    from rich.table import Table

    t = result["tokens_traced"]
    console.rule("what the update changed")
    console.print(f"{result['new_workload']['added']} new items ({result['new_workload']['already_in_run']} already "
                  f"in the run); traced {t['new']} new tokens (the run had traced {t['previous']})")
    for c in result["changes"]:
        if c["kept_in"] or c["kept_out"] or c["channels_changed"]:
            narrowed = f"; other channels: {c['channels_changed']}" if c["channels_changed"] else ""
            console.print(f"layer {c['layer']}: in {c['kept_in']}, out {c['kept_out']}{narrowed}")
    console.print(f"{result['experts_swapped']} experts swapped in all"
                  + (f"; {result['channels_changed']} kept experts with other channels" if result["channels_changed"] else "")
                  + (f"; other query heads in layers {result['heads_changed']}" if result["heads_changed"] else ""))
    table = Table(title="held-out loss delta vs the original (nats per token): the run's model, then the update's")
    for col in ("items", "family", "before", "after"):
        table.add_column(col, justify="left" if col in ("items", "family") else "right")
    for name, q in result["quality"].items():
        for fam, b in (q or {}).get("before", {}).items():
            a = q["after"][fam]
            table.add_row(name, fam, f"{b['delta']:+.4f}", f"{a['delta']:+.4f}")
    console.print(table)
    console.print(f"verdict: [bold]{result['verdict']}[/]; {result['seconds']['total']:.1f} s; update in {result['out']}")
