"""Peak memory of loading a full-size Dual-AR checkpoint, per quantize mode.

Writes (once) a full-size S1-mini `model.pth` with random weights in bfloat16, the published
checkpoint's dtype, then loads it in a fresh process per mode through the server's own loader and
prints that process's peak RSS and the weights' bytes. The codec is not part of this figure
(see bench_codec.py).

    .venv/bin/python bench/bench_load_memory.py --dir /tmp/s1-mini-random --modes none int8 int4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

LOAD = """
import json, resource, sys, time
import torch
from engine.fish.config import parse_config
from engine.fish.dual_ar_loader import load_dual_ar
from engine.fish.presets import PUBLISHED_IDS, S1_MINI_CONFIG
from engine.fish.quantize import weight_bytes
ids = PUBLISHED_IDS["s1-mini"]
config = parse_config(S1_MINI_CONFIG).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
t0 = time.perf_counter()
model = load_dual_ar(__import__("pathlib").Path(sys.argv[1]), config, "cpu", torch.float32, sys.argv[2])
seconds = time.perf_counter() - t0
import gc; gc.collect()
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
print(json.dumps({"seconds": seconds, "weights_mib": weight_bytes(model) / 2**20, "rss_mib": rss,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_checkpoint(directory: Path) -> None:
    from engine.fish.dual_ar_loader import build_on_meta, init_random_weights
    from engine.fish.config import parse_config
    from engine.fish.presets import PUBLISHED_IDS, S1_MINI_CONFIG

    ids = PUBLISHED_IDS["s1-mini"]
    config = parse_config(S1_MINI_CONFIG).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
    model = init_random_weights(build_on_meta(config).to_empty(device="cpu"), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, directory / "model.pth")
    (directory / "config.json").write_text(json.dumps(S1_MINI_CONFIG))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/s1-mini-random"))
    ap.add_argument("--modes", nargs="*", default=["none", "int8", "int4"])
    args = ap.parse_args()
    if not (args.dir / "model.pth").is_file():
        t0 = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote {args.dir / 'model.pth'} in {time.perf_counter() - t0:.0f} s")
    print(f"checkpoint file: {(args.dir / 'model.pth').stat().st_size / 2**20:.0f} MiB (bfloat16)")
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-c", LOAD, str(args.dir), mode], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"quantize={mode:5} loaded in {r['seconds']:.1f} s, weights {r['weights_mib']:.0f} MiB, "
              f"RSS after loading {r['rss_mib']:.0f} MiB, peak RSS while loading {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
