"""docs/img/introspection_report.png (the whole report.html, rendered by headless Chromium) and the
report's own figures that docs/introspection.md shows (introspection_k_ablation.png,
introspection_attention.png, introspection_cache.png, copied from REPORT/figures/).

The page is laid out 1160 CSS px wide (the report's 1100 px column and its margins) and captured at a
device scale factor of 0.75, so the PNG is 870 px wide; the window is tall, the empty bottom is cropped
and the image is reduced to a 256-colour palette (the report is text and flat-colour plots, so this
loses nothing visible and keeps the PNG small).

    python bench/introspection/report_images.py [--report runs/analyze_teacher/report] [--out docs/img]
        [--chromium chromium] [--width 1160] [--scale 0.75]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FIGURES = ("introspection_k_ablation", "introspection_attention", "introspection_cache")


def screenshot(html: Path, png: Path, chromium: str, width: int, scale: float, height: int = 16000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--force-device-scale-factor={scale}",
                        f"--screenshot={shot}", html.resolve().as_uri()],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        img = Image.open(shot).convert("RGB")
    a = np.asarray(img)
    bg = a[-1, 0]
    rows = np.nonzero((a != bg).any(axis=(1, 2)))[0]
    bottom = min(a.shape[0], int(rows[-1]) + 24) if len(rows) else a.shape[0]
    if bottom >= int(height * scale) - 1:
        raise SystemExit(f"page taller than {height} px: raise the window height")
    img.crop((0, 0, a.shape[1], bottom)).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    print(f"wrote {png} ({a.shape[1]} x {bottom})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="runs/analyze_teacher/report")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--width", type=int, default=1160, help="layout width in CSS px")
    ap.add_argument("--scale", type=float, default=0.75, help="device scale factor (PNG width = width x scale)")
    a = ap.parse_args()
    report, out = Path(a.report), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    screenshot(report / "report.html", out / "introspection_report.png", a.chromium, a.width, a.scale)
    for name in FIGURES:
        shutil.copyfile(report / "figures" / f"{name}.png", out / f"{name}.png")
        print(f"copied {report / 'figures' / name}.png -> {out / name}.png")


if __name__ == "__main__":
    main()
