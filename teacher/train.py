"""Train the bundled gpt_oss teacher on the corpus (CPU, resumable).

Usage (after building the corpus and the tokenizer)::

    python -m teacher.train --corpus data/corpus --tokenizer data/tokenizer \\
        --work runs/teacher --out src/uspx/data/teacher --steps 3000

The model is a stock ``transformers.GptOssForCausalLM`` built from a
``GptOssConfig`` (see :func:`teacher_config`). Training uses packed sequences
sampled from each family in equal proportions, the language-model loss plus
the stock Switch-style load-balancing loss applied *per layer* (the stock
``load_balancing_loss_func`` averages counts over layers, which would let one
layer starve experts as long as another compensates), AdamW, warmup + cosine.

Checkpoints (every ``--save-every`` steps) are folders
``<work>/ckpt-<step>/`` with ``model.safetensors``, ``optim.safetensors`` and
``state.json``; ``<work>/latest.json`` names the newest one and is replaced
atomically, so a crash mid-save never corrupts the resume point. Nothing is
unpickled on resume. Rerunning the same command resumes.

The final export is bf16 safetensors (fp32 would not fit the 25 MB budget),
loadable with stock ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uspx.engine.forward import forward
from uspx.engine.losses import token_nll
from uspx.io import write_text
from teacher.corpus import FAMILIES, read_split

SEQ_LEN = 256


# --------------------------------------------------------------------------- config


def teacher_config(vocab_size: int, eos_id: int, aux_coef: float = 0.005) -> "transformers.GptOssConfig":  # noqa: F821
    """The teacher's architecture: gpt_oss, 6 layers, 16 experts, top-4, ~10M params."""
    from transformers import GptOssConfig

    n_layers = 6
    return GptOssConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        num_local_experts=16,
        num_experts_per_tok=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        # Window 128 < training length 256, so the sliding layers really see
        # less context than the full ones, as in gpt-oss.
        sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        max_position_embeddings=2048,
        # Plain RoPE: gpt-oss's YaRN stretch (factor 32 over 4096) is for 128k
        # contexts and only blurs positions at 2048.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=aux_coef,
        output_router_logits=False,  # turned on per call in training / analysis
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def build_model(config: "transformers.GptOssConfig", seed: int) -> "transformers.GptOssForCausalLM":  # noqa: F821
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"  # the only gpt_oss attention on CPU
    return GptOssForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- data


