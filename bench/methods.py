"""Method benchmark (issue 4 item 6): which importance score prunes best, on the user's held-out set.

For every user workload (python_dev, shell_user, docs_writer by default) and two calibration sources,
the user's own calibration split and a generic one (``mixed``'s calibration split), this traces and
scores the teacher with every ``uspx.score`` method, keeps 75% / 50% / 25% of the experts of every
layer (uniform plans), and evaluates each restricted model against the teacher on the user's
held-out split: loss delta on completion tokens, top-1 agreement, KL. ``random`` (uniform keep,
seeded, mean of --random-seeds seeds) is the floor every method must clear.

    python bench/methods.py                         # the teacher, all three users (writes the docs)
    python bench/methods.py --quick                 # a tiny random model, seconds: smoke test only

Everything is cached under --out (default runs/bench_methods): traces resume, score tables are
reused when their model, workload, methods and options match, and every evaluation is stored by
(user, calibration, method, keep, kept set), so a re-run only computes what is missing. The results
go to --out/results.json; with --doc, a section of docs/benchmarks.md and one plot per user
(docs/img/methods_<user>.png) are (re)written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import string
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Scoring methods on the teacher (issue: USPX core)"
KEEPS = ("75%", "50%", "25%")
# methods scored together: usage_x_marginal reuses the interventional ablation (scoring it alone
# would repeat that ablation), reap and ean come from the trace's norms with frequency.
GROUPS = (
    ("trace", ("frequency", "reap", "ean")),
    ("ablation_natural", ("ablation_natural",)),
    ("ablation_interventional", ("ablation_interventional", "usage_x_marginal")),
    ("taylor", ("taylor",)),
    ("reconstruction", ("reconstruction",)),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----- quick mode: a tiny model and small workloads -----------------------------------------------
def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.printable[:95]
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def make_quick(out: Path, users: list[str], generic: str) -> tuple[Path, Path]:
    """A tiny gpt_oss folder and cut-down copies of the workloads (a few short items per split)."""
    from uspx.testing import tiny_model

    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        tiny_model("gpt_oss", seed=0).save_pretrained(model_dir)
        _char_tokenizer().save_pretrained(model_dir)
    wl_dir = out / "workloads"
    wl_dir.mkdir(parents=True, exist_ok=True)
    for name in {*users, generic}:
        rows, seen = [], {}
        for line in (ROOT / "src/uspx/data/workloads" / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            key = (r.get("family"), r.get("split"))
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 6:
                continue
            if "prompt" in r:
                r["prompt"], r["completion"] = r["prompt"][-60:], r.get("completion", "")[:40]
            rows.append(r)
        (wl_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, wl_dir


# ----- helpers ------------------------------------------------------------------------------------
def kept_hash(kept: dict) -> str:
    text = json.dumps({str(l): sorted(int(e) for e in v) for l, v in sorted(kept.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def random_table(layers: list[int], n_exp: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [(l, e, float(v)) for l in layers for e, v in zip(range(n_exp), rng.random(n_exp))]
    return pa.table({"layer": [r[0] for r in rows], "expert": [r[1] for r in rows], "value": [r[2] for r in rows]})


def cached_scores(path: Path, lm, methods, trace_fp: str, options: dict):
    """The score table in ``path`` if it was made from this model / trace with these options."""
    from uspx.score import load_scores

    if not (path / "scores.json").exists():
        return None
    try:
        t = load_scores(path)
    except Exception:
        return None
    m = t.meta
    if (m["model"]["fingerprint"] != lm.fingerprint or m["workload"]["trace_fingerprint"] != trace_fp
            or list(m["methods"]) != list(methods)
            or any(m["options"].get(k) != v for k, v in options.items())):
        return None
    return t


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict = {}  # calib -> group -> seconds (computed, or read back from the cache)

    def load(self, model):
        import torch

        from uspx.models import load_model

        t0 = time.perf_counter()
        self.lm = load_model(model, dtype=torch.float32)
        self.lm.model.eval()
        from uspx.models import adapter_for

        ad = adapter_for(self.lm.model)
        self.layers = [l.index for l in ad.layers]
        self.n_exp, self.top_k = ad.num_experts, ad.top_k
        log(f"model {self.lm.source}: {len(self.layers)} MoE layers x {self.n_exp} experts, top-{self.top_k} "
            f"({time.perf_counter() - t0:.1f} s)")

    # ----- trace + score ---------------------------------------------------------------------------
    def calibrate(self, calib: str, wl) -> dict:
        """Trace ``calib``'s calibration split and score it with every method; tables per group."""
        from uspx.score import score
        from uspx.trace import Trace, trace

        base = self.out / "calib" / calib
        tdir = base / "trace"
        t0 = time.perf_counter()
        done_before = (tdir / "manifest.json").exists() and json.loads((tdir / "manifest.json").read_text()).get("complete")
        trace(self.lm, wl, tdir, split="calibration", norms=True, batch_size=self.a.batch_size, progress=False)
        tr = Trace(tdir)
        timing = self.timings.setdefault(calib, {})
        # seconds of the run that finished the trace (a resumed trace reports only its last part)
        timing["trace_wall_s"] = float(tr.manifest.get("summary", {}).get("seconds_this_run") or (time.perf_counter() - t0))
        log(f"{calib}: trace {'cached' if done_before else 'done'} ({time.perf_counter() - t0:.1f} s)")
        trace_fp = wl.part("calibration").fingerprint
        tables = {}
        for group, methods in GROUPS:
            methods = [m for m in methods if m in self.a.methods]
            if not methods:
                continue
            sdir = base / f"scores_{group}"
            model_based = group != "trace"
            opts = dict(max_tokens=self.a.max_tokens if model_based else None, batch_size=self.a.batch_size,
                        marginal="interventional")
            t = cached_scores(sdir, self.lm, methods, trace_fp, opts)
            if t is None:
                log(f"{calib}: scoring {', '.join(methods)} ...")
                t0 = time.perf_counter()
                t = score(self.lm, tdir, wl, sdir, methods=methods, split="calibration",
                          max_tokens=opts["max_tokens"], batch_size=self.a.batch_size, bootstrap=self.a.bootstrap,
                          marginal="interventional", progress=False)
                wall = time.perf_counter() - t0
                extra = json.loads((sdir / "scores.json").read_text())
                extra.setdefault("bench", {})["wall_s"] = wall
                (sdir / "scores.json").write_text(json.dumps(extra, indent=2))  # our note: wall time incl. bootstrap
                log(f"{calib}: scored {', '.join(methods)} in {wall:.1f} s ({t.meta['seconds']})")
            wall = t.meta.get("bench", {}).get("wall_s")
            if wall is None:
                extra = json.loads((sdir / "scores.json").read_text())
                wall = extra.get("bench", {}).get("wall_s")
            timing[group] = dict(wall_s=wall, stages=t.meta["seconds"], prompts=t.meta["prompts"],
                                 methods=methods)
            for m in methods:
                tables[m] = t
        return tables

    # ----- evaluation ------------------------------------------------------------------------------
    def evaluate(self, user: str, wl, kept: dict) -> dict:
        from uspx.evaluate import evaluate

        h = kept_hash(kept)
        path = self.out / "evals" / user / f"{h}.json"
        if path.exists():
            r = json.loads(path.read_text())
            if r["teacher"]["fingerprint"] == self.lm.fingerprint:
                return r
        t0 = time.perf_counter()
        r = evaluate(self.lm, None, wl, split="heldout", kept={int(l): list(v) for l, v in kept.items()},
                     speed=False, batch_size=self.a.batch_size)
        r["bench_wall_s"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=1))
        return r

    def paired(self, user: str, wl, kept_a: dict, kept_b: dict) -> dict:
        """Loss of candidate B minus candidate A on the same held-out items, with a paired 95% interval
        (items as the unit): ``compare`` run with A in the teacher's seat."""
        from uspx.engine import InMemory
        from uspx.evaluate.metrics import compare, summarise
        from uspx.models import adapter_for
        from uspx.engine.batches import pad_id_of
        from uspx.workload import encode

        path = self.out / "paired" / user / f"{kept_hash(kept_a)}_{kept_hash(kept_b)}.json"
        if path.exists():
            r = json.loads(path.read_text())
            if r.get("fingerprint") == self.lm.fingerprint:
                return r
        ad = adapter_for(self.lm.model)
        ka = {int(l): list(v) for l, v in kept_a.items()}
        kb = {int(l): list(v) for l, v in kept_b.items()}
        max_length = min(int(getattr(self.lm.model.config, "max_position_embeddings", 2048)), 2048)
        items = encode(wl.part("heldout"), self.lm.tokenizer, max_length)
        model = InMemory(self.lm.model)
        st = compare(model, model, items, self.a.batch_size, pad_id_of(self.lm.tokenizer),
                     teacher_context=lambda: ad.restrict(ka), candidate_context=lambda: ad.restrict(kb))
        s = summarise(st, np.arange(len(items)))
        r = dict(fingerprint=self.lm.fingerprint, diff=s["delta"], diff_ci95=s["delta_ci95"], tokens=s["tokens"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
        return r

    def plan(self, table) -> dict:
        from uspx.plan import select_experts

        out = {}
        for keep in self.a.keeps:
            p = select_experts(table, keep=keep, config=self.lm.model.config, uniform=True)
            out[keep] = {int(l): [int(e) for e in v] for l, v in p.kept.items()}
        return out

    @staticmethod
    def metrics(r: dict) -> dict:
        o = r["overall"]
        return dict(delta=o["delta"], delta_ci95=o["delta_ci95"], top1_agreement=o["top1_agreement"], kl=o["kl"],
                    loss_teacher=o["loss_teacher"], loss_candidate=o["loss_candidate"], tokens=o["tokens"])

    def run(self) -> dict:
        from uspx.workload import load_workload

        a = self.a
        wls = {n: load_workload(Path(a.workload_dir) / f"{n}.jsonl") for n in {*a.users, a.generic}}
        calibs = {n: self.calibrate(n, wls[n]) for n in [*a.users, a.generic]}
        res: dict = {"users": {}}
        for user in a.users:
            wl = wls[user]
            ur: dict = {"calibration": {}, "random": {}}
            # random: independent of the calibration
            for keep in a.keeps:
                runs = []
                for seed in range(a.random_seeds):
                    tab = random_table(self.layers, self.n_exp, 1000 + seed)
                    kept = self.plan(tab)[keep]
                    runs.append(self.metrics(self.evaluate(user, wl, kept)))
                ur["random"][keep] = {k: float(np.mean([r[k] for r in runs])) for k in ("delta", "top1_agreement", "kl")}
                ur["random"][keep]["delta_std"] = float(np.std([r["delta"] for r in runs]))
                ur["random"][keep]["seeds"] = runs
            log(f"{user}: random " + ", ".join(f"{k} {ur['random'][k]['delta']:.4f}" for k in a.keeps))
            for cname, calib in (("user", user), ("generic", a.generic)):
                cr = {}
                for m, tab in calibs[calib].items():
                    plans = self.plan(tab.method(m))
                    cr[m] = {}
                    for keep, kept in plans.items():
                        ev = self.evaluate(user, wl, kept)
                        cr[m][keep] = {**self.metrics(ev), "kept": {str(l): v for l, v in kept.items()}}
                    log(f"{user} [{cname} calib = {calib}] {m}: "
                        + ", ".join(f"{k} {cr[m][k]['delta']:.4f}" for k in a.keeps))
                ur["calibration"][cname] = {"source": calib, "methods": cr}
            # paired comparisons (B - A; negative = B better): default vs reap, user vs generic calibration
            d = self.a.default
            ur["paired"] = {}
            meths = ur["calibration"]["user"]["methods"]
            gen = ur["calibration"]["generic"]["methods"]
            pairs = []
            if d in meths and "reap" in meths and d != "reap":
                pairs += [(f"{d} − reap (user calib)", meths["reap"], meths[d]),
                          (f"{d} − reap (generic calib)", gen["reap"], gen[d])]
            for m in dict.fromkeys([d, "reap"]):
                if m in meths:
                    pairs.append((f"{m}: user calib − generic calib", gen[m], meths[m]))
            for name, A, B in pairs:
                ur["paired"][name] = {k: self.paired(user, wl, A[k]["kept"], B[k]["kept"]) for k in a.keeps}
                log(f"{user} paired {name}: " + ", ".join(
                    f"{k} {v['diff']:+.4f} [{v['diff_ci95'][0]:+.4f}, {v['diff_ci95'][1]:+.4f}]"
                    for k, v in ur["paired"][name].items()))
            ur["loss_teacher"] = next(iter(next(iter(ur["calibration"]["user"]["methods"].values())).values()))["loss_teacher"]
            res["users"][user] = ur
        res["timings"] = self.timings
        return res


# ----- report -------------------------------------------------------------------------------------
def machine() -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    import torch

    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {mem:.0f} GB RAM, no GPU; "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU shared with other jobs")


def method_order(res: dict) -> list[str]:
    from uspx.score import METHODS

    return [m for m in METHODS if any(m in u["calibration"]["user"]["methods"] for u in res["users"].values())]


def mean_rank(res: dict, keeps, cname="user") -> dict[str, float]:
    """Average rank of each method (1 = lowest delta) over users x keeps, random included."""
    methods = method_order(res) + ["random"]
    ranks = {m: [] for m in methods}
    for u in res["users"].values():
        for k in keeps:
            d = {m: u["calibration"][cname]["methods"][m][k]["delta"] for m in methods if m != "random"}
            d["random"] = u["random"][k]["delta"]
            for i, m in enumerate(sorted(d, key=d.get)):
                ranks[m].append(i + 1)
    return {m: float(np.mean(v)) for m, v in ranks.items()}


def plot(res: dict, keeps, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    fr = [float(k.rstrip("%")) / 100 for k in keeps]
    paths = []
    for user, u in res["users"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, cname in zip(axes, ("user", "generic")):
            c = u["calibration"][cname]
            for m in method_order(res):
                ax.plot(fr, [c["methods"][m][k]["delta"] for k in keeps], marker="o", label=m,
                        lw=2.2 if m in ("reap", res.get("default")) else 1.2)
            ax.errorbar(fr, [u["random"][k]["delta"] for k in keeps], yerr=[u["random"][k]["delta_std"] for k in keeps],
                        color="k", ls="--", marker="x", label="random (3 seeds)")
            ax.set_xlabel("fraction of experts kept per layer")
            ax.set_title(f"{user} held-out, calibration: {c['source']} ({cname})", fontsize=10)
            ax.set_yscale("symlog", linthresh=0.01)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("loss delta vs teacher (nats/token)")
        axes[1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        p = img_dir / f"methods_{user}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def timing_rows(res: dict) -> list[tuple[str, str]]:
    """Wall time per method, summed over the calibrations (trace counted for trace methods)."""
    rows = []
    tm = res["timings"]
    calibs = list(tm)
    trace = sum(tm[c].get("trace_wall_s", 0) for c in calibs)
    for group, methods in GROUPS:
        present = [c for c in calibs if group in tm[c]]
        if not present:
            continue
        wall = sum(tm[c][group]["wall_s"] or 0 for c in present)
        stages = {}
        for c in present:
            for k, v in tm[c][group]["stages"].items():
                stages[k] = stages.get(k, 0) + v
        per = wall / len(present)
        if group == "trace":
            rows.append((", ".join(methods), f"{trace / len(calibs) + per:.1f} s per calibration "
                         f"(trace with norms {trace / len(calibs):.1f} s + statistics {per:.1f} s)"))
        else:
            prm = tm[present[0]][group]["prompts"]
            st = ", ".join(f"{k} {v / len(present):.1f} s" for k, v in stages.items())
            rows.append((", ".join(methods), f"{per:.1f} s per calibration ({st}; "
                         f"{prm['model']} prompts / {prm['model_tokens']} tokens)"))
    return rows


def markdown(res: dict, a, imgs: list[Path], doc: Path) -> str:
    keeps = a.keeps
    ms = method_order(res)
    L = [SECTION, ""]
    L.append(f"Produced by `bench/methods.py` ({res['date']}). Machine: {res['machine']}.")
    L.append("")
    L.append(f"Command: `{res['command']}`")
    L.append("")
    L.append(
        f"Model: `{res['model']}` ({res['model_shape']}). For each user workload, the teacher is traced and "
        f"scored on a calibration split, then restricted to the {'/'.join(keeps)} best experts of every layer "
        "(uniform plans, `select_experts(keep=..., uniform=True)`, mask-only) and evaluated against the teacher on "
        "the user's held-out split: the loss delta (nats/token on completion tokens; 0 = as good as the teacher) "
        "is the figure of merit, top-1 agreement and KL(teacher || candidate) are given too. Two calibrations: the "
        f"user's own calibration split (*user*) and the generic `{a.generic}` calibration split (*generic*, all "
        f"families). frequency / reap / ean use every calibration token (from the trace, with norms); the "
        f"model-based methods use a seeded subsample of whole prompts, `max_tokens={a.max_tokens}`. `random` keeps "
        f"a seeded random set, mean of {a.random_seeds} seeds (± their std). Lower is better everywhere."
    )
    L.append("")
    for user, u in res["users"].items():
        L.append(f"### {user} (teacher held-out loss {u['loss_teacher']:.3f} nats/token)")
        L.append("")
        if imgs:
            p = next((p for p in imgs if p.name == f"methods_{user}.png"), None)
            if p is not None:
                L.append(f"![{user}]({os.path.relpath(p, doc.parent)})")
                L.append("")
        head = "| method | " + " | ".join(f"Δ user {k}" for k in keeps) + " | " + " | ".join(
            f"Δ generic {k}" for k in keeps) + " | " + " | ".join(f"top-1 / KL user {k}" for k in keeps) + " |"
        L.append(head)
        L.append("|" + "---|" * (1 + 3 * len(keeps)))
        best = {(c, k): min(u["calibration"][c]["methods"][m][k]["delta"] for m in ms)
                for c in ("user", "generic") for k in keeps}
        for m in ms:
            cells = []
            for c in ("user", "generic"):
                for k in keeps:
                    d = u["calibration"][c]["methods"][m][k]["delta"]
                    cells.append(f"**{d:.4f}**" if d == best[c, k] else f"{d:.4f}")
            for k in keeps:
                r = u["calibration"]["user"]["methods"][m][k]
                cells.append(f"{r['top1_agreement']:.3f} / {r['kl']:.4f}")
            name = f"{m} (default)" if m == res.get("default") else m
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        rnd = [f"{u['random'][k]['delta']:.4f} ± {u['random'][k]['delta_std']:.4f}" for k in keeps]
        L.append("| random | " + " | ".join(rnd) + " | " + " | ".join(rnd) + " | "
                 + " | ".join(f"{u['random'][k]['top1_agreement']:.3f} / {u['random'][k]['kl']:.4f}" for k in keeps)
                 + " |")
        L.append("")
    # summary: mean rank, user vs generic
    L.append("### Summary")
    L.append("")
    mr_u, mr_g = mean_rank(res, keeps, "user"), mean_rank(res, keeps, "generic")
    L.append("Mean rank of each method over users × budgets (1 = smallest loss delta; random included), and its "
             "mean loss delta with the user's calibration:")
    L.append("")
    L.append("| method | mean rank (user calib) | mean rank (generic calib) | " + " | ".join(
        f"mean Δ {k}" for k in keeps) + " |")
    L.append("|---|---|---|" + "---|" * len(keeps))
    for m in sorted(mr_u, key=mr_u.get):
        if m == "random":
            md = [np.mean([u["random"][k]["delta"] for u in res["users"].values()]) for k in keeps]
        else:
            md = [np.mean([u["calibration"]["user"]["methods"][m][k]["delta"] for u in res["users"].values()])
                  for k in keeps]
        L.append(f"| {m} | {mr_u[m]:.2f} | {mr_g[m]:.2f} | " + " | ".join(f"{x:.4f}" for x in md) + " |")
    L.append("")
    L.append("User vs generic calibration (loss delta on the user's held-out set; negative = user calibration "
             "is better), per method, summed over budgets:")
    L.append("")
    L.append("| user | " + " | ".join(ms) + " |")
    L.append("|---|" + "---|" * len(ms))
    for user, u in res["users"].items():
        cells = []
        for m in ms:
            d = sum(u["calibration"]["user"]["methods"][m][k]["delta"] - u["calibration"]["generic"]["methods"][m][k]["delta"]
                    for k in keeps)
            cells.append(f"{d:+.4f}")
        L.append(f"| {user} | " + " | ".join(cells) + " |")
    L.append("")
    pn = list(dict.fromkeys(n for u in res["users"].values() for n in u.get("paired", {})))
    if pn:
        L.append("Paired differences on the same held-out items (loss of the second minus the first, nats/token, "
                 "95% interval with items as the unit; negative = the named method / calibration is better):")
        L.append("")
        L.append("| user | comparison | " + " | ".join(keeps) + " |")
        L.append("|---|---|" + "---|" * len(keeps))
        for user, u in res["users"].items():
            for n in pn:
                if n in u.get("paired", {}):
                    v = u["paired"][n]
                    L.append(f"| {user} | {n} | " + " | ".join(
                        f"{v[k]['diff']:+.4f} [{v[k]['diff_ci95'][0]:+.3f}, {v[k]['diff_ci95'][1]:+.3f}]" for k in keeps)
                        + " |")
        L.append("")
    L.append("Wall time per method (scoring only, averaged over the calibrations; evaluation excluded):")
    L.append("")
    L.append("| method(s) | wall time |")
    L.append("|---|---|")
    for m, t in timing_rows(res):
        L.append(f"| {m} | {t} |")
    L.append("")
    if res.get("conclusion"):
        L.append("### Conclusion")
        L.append("")
        L.append(res["conclusion"])
        L.append("")
    return "\n".join(L) + "\n"


def write_section(doc: Path, text: str) -> None:
    """Add or replace our section only; the rest of the file is left as other writers left it."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    cur = doc.read_text() if doc.exists() else "# uspx benchmarks\n"
    lines = cur.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == SECTION), None)
    if start is None:
        new = cur.rstrip("\n") + "\n\n" + text
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    tmp = doc.with_suffix(".md.tmp-methods")
    tmp.write_text(new)
    tmp.replace(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model folder or 'default' (the bundled teacher)")
    ap.add_argument("--workloads", default="python_dev,shell_user,docs_writer", help="user workloads (names)")
    ap.add_argument("--workload-dir", default=str(ROOT / "src/uspx/data/workloads"))
    ap.add_argument("--generic", default="mixed", help="the generic calibration workload")
    ap.add_argument("--keeps", default=",".join(KEEPS))
    ap.add_argument("--methods", default=None, help="score methods (default: all)")
    ap.add_argument("--max-tokens", type=int, default=4000,
                    help="token budget of the model-based methods (0: the whole calibration split)")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "runs/bench_methods"))
    ap.add_argument("--doc", action="store_true", help="write docs/benchmarks.md section and docs/img plots")
    ap.add_argument("--default", default=None, help="the method to mark as uspx's default in the report")
    ap.add_argument("--conclusion", default=None, help="a file whose text closes the docs section")
    ap.add_argument("--quick", action="store_true", help="tiny random model and small workloads (smoke test)")
    a = ap.parse_args(argv)

    import torch

    from uspx.score import DEFAULT_METHOD, METHODS

    if a.threads:
        torch.set_num_threads(a.threads)
    a.users = [w for w in a.workloads.split(",") if w]
    a.keeps = [k.strip() for k in a.keeps.split(",")]
    a.methods = [m for m in METHODS if m != "l0"] if a.methods is None else [m for m in a.methods.split(",") if m]
    a.max_tokens = a.max_tokens or None
    if a.quick:
        a.out = str(Path(a.out) / "quick")
        model_dir, wl_dir = make_quick(Path(a.out), a.users, a.generic)
        a.model, a.workload_dir, a.max_tokens = str(model_dir), str(wl_dir), min(a.max_tokens or 300, 300)
    a.default = a.default or DEFAULT_METHOD
    t0 = time.perf_counter()
    b = Bench(a)
    b.load(a.model)
    res = b.run()
    res.update(
        date=time.strftime("%Y-%m-%d"), machine=machine(),
        model=a.model if a.model == "default" else str(b.lm.source),  # no machine path for the bundled teacher
        model_shape=f"{b.lm.model.config.model_type}, {len(b.layers)} MoE layers × {b.n_exp} experts, top-{b.top_k}",
        model_fingerprint=b.lm.fingerprint,
        command=" ".join(["python", "bench/methods.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        settings=dict(keeps=a.keeps, max_tokens=a.max_tokens, random_seeds=a.random_seeds, batch_size=a.batch_size,
                      bootstrap=a.bootstrap, generic=a.generic, methods=a.methods),
        default=a.default, total_wall_s=time.perf_counter() - t0,
        mean_rank={"user": mean_rank(res, a.keeps, "user"), "generic": mean_rank(res, a.keeps, "generic")},
    )
    if a.conclusion:
        res["conclusion"] = Path(a.conclusion).read_text().strip()
    out = Path(a.out) / "results.json"
    out.write_text(json.dumps(res, indent=1))
    log(f"wrote {out} ({res['total_wall_s']:.0f} s)")
    for m, r in sorted(res["mean_rank"]["user"].items(), key=lambda kv: kv[1]):
        log(f"  mean rank {m:25s} user {r:.2f}  generic {res['mean_rank']['generic'][m]:.2f}")
    if a.doc:
        doc = ROOT / "docs/benchmarks.md"
        imgs = plot(res, a.keeps, ROOT / "docs/img") if not a.quick else plot(res, a.keeps, Path(a.out) / "img")
        text = markdown(res, a, imgs, doc if not a.quick else Path(a.out) / "benchmarks.md")
        if a.quick:
            write_section(Path(a.out) / "benchmarks.md", text)
        else:
            write_section(doc, text)
        log("wrote the docs section and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
