"""llama.cpp against transformers on the same tokens: do uspx's GGUF files run as the checkpoints do?

    pip install llama-cpp-python            # compiles the vendored llama.cpp (about 10-20 minutes on 2 cores)
    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/src   # its source: the converter
    python bench/runtime_llama.py --llama-cpp /tmp/src/llama_cpp_python-*.tar.gz

Four GGUF files, each beside the Hugging Face checkpoint it stands for:

1. the bundled teacher (``uspx export --format gguf``, f32);
2. its pruned export for ``python_dev`` at keep 50% (``uspx extract``, then ``uspx export``, f32);
3. the teacher's GGUF pruned in place by the same plan (``uspx prune-gguf``), against the same export;
4. an MXFP4 gpt-oss checkpoint (the tiny random stand-in of the test suite) pruned to half its
   experts and converted with MXFP4 experts kept (tensor types read back), against transformers'
   dequantized load.

For each: llama.cpp's token ids against the tokenizer's on every held-out text (the pre-tokenizer
check), then the same token ids through llama.cpp (``llama_cpp.Llama``, all logits) and through
transformers in float32: perplexity on every predicted token, the relative perplexity difference,
top-1 agreement between the two runtimes, and the largest logit difference. Goal: perplexities
within 0.1%. Writes ``<out>/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def compare(gguf_file: Path, hf_dir: Path, token_lists: list[list[int]], threads: int) -> dict:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    kw = {}
    if "quantization_config" in json.loads((hf_dir / "config.json").read_text()):
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kw).eval()
    n_ctx = max(len(t) for t in token_lists) + 8
    llm = Llama(str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads)
    nll_l = nll_h = 0.0
    agree = count = 0
    worst = 0.0
    for ids in token_lists:
        llm.reset()
        llm.eval(ids)
        a = np.array(llm.scores[: len(ids)], dtype=np.float64)
        with torch.no_grad():
            b = hf(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        targets = np.array(ids[1:])
        for logits, total in ((a, "l"), (b, "h")):
            z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
            nll = -(z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(-1))).sum()
            if total == "l":
                nll_l += nll
            else:
                nll_h += nll
        agree += int((a[:-1].argmax(-1) == b[:-1].argmax(-1)).sum())
        count += len(targets)
        worst = max(worst, float(np.abs(a - b).max()))
    ppl_l, ppl_h = math.exp(nll_l / count), math.exp(nll_h / count)
    return dict(tokens=count, ppl_llama_cpp=ppl_l, ppl_transformers=ppl_h, ppl_rel_diff=ppl_l / ppl_h - 1,
                top1_agreement=agree / count, max_abs_logit_diff=worst)


def _half_experts_bytes(model: Path) -> int:
    """The stored bytes of ``model`` with half its experts (no KV cache): the joint cut's budget."""
    from uspx.extract import checkpoint_dtype
    from uspx.plan import memory as mem

    params = mem.count_params(mem.load_config(model))
    return mem.estimate(params, checkpoint_dtype(model), context=0, experts_per_layer=params.num_experts // 2).total_bytes


def main() -> None:
    from transformers import AutoTokenizer

    from uspx.extract import extract
    from uspx.io import write_json
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.models.synthetic import write_gpt_oss
    from uspx.prune.gguf_export import export_gguf, gguf_tensors
    from uspx.prune.gguf_file import prune_gguf
    from uspx.workload import load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source (checkout or llama-cpp-python .tar.gz)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=60, help="held-out items of python_dev and of mixed, each")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_llama_cpp")
    ap.add_argument("--dense-student", type=Path,
                    help="also a dense student's folder (`uspx student RUN --base PATH`, its model/): converted, and "
                         "compared on its own tokenizer's ids")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tok = AutoTokenizer.from_pretrained(BUNDLED_TEACHER)
    texts = []
    for name in ("python_dev", "mixed"):
        part = load_workload(name).part("heldout").items[: args.items]
        texts += [it.prompt + (it.completion or "") for it in part]
    token_lists = [tok.encode(t, add_special_tokens=False)[:512] for t in texts]
    token_lists = [t for t in token_lists if len(t) >= 2]

    run = args.out / "python_dev-50"
    if not (run / "report.json").exists():
        extract("default", "python_dev", run, keep="50%", speed=False, progress=False)
    kept = {int(l): v for l, v in json.loads((run / "plan.json").read_text())["kept"].items()}
    files = {"teacher": args.out / "teacher.gguf", "export": args.out / "export.gguf",
             "in_place": args.out / "in_place.gguf"}
    if not files["teacher"].exists():
        export_gguf(BUNDLED_TEACHER, files["teacher"], llama_cpp=args.llama_cpp, outtype="f32")
    if not files["export"].exists():
        export_gguf(run / "model", files["export"], llama_cpp=args.llama_cpp, outtype="f32")
    if not files["in_place"].exists():
        prune_gguf(files["teacher"], kept, files["in_place"])

    # the pre-tokenizer check: llama.cpp's ids against the tokenizer's, on every text
    from llama_cpp import Llama

    vocab = Llama(str(files["teacher"]), vocab_only=True, verbose=False)
    same = sum(vocab.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t, add_special_tokens=False)
               for t in texts)

    # an MXFP4 gpt-oss checkpoint: random weights at toy size, the teacher's tokenizer and vocabulary
    mx = args.out / "mxfp4"
    if not (mx / "config.json").exists():
        write_gpt_oss(mx, "tiny", vocab_size=len(tok))
        tok.save_pretrained(mx)
    mx_run = args.out / "mxfp4-50"
    if not (mx_run / "report.json").exists():
        extract(mx, "python_dev", mx_run, keep="50%", speed=False, progress=False)
    files["mxfp4"] = args.out / "mxfp4-export.gguf"
    if not files["mxfp4"].exists():
        export_gguf(mx_run / "model", files["mxfp4"], llama_cpp=args.llama_cpp)
    mx_lists = token_lists

    # the joint cut (fewer and narrower experts) at the bytes of half the experts: the teacher in
    # f16, and the MXFP4 stand-in with its experts narrowed in whole blocks and kept MXFP4
    joint = {}
    for name, model, outtype in (("teacher", BUNDLED_TEACHER, "f16"), ("mxfp4", mx, None)):
        folder = args.out / f"{name}-joint"
        if not (folder / "report.json").exists():
            budget = _half_experts_bytes(model)
            extract(model, "python_dev", folder, budget=budget, context=0, compare=False, speed=False, progress=False)
        joint[name] = folder
        files[f"{name}-joint"] = args.out / f"{name}-joint.gguf"
        if not files[f"{name}-joint"].exists():
            export_gguf(folder / "model", files[f"{name}-joint"], llama_cpp=args.llama_cpp,
                        **({"outtype": outtype} if outtype else {}))

    students = []
    if args.dense_student is not None:
        model_dir = args.dense_student / "model" if (args.dense_student / "model").is_dir() else args.dense_student
        files["student"] = args.out / "dense-student.gguf"
        if not files["student"].exists():
            export_gguf(model_dir, files["student"], llama_cpp=args.llama_cpp, outtype="f32")
        s_tok = AutoTokenizer.from_pretrained(model_dir)
        pairs = [(t, ids) for t in texts if len(ids := s_tok.encode(t, add_special_tokens=False)[:512]) >= 2]
        s_lists = [ids for _, ids in pairs]
        s_vocab = Llama(str(files["student"]), vocab_only=True, verbose=False)
        s_same = sum(s_vocab.tokenize(t.encode(), add_bos=False, special=False)[:512] == ids for t, ids in pairs)
        print(f"dense student: llama.cpp's ids equal its tokenizer's on {s_same} of {len(s_lists)} texts", flush=True)
        students.append(("dense student of another family (f32)", files["student"], model_dir, s_lists))

    rows = {}
    for name, gguf_file, hf_dir, lists in (
            ("teacher", files["teacher"], BUNDLED_TEACHER, token_lists),
            ("pruned export (50%)", files["export"], run / "model", token_lists),
            ("teacher GGUF pruned in place (50%)", files["in_place"], run / "model", token_lists),
            ("MXFP4 gpt-oss stand-in, pruned (50%)", files["mxfp4"], mx_run / "model", mx_lists),
            ("joint cut of the teacher (f16)", files["teacher-joint"], joint["teacher"] / "model", token_lists),
            ("joint cut of the MXFP4 stand-in", files["mxfp4-joint"], joint["mxfp4"] / "model", mx_lists),
            *students):
        rows[name] = dict(compare(gguf_file, hf_dir, lists, args.threads), gguf=str(gguf_file),
                          bytes=gguf_file.stat().st_size, tensor_types=gguf_tensors(gguf_file)["tensor_types"])
        r = rows[name]
        print(f"{name:40s} ppl llama.cpp {r['ppl_llama_cpp']:.4f} transformers {r['ppl_transformers']:.4f} "
              f"({100 * r['ppl_rel_diff']:+.4f}%), top-1 {r['top1_agreement']:.4f}", flush=True)
    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/runtime_llama.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        seconds=round(time.perf_counter() - started, 1), tokenizer_check=dict(texts=len(texts), identical=int(same)),
        rows=rows))
    print(f"\ntokenizer: llama.cpp's ids equal the tokenizer's on {same} of {len(texts)} texts\n")
    print("| GGUF | against | tokens | perplexity llama.cpp | perplexity transformers | difference | top-1 agreement | max abs logit diff | tensor types |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["tensor_types"].items()))
        print(f"| {name} | transformers, fp32 | {r['tokens']:,} | {r['ppl_llama_cpp']:.4f} | {r['ppl_transformers']:.4f} | "
              f"{100 * r['ppl_rel_diff']:+.4f}% | {r['top1_agreement']:.4f} | {r['max_abs_logit_diff']:.2e} | {types} |")


if __name__ == "__main__":
    main()
