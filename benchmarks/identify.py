"""How long a site takes to answer "who are you": by loading its base model, and from the base's files alone.

    python benchmarks/identify.py [--repeats 3] [--recipe recipes/quickstart.yaml] [--json f]

Each answer runs in a fresh process, as a Flower ClientApp does for every message: the wall time counts the
interpreter's start and every import, and "in call" the identification itself. The load-based answers build the
workbench as ``describe`` did before (float32, bfloat16 and, when bitsandbytes imports, 4-bit); the file-based
answer is :func:`fedlora_cli.model.fingerprint.of_recipe`. Every answer's fingerprint is printed: they must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CHILD = """import json, sys, time
started = time.perf_counter()
from fedlora_cli import recipe as recipes
recipe = recipes.load(sys.argv[1])
site = json.loads(sys.argv[2])
if site is None:
    from fedlora_cli.model import fingerprint
    value = fingerprint.of_recipe(recipe, 2)
else:
    from fedlora_cli.federation.common import build_for_site
    value = build_for_site(recipe, 2, None, site).fingerprint
print(json.dumps({"fingerprint": value, "seconds": time.perf_counter() - started, "torch": "torch" in sys.modules}))
"""


def ways() -> dict[str, dict | None]:
    """Name -> the site settings of a load-based answer, or None for the file-based one."""
    loads = {"load float32": {}, "load bfloat16": {"model.dtype": "bfloat16"}}
    if find_spec("bitsandbytes") is not None:
        loads["load 4-bit"] = {"model.quantization": "4bit"}
    return {**loads, "files": None}


def answer(recipe: Path, site: dict | None) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(recipe), json.dumps(site)], capture_output=True,
                          text=True, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {**json.loads(done.stdout.splitlines()[-1]), "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in ways()}
    for _ in range(args.repeats):
        for name, site in ways().items():
            runs[name].append(answer(args.recipe, site))
    print(f"# identification of {args.recipe.name}'s base, {args.repeats} fresh processes each, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print("| answer | wall s (median) | in call s (median) | torch imported | fingerprint |")
    print("|---|---|---|---|---|")
    for name, values in runs.items():
        wall = statistics.median(v["wall"] for v in values)
        inner = statistics.median(v["seconds"] for v in values)
        prints = sorted({v["fingerprint"] for v in values})
        print(f"| {name} | {wall:.2f} | {inner:.2f} | {values[0]['torch']} | {', '.join(prints)} |")
    if len({v["fingerprint"] for values in runs.values() for v in values}) != 1:
        sys.exit("the answers disagree: the file-based fingerprint is not the loaded workbench's")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
