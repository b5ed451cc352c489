"""Record the codes both decode paths generate on tiny checkpoints, to prove a refactor of the
sampling chain changed nothing.

    python -m scripts.codes_fingerprint --out before.json     # before the change
    python -m scripts.codes_fingerprint --check before.json   # after: exit 1 on any difference

Both families, greedy and seeded sampling (with and without a repetition penalty), each request
alone and several together in one batch, on the dynamic path and on static slots, 48 frames each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile

import torch

from engine.fish.generate import PrefixCache, generate_codes
from engine.fish.models import load_models
from engine.fish.prompt import build_prompt
from engine.fish.tiny import make_tiny_checkpoint
from engine.speech.types import SamplingOptions

FRAMES = 48
TEXTS = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog.",
         "One more sentence to speak.", "Short."]
OPTIONS = {
    "greedy": SamplingOptions(greedy=True),
    "default_seeded": SamplingOptions(seed=11),  # temperature 0.7, top_p 0.7, top_k 30, penalty 1.2
    "strong_penalty": SamplingOptions(seed=12, temperature=1.0, top_p=0.95, repetition_penalty=2.0),
    "no_penalty_topk5": SamplingOptions(seed=13, temperature=0.9, top_p=0.9, top_k=5, repetition_penalty=1.0),
}


def _step_together(runner, prompts, options) -> list[list[list[int]]]:
    gens = [runner.start(p, o, FRAMES) for p, o in zip(prompts, options)]
    frames: list[list[list[int]]] = [[] for _ in gens]
    while not all(g.finished for g in gens):
        for i, codes in enumerate(runner.step_many(gens)):
            if codes is not None:
                frames[i].append(codes.tolist())
    return frames


def record(family: str, workdir: str) -> dict[str, list]:
    checkpoint = make_tiny_checkpoint(f"{workdir}/{family}", family, seed=0)
    m = load_models(checkpoint, device="cpu", decode_slots=0)
    m.runner.prefix_cache = PrefixCache(0)
    prompts = [torch.as_tensor(build_prompt(m.tokenizer, m.family, t, num_codebooks=m.config.num_codebooks))
               for t in TEXTS]
    out: dict[str, list] = {}
    for name, opt in OPTIONS.items():
        out[f"dynamic/alone/{name}"] = generate_codes(m.runner, prompts[0], opt, FRAMES).T.tolist()
    names = list(OPTIONS)
    out["dynamic/batch"] = _step_together(m.runner, prompts, [OPTIONS[n] for n in names])
    m.runner.enable_static_decode(slots=4, use_cuda_graphs=False)
    for name, opt in OPTIONS.items():
        out[f"static/alone/{name}"] = generate_codes(m.runner, prompts[0], opt, FRAMES).T.tolist()
    out["static/batch"] = _step_together(m.runner, prompts, [OPTIONS[n] for n in names])
    return out


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def main() -> int:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the codes to this JSON file")
    group.add_argument("--check", help="compare with codes recorded earlier")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        codes = {f"{family}/{case}": value for family in ("s1-mini", "s2-pro")
                 for case, value in record(family, workdir).items()}
    for key, value in codes.items():
        lengths = [len(v) for v in value] if key.endswith("batch") else len(value)
        print(f"{key:40s} frames={lengths} sha={digest(value)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(codes, f)
        return 0
    with open(args.check) as f:
        want = json.load(f)
    differ = [k for k in want if codes.get(k) != want[k]] + [k for k in codes if k not in want]
    print("identical" if not differ else f"DIFFERENT: {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
