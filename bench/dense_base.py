"""A dense base of another family and tokenizer, distilled from the bundled MoE teacher, against the
original, the pruned (and recovered) MoE and the expert-built student, on the same held-out items.

    python bench/dense_base.py [--user python_dev] [--keep 50%] [--pretrain-steps 500] [--threads 2]

No pretrained weights can be downloaded where uspx is developed, so the base is made here, from
nothing, in minutes: a llama-family model (4 decoder layers, hidden size 192, grouped-query
attention, tied embeddings, about 1.9 M parameters, 128-token sequences) with its own byte-level BPE tokenizer of 2048
tokens (the teacher has 4096 of its own), both trained on the *train* split of the teacher's corpus
(Python standard library sources, its docstrings and pydoc topics, generated arithmetic), rebuilt
here from the same functions ``teacher/corpus.py`` uses; the user workloads come from the corpus'
*test* split, so the base never sees a held-out item. It stands in for the 7-8B dense base a user
would bring (a llama, qwen2 or mistral checkpoint): same code path (any local causal LM folder,
another tokenizer, LoRA on every linear layer merged into the export), far less knowledge, so its
absolute figures say nothing about a real base; what carries over is the pipeline and the units.

In one run, on the same machine and data:

1. corpus, tokenizer and base (cached in ``<out>/base``: a rerun reuses them; seeds fixed);
2. ``uspx extract default USER --keep K`` and ``uspx recover`` on it (``--recover-steps``);
3. the expert-built student, ``uspx student RUN -m M`` (M = the teacher's top-k: equal active
   parameters per token with the pruned MoE), ``--student-steps``;
4. ``uspx student RUN --base <out>/base`` (LoRA, ``--distill-steps``), which judges the original,
   the base before and after distillation, the pruned and recovered MoE and the expert-built
   student on the same held-out items, in nats per character and per teacher token, with weight
   bytes and prefill / decode speed (each model in its own tokens per second, and characters per
   second of decoding from its characters per token).

Writes ``<out>/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # teacher/ (the corpus functions) is not installed
EOS = "<|endoftext|>"


def corpus(out: Path, mb: float) -> dict[str, list[str]]:
    """The train and validation documents of the teacher's corpus families that need no system
    packages (python, prose, arith), each family capped at ``mb`` MB of the train split."""
    from teacher.corpus import arith_docs, docstring_docs, pydoc_topic_docs, python_docs, split_of

    path = out / "corpus.json"
    if path.exists():
        return json.loads(path.read_text())
    families = {"python": python_docs(), "prose": pydoc_topic_docs() + docstring_docs(),
                "arith": arith_docs(int(mb * 1e6))}
    docs: dict[str, list[str]] = {"train": [], "validation": []}
    for name, found in families.items():
        size = 0
        for d in sorted(found, key=lambda d: d.digest):  # a fixed order, whatever the file system's
            split = split_of(d.text)
            if split == "validation" and len(docs["validation"]) < 400:
                docs["validation"].append(d.text)
            elif split == "train" and size < mb * 1e6:
                docs["train"].append(d.text)
                size += len(d.text.encode())
    random.Random(0).shuffle(docs["train"])
    path.write_text(json.dumps(docs))
    return docs


def tokenizer(out: Path, texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], min_frequency=2,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    fast.save_pretrained(out)
    return fast


def pretrain(out: Path, docs: dict[str, list[str]], tok, steps: int, seq: int, batch: int, seed: int) -> dict:
    """Next-token pretraining of the base on the packed train documents; saved in bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "pretrain.json").exists():
        return json.loads((out / "pretrain.json").read_text())
    eos = tok.convert_tokens_to_ids(EOS)
    ids = np.concatenate([np.array(tok.encode(t) + [eos], dtype=np.int64) for t in docs["train"]])
    val = [torch.tensor(tok.encode(t)[: seq + 1]) for t in docs["validation"][:64]]
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=192, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos,
                                  eos_token_id=eos, pad_token_id=eos, rms_norm_eps=1e-5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        at = rng.integers(0, len(ids) - seq - 1, batch)
        x = torch.from_numpy(np.stack([ids[a : a + seq + 1] for a in at]))
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        nll = [float(model(input_ids=v[None], labels=v[None]).loss) * (len(v) - 1) for v in val if len(v) > 1]
    chars = sum(len(tok.decode(v[1:])) for v in val if len(v) > 1)
    model.to(torch.bfloat16).save_pretrained(out)  # a base checkpoint as released: bf16
    info = dict(steps=steps, seq=seq, batch=batch, tokens_seen=steps * seq * batch, seconds=time.perf_counter() - started,
                params=sum(p.numel() for p in model.parameters()), train_documents=len(docs["train"]),
                train_tokens=int(len(ids)), final_train_loss=float(np.mean(losses[-50:])),
                validation_nats_per_token=sum(nll) / sum(len(v) - 1 for v in val if len(v) > 1),
                validation_nats_per_char=sum(nll) / chars, threads=torch.get_num_threads(), seed=seed)
    (out / "pretrain.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    from uspx.extract import extract
    from uspx.recover import Settings, recover
    from uspx.student import student
    from uspx.student.dense import dense_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--user", default="python_dev")
    ap.add_argument("--keep", default="50%")
    ap.add_argument("--mb-per-family", type=float, default=2.0)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--recover-steps", type=int, default=60)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--generated", type=int, default=2, help="continuations the original writes per calibration "
                    "prompt, for recovery, the expert-built student and the distillation")
    ap.add_argument("--train", default="lora", choices=["lora", "full"])
    ap.add_argument("--lr", type=float, default=2e-3, help="distillation learning rate (a small base, few steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = args.out / "base"
    base.mkdir(parents=True, exist_ok=True)
    docs = corpus(args.out, args.mb_per_family)
    tok = tokenizer(base, docs["train"], args.vocab)
    info = pretrain(base, docs, tok, args.pretrain_steps, 128, 16, 0)
    print(f"base: {info['params']:,} parameters, {info['tokens_seen']:,} tokens in {info['seconds']:.0f} s; "
          f"validation {info['validation_nats_per_token']:.3f} nats/token, {info['validation_nats_per_char']:.3f} "
          "nats/char", flush=True)
    run = args.out / f"{args.user}-{args.keep.strip('%')}"
    if not (run / "report.json").exists():
        extract("default", args.user, run, keep=args.keep, speed=False, progress=False)
    if args.recover_steps and not (run / "recover" / "recover.json").exists():
        recover(run, settings=Settings(steps=args.recover_steps, generated=args.generated), progress=False)
    top_k = 4  # the bundled teacher's experts per token
    if args.student_steps and not (run / f"student-{top_k}" / "student.json").exists():
        student(run, experts_per_layer=top_k, settings=Settings(steps=args.student_steps, generated=args.generated),
                speed=False, progress=False)
    t0 = time.perf_counter()
    res = dense_student(run, base, settings=Settings(train=args.train, steps=args.distill_steps, ce=1.0, lr=args.lr,
                                                         generated=args.generated),
                        out_dir=run / f"dense-{args.train}", progress=False)
    res["wall_seconds"] = time.perf_counter() - t0
    _table(res)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/dense_base.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                          if k != "out"),
        seconds=round(time.perf_counter() - started, 1), base=info, dense=res), indent=1))


def _table(res: dict) -> None:
    print("\n| model | held-out delta, nats/char | nats/teacher token | weights | prefill tok/s | decode tok/s | "
          "decode chars/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {"original": None, **res["heldout"]}
    for name, fams in rows.items():
        sp = res["speed"].get(name) or {}
        row = fams["all"] if fams else None
        cpt = row["chars_per_token"]["candidate"] if row else next(iter(res["heldout"].values()))["all"][
            "chars_per_token"]["teacher"]
        cell = lambda v: f"{v:+.4f}" if v is not None else "0"  # noqa: E731
        print(f"| {name} | {cell(row and row['delta_per_char'])} | {cell(row and row['delta_per_teacher_token'])} | "
              f"{res['sizes'][name] / 2**20:.1f} MiB | {sp.get('prefill_tokens_per_s', 0):.0f} | "
              f"{sp.get('decode_tokens_per_s', 0):.1f} | {sp.get('decode_tokens_per_s', 0) * cpt:.1f} |")


if __name__ == "__main__":
    main()
