"""Peak memory and time of preparing one 40-Mpx image at 224 px: the old full-size float64 path
against ``prepare_image``, side by side in one run, each call in a fresh process (its peak
resident memory counts PIL's and numpy's C buffers), and how far apart their outputs are.

    python bench/prepare_memory.py --json prepare_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from skinlesion.core.runtime import cpu_model

SIZE = (7300, 5500)  # (W, H): 40 Mpx, the service's pixel limit

# prepare_image before images over the pixel cap got their own path (same as the tests' copy).
_OLD = """
def old_prepare(path, size, interpolation, cc):
    import numpy as np
    from PIL import Image, ImageOps
    img = Image.open(path)
    img.load()
    img = ImageOps.exif_transpose(img)  # a copy, even with no turn to apply
    img = img if img.mode == "RGB" else img.convert("RGB")
    if cc:
        x = np.asarray(img).astype(np.float64) / 255.0
        illum = np.mean(x**6.0, axis=(0, 1)) ** (1.0 / 6.0)
        gains = np.where(illum > 1e-12, illum.mean() / np.maximum(illum, 1e-12), 1.0)
        img = Image.fromarray(np.rint(np.clip(x * gains * 255.0, 0.0, 255.0)).astype(np.uint8))
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    return np.asarray(img.resize((size, size), resample[interpolation], reducing_gap=3.0))
"""

_CHILD = (
    """
import json, resource, sys, time
import numpy as np
from skinlesion.data import colour  # before the baseline
from skinlesion.data.preprocess import prepare_image
"""
    + _OLD
    + """
which, path, cc, out_path = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
fn = old_prepare if which == "old" else prepare_image


def peak_bytes():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


# torch's 700 MB of mapped libraries could be paged out under pressure, hiding the growth.
assert "torch" not in sys.modules
before = peak_bytes()
t0 = time.perf_counter()
out = fn(path, 224, "bicubic", cc)
seconds = time.perf_counter() - t0
after = peak_bytes()
np.save(out_path, out)
print(json.dumps({"peak_mb": (after - before) / 2**20, "seconds": seconds}))
"""
)


def make_images(folder: Path) -> dict[str, Path]:
    """Smooth gradients with a colour cast: a baseline and a progressive JPEG, and a PNG."""
    ramp = Image.linear_gradient("L")
    bands = [ramp.resize(SIZE), ramp.rotate(90).resize(SIZE), ramp.rotate(45).resize(SIZE)]
    img = Image.merge(
        "RGB", [b.point(lambda v, k=k: 40 + v * (6 - k) // 8) for k, b in enumerate(bands)]
    )
    paths = {
        "JPEG": folder / "huge.jpg",
        "JPEG progressive": folder / "huge_progressive.jpg",
        "PNG": folder / "huge.png",
    }
    img.save(paths["JPEG"], quality=90)
    img.save(paths["JPEG progressive"], quality=90, progressive=True)
    img.save(paths["PNG"], compress_level=1)
    return paths


def measure(which: str, path: Path, cc: bool, out_path: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, which, str(path), str(int(cc)), str(out_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for fmt, path in make_images(folder).items():
            for cc in (False, True):
                old = measure("old", path, cc, folder / "old.npy")
                new = measure("new", path, cc, folder / "new.npy")
                diff = np.abs(np.load(folder / "old.npy").astype(int) - np.load(folder / "new.npy"))
                rows.append(
                    {
                        "image": f"{fmt}, {path.stat().st_size / 1e6:.2f} MB",
                        "colour_constancy": cc,
                        "old": old,
                        "new": new,
                        "max_diff": int(diff.max()),
                        "mean_diff": float(diff.mean()),
                    }
                )
    print(f"CPU: {cpu_model()}; image {SIZE[0]}x{SIZE[1]} prepared at 224x224, bicubic")
    print("| image | CC | old peak MB | new peak MB | old s | new s | diff max / mean |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        o, n = r["old"], r["new"]
        print(
            f"| {r['image']} | {'on' if r['colour_constancy'] else 'off'} | {o['peak_mb']:.0f} "
            f"| {n['peak_mb']:.0f} | {o['seconds']:.2f} | {n['seconds']:.2f} "
            f"| {r['max_diff']} / {r['mean_diff']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
