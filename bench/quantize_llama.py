"""What pruning and quantization each cost, in llama.cpp: the bundled teacher and its pruned export
(``uspx extract default python_dev --keep 50%``), each converted to GGUF and quantized by llama.cpp's
llama-quantize to F16, Q8_0 and Q4_K_M (plain, and weighted by an importance matrix that
llama-imatrix made on python_dev's calibration items), every file judged by ``uspx eval`` against the
original checkpoint in transformers (float32): loss delta per family on the held-out items of
python_dev and of mixed, top-1 agreement, KL, size, speed in llama.cpp.

    python bench/quantize_llama.py --llama-cpp /path/to/llama.cpp      # source checkout + bin/ or build/bin/

Writes ``<out>/results.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUANTS = ("F16", "Q8_0", "Q4_K_M")


def main() -> None:
    import torch

    from uspx.evaluate.gguf import evaluate_gguf
    from uspx.extract import extract
    from uspx.io import write_json
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.plan import memory as mem
    from uspx.prune.gguf_export import export_gguf, make_imatrix, quantize_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp: a checkout with its converter and built programs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "bench_llama_cpp" / "python_dev-50",
                    help="an extract run of the teacher on python_dev at keep 50%% (made when missing)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_quantize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (args.run / "model" / "config.json").exists():
        extract("default", "python_dev", args.run, keep="50%", speed=False, progress=False)

    rows = []
    for name, model in (("teacher", BUNDLED_TEACHER), ("pruned 50%", args.run / "model")):
        tag = name.split()[0]
        f32 = args.out / f"{tag}-f32.gguf"
        if not f32.exists():
            export_gguf(model, f32, llama_cpp=args.llama_cpp, outtype="f32")
        imatrix = args.out / f"{tag}-imatrix.gguf"
        if not imatrix.exists():
            make_imatrix(f32, "python_dev", imatrix, llama_cpp=args.llama_cpp, threads=args.threads)
        for quant, im in [(q, None) for q in QUANTS] + [("Q4_K_M", imatrix)]:
            label = quant + (" + imatrix (python_dev)" if im else "")
            path = args.out / f"{tag}-{quant.lower()}{'-imatrix' if im else ''}.gguf"
            if not path.exists():
                quantize_gguf(f32, path, quant, imatrix=im, llama_cpp=args.llama_cpp, threads=args.threads)
            # from the config: llama-quantize's rules need its row lengths and head layout
            planned = mem.estimate(model, quant.lower() if quant != "F16" else "fp16", context=0).weights_bytes
            row = dict(model=name, quant=label, gguf=str(path), planned_bytes=planned)
            for wl in ("python_dev", "mixed"):
                res = evaluate_gguf(BUNDLED_TEACHER, path, wl, threads=args.threads, speed=wl == "python_dev",
                                    out=args.out / f"{path.stem}-{wl}.json")
                row[wl] = {f: {k: r[k] for k in ("delta", "delta_ci95", "top1_agreement", "kl", "tokens")}
                           for f, r in res["families"].items()}
                row["size"] = res["size"]["candidate"]
                if "speed" in res:
                    row["speed"] = {k: res["speed"]["candidate"][k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            rows.append(row)
            print(f"{name:12s} {label:30s} " + " ".join(
                f"{f} {r['delta']:+.4f}" for wl in ("python_dev", "mixed") for f, r in row[wl].items()), flush=True)

    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), threads=args.threads), seconds=round(time.perf_counter() - started, 1),
        reference="the bundled teacher in transformers, float32", rows=rows))
    fams = list(rows[0]["mixed"])
    print("\n| model | GGUF | tensors MiB (planned) | python (python_dev) | " + " | ".join(f"{f} (mixed)" for f in fams)
          + " | top-1 python | decode tok/s |")
    print("|---|---|---:|---:|" + "---:|" * len(fams) + "---:|---:|")
    for r in rows:
        py = r["python_dev"]["python"]
        print(f"| {r['model']} | {r['quant']} | {r['size']['parameter_bytes'] / 2**20:.2f} ({r['planned_bytes'] / 2**20:.2f}) | "
              f"{py['delta']:+.4f} | " + " | ".join(f"{r['mixed'][f]['delta']:+.4f}" for f in fams)
              + f" | {py['top1_agreement']:.3f} | {r['speed']['decode_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