def tokenize_split(corpus: Path, tokenizer_dir: Path, split: str, cache: Path) -> dict[str, np.ndarray]:
    """One packed token stream per family (documents joined by EOS), cached as .npy."""
    from transformers import AutoTokenizer

    cache.mkdir(parents=True, exist_ok=True)
    tok_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()[:12]
    paths = {f: cache / f"{split}-{f}-{tok_hash}.npy" for f in FAMILIES}
    if all(p.exists() for p in paths.values()):
        return {f: np.load(p, allow_pickle=False) for f, p in paths.items()}
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = read_split(corpus, split)
    out: dict[str, np.ndarray] = {}
    for f in FAMILIES:
        texts = [d["text"] for d in docs if d["family"] == f]
        ids: list[int] = []
        for enc in tok(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(tok.eos_token_id)
        arr = np.asarray(ids, dtype=np.int32)
        tmp = paths[f].with_name(paths[f].name + ".tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, paths[f])
        out[f] = arr
    return out


def sample_batch(streams: dict[str, np.ndarray], batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``batch`` windows of ``seq_len + 1`` tokens, families in equal shares.

    Families are cycled (then shuffled) rather than drawn in proportion to
    their size, so the small prose family weighs as much as the large ones.
    """
    fams = [FAMILIES[i % len(FAMILIES)] for i in range(batch)]
    perm = torch.randperm(batch, generator=gen).tolist()
    fams = [fams[i] for i in perm]
    rows = []
    for f in fams:
        s = streams[f]
        start = int(torch.randint(0, len(s) - seq_len - 1, (1,), generator=gen))
        rows.append(torch.from_numpy(s[start:start + seq_len + 1].astype(np.int64)))
    return torch.stack(rows), fams


def fixed_windows(streams: dict[str, np.ndarray], per_family: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Evenly spaced, deterministic windows per family (for validation)."""
    out = {}
    for f, s in streams.items():
        n = min(per_family, max(1, (len(s) - 1) // seq_len))
        starts = np.linspace(0, len(s) - seq_len - 1, n).astype(np.int64)
        out[f] = torch.stack([torch.from_numpy(s[a:a + seq_len + 1].astype(np.int64)) for a in starts])
    return out


# --------------------------------------------------------------------------- loss


def per_layer_aux(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """Mean over layers of the stock load-balancing loss computed on each layer alone.

    Equals ``top_k`` when routing is perfectly balanced in every layer.
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    losses = [load_balancing_loss_func((lg,), n_experts, top_k) for lg in router_logits]
    return torch.stack([torch.as_tensor(x) for x in losses]).mean()


def lm_loss(model: torch.nn.Module, x: torch.Tensor, with_router: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy on windows ``x`` [B, T+1]; optional per-layer aux loss."""
    # gradients as the caller's mode: a training step wants them, the validation pass does not
    out = forward(model, x[:, :-1], grad=torch.is_grad_enabled(), output_router_logits=with_router)
    logits = out.logits.float()
    loss = token_nll(logits, x[:, 1:], reduction="mean")
    aux = None
    if with_router:
        cfg = model.config
        aux = per_layer_aux(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
    return loss, aux


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: dict[str, torch.Tensor], bs: int = 8) -> dict[str, float]:
    model.eval()
    res = {}
    for f, w in windows.items():
        tot, n = 0.0, 0
        for i in range(0, len(w), bs):
            loss, _ = lm_loss(model, w[i:i + bs], False)
            tot += float(loss) * len(w[i:i + bs])
            n += len(w[i:i + bs])
        res[f] = tot / n
    model.train()
    return res


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, cosine decay to 10% of peak; a function of the step alone."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(work: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write ckpt-<step>/ then point latest.json at it (atomic os.replace)."""
    from safetensors.torch import save_file

    d = work / f"ckpt-{step:06d}"
    tmp = work / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().contiguous().clone()
    save_file(tensors, str(tmp / "optim.safetensors"))
    (tmp / "param_groups.json").write_text(json.dumps(sd["param_groups"]))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    latest_tmp = work / "latest.json.tmp"
    latest_tmp.write_text(json.dumps({"dir": d.name, "step": step}))
    os.replace(latest_tmp, work / "latest.json")
    for old in work.glob("ckpt-*"):  # keep only the newest
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return d


def load_checkpoint(work: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    from safetensors.torch import load_file

    latest = work / "latest.json"
    if not latest.exists():
        return None
    d = work / json.loads(latest.read_text())["dir"]
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    flat = load_file(str(d / "optim.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = json.loads((d / "param_groups.json").read_text())
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((d / "state.json").read_text())


# --------------------------------------------------------------------------- export


def export(model: torch.nn.Module, tokenizer_dir: Path, out: Path, max_mb: float = 25.0) -> int:
    """Save the teacher (bf16 safetensors + tokenizer) into ``out``; returns bytes of weights."""
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.output_router_logits = False
    m.config.use_cache = True
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m.save_pretrained(str(tmp))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600; the package data must be world-readable
    size = (tmp / "model.safetensors").stat().st_size
    if size > max_mb * 1e6:
        raise SystemExit(f"error: model.safetensors is {size / 1e6:.1f} MB > {max_mb} MB budget")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # drop stale files of an older export (same folder is ours)
        if f.is_file() and not (tmp / f.name).exists():
            f.unlink()
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
    return size


# --------------------------------------------------------------------------- main


def _corpus_sha(corpus: Path) -> dict[str, str] | None:
    m = corpus / "manifest.json"
    return json.loads(m.read_text()).get("sha256") if m.exists() else None


def _weights_sha(model: torch.nn.Module) -> str:
    """SHA-256 over the fp32 weights in name order: equal iff two runs trained bit-identically."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines past the resume point, so that replayed steps are not logged twice."""
    if not log.exists():
        return
    keep = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text(log, "".join(line + "\n" for line in keep))


@dataclass
class _Run:
    """What one invocation of the trainer works on (resumed from the work folder when it holds a run)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    train: dict[str, np.ndarray]
    valid: dict[str, torch.Tensor]
    recipe: dict
    state: dict
    log_path: Path


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the uspx gpt_oss teacher.")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer"))
    ap.add_argument("--work", type=Path, default=Path("runs/teacher"))
    ap.add_argument("--out", type=Path, default=Path("src/uspx/data/teacher"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--aux-coef", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="pause (checkpoint, no export) after this many minutes of this invocation; "
                         "rerun the same command to resume. 0: no limit")
    ap.add_argument("--pause-at", type=int, default=0,
                    help="pause (checkpoint, no export) after this step; rerun without it to resume")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, then exit")
    ap.add_argument("--no-export", action="store_true")
    return ap.parse_args(argv)


def _start(a: argparse.Namespace) -> _Run:
    """Data, model and optimiser, resumed from ``a.work`` when it holds a run of the same recipe."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
    cache = a.work / "tokens"
    train = tokenize_split(a.corpus, a.tokenizer, "train", cache)
    valid = fixed_windows(tokenize_split(a.corpus, a.tokenizer, "validation", cache), 16, a.seq_len)
    print("train tokens per family:", {f: len(s) for f, s in train.items()}, flush=True)

    config = teacher_config(len(tok), tok.eos_token_id, a.aux_coef)
    model = build_model(config, a.seed)
    print(f"parameters: {n_params(model):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    a.work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "corpus_sha256": _corpus_sha(a.corpus),
        "tokenizer_sha256": hashlib.sha256((a.tokenizer / "tokenizer.json").read_bytes()).hexdigest(),
        **{k: getattr(a, k) for k in ("steps", "batch", "seq_len", "lr", "warmup", "aux_coef", "seed")},
    }
    state = load_checkpoint(a.work, model, opt) or {"step": 0, "elapsed_s": 0.0, "history": [], "recipe": recipe}
    changed = sorted(k for k in recipe if state.get("recipe", {}).get(k) != recipe[k])
    if changed:
        raise SystemExit(f"error: {a.work} holds a run with a different {', '.join(changed)}; "
                         "resuming would mix two recipes: use another --work folder or delete this one")
    if state["step"]:
        print(f"resumed at step {state['step']} ({state['elapsed_s'] / 60:.1f} min spent)", flush=True)
    log_path = a.work / "train_log.jsonl"
    _truncate_log(log_path, state["step"])
    return _Run(model, opt, train, valid, recipe, state, log_path)


def _step(run: _Run, a: argparse.Namespace, step: int) -> tuple[float, float, float, float]:
    """One optimiser step (the ``step``-th, from 0): (loss, aux loss, learning rate, gradient norm)."""
    # Per-step generator: the batch at step s is the same whether or not we resumed.
    gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
    x, _ = sample_batch(run.train, a.batch, a.seq_len, gen)
    lr = lr_at(step, a.steps, a.lr, a.warmup)
    for g in run.opt.param_groups:
        g["lr"] = lr
    loss, aux = lm_loss(run.model, x, True)
    total = loss + a.aux_coef * aux
    run.opt.zero_grad(set_to_none=True)
    total.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0))
    run.opt.step()
    return float(loss.detach()), float(aux.detach()), lr, gnorm


def _record(run: _Run, a: argparse.Namespace, rec: dict, ema: float) -> None:
    """Validate when due, append ``rec`` to the training log every 10 steps (and at validations)."""
    step = rec["step"]
    if step % a.eval_every == 0 or step == a.steps:
        rec["valid"] = evaluate(run.model, run.valid)
        print(f"\nstep {step} valid {json.dumps({k: round(v, 3) for k, v in rec['valid'].items()})}", flush=True)
    if step % 10 == 0 or "valid" in rec:
        with open(run.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
    if "valid" in rec:
        run.state["history"].append({"step": step, "valid": rec["valid"], "train_ema": ema})


def _finish(run: _Run, a: argparse.Namespace, step: int, ema: float) -> None:
    """Final validation, ``summary.json`` in the work folder, and the export unless ``--no-export``."""
    state, model = run.state, run.model
    state["step"] = step
    if "valid" not in (state["history"][-1] if state["history"] else {}) or state["history"][-1]["step"] != step:
        v = evaluate(model, run.valid)
        state["history"].append({"step": step, "valid": v, "train_ema": ema})
    summary = {
        "steps": step, "batch": a.batch, "seq_len": a.seq_len, "tokens_seen": step * a.batch * a.seq_len,
        "wall_minutes": state["elapsed_s"] / 60, "params": n_params(model), "final_valid": state["history"][-1]["valid"],
        "final_train_loss_ema": ema, "aux_coef": a.aux_coef, "lr": a.lr, "seed": a.seed,
        "threads": a.threads, "warmup": a.warmup, "corpus_sha256": run.recipe["corpus_sha256"],
        "tokenizer_sha256": run.recipe["tokenizer_sha256"], "weights_fp32_sha256": _weights_sha(model),
        "history": state["history"],
    }
    tmp = a.work / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, a.work / "summary.json")
    print(json.dumps(summary), flush=True)
    if not a.no_export:
        size = export(model, a.tokenizer, a.out)
        tmp = a.out / "training_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, a.out / "training_summary.json")
        print(f"exported to {a.out} ({size / 1e6:.1f} MB)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume) the teacher; 0 when done, 3 when paused by ``--max-minutes`` or ``--pause-at``."""
    a = _arguments(argv)
    torch.set_num_threads(a.threads)
    from tqdm import tqdm

    run = _start(a)
    state = run.state
    t_prev = t_start = time.time()
    run.model.train()
    bar = tqdm(total=a.steps, initial=state["step"], desc="teacher", mininterval=5, file=sys.stdout)
    step = state["step"]
    ema = state.get("train_loss_ema")
    while step < a.steps:
        loss_f, aux_f, lr, gnorm = _step(run, a, step)
        step += 1
        now = time.time()
        state["elapsed_s"] += now - t_prev
        t_prev = now
        ema = loss_f if ema is None else 0.98 * ema + 0.02 * loss_f
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{aux_f:.3f}", lr=f"{lr:.1e}")
        if a.bench and step - state.get("bench_from", 0) >= a.bench:
            print(f"bench: {state['elapsed_s'] / step:.3f} s/step (batch {a.batch} x {a.seq_len})")
            return 0
        _record(run, a, {"step": step, "loss": loss_f, "aux": aux_f, "lr": lr, "gnorm": gnorm,
                         "elapsed_s": state["elapsed_s"]}, ema)
        out_of_time = bool(a.max_minutes) and time.time() - t_start > a.max_minutes * 60
        out_of_time = out_of_time or step == a.pause_at
        if step % a.save_every == 0 or step == a.steps or out_of_time:
            state["step"] = step
            state["args"] = {k: str(v) for k, v in vars(a).items()}
            state["train_loss_ema"] = ema
            save_checkpoint(a.work, step, run.model, run.opt, state)
        if out_of_time:
            bar.close()
            print(f"\npaused at step {step}: rerun the same command to resume", flush=True)
            return 3
    bar.close()
    _finish(run, a, step, ema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
