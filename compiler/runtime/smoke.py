"""GPU smoke runs used on the lent device (one script, several modes; prints a short table).

    python -m compiler.runtime.smoke decode ARTIFACT [STEPS]     a few steps (for compute-sanitizer)
    python -m compiler.runtime.smoke correct ARTIFACT...         32 greedy tokens vs bf16 PyTorch
    python -m compiler.runtime.smoke time ARTIFACT... [--kv 128,2048]   kernel ms/step of variants
    python -m compiler.runtime.smoke bench ARTIFACT [--batch16 ARTIFACT] [--out FILE.json]

`correct` uses synthetic weights drawn on the device (seed 0) and a seeded random prompt of 16
tokens: 32 greedy tokens free-running against the bf16 reference (`check.greedy_check`, identical
up to the first exact bf16 tie) and checked step by step against it teacher-forced
(`check.forced_check`); then the same 32 steps in one launch, which must be bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from typing import Any

import torch

from compiler.runtime.check import float32_check, float32_choices, forced_check, greedy_check
from compiler.runtime.session import Session


def decode(artifact: str, steps: int) -> None:
    s = Session(artifact, synthetic_seed=0, synthetic_on="device")
    prompt = [[(7 * i + 3 * b) % s.spec.vocab_size for i in range(5)] for b in range(s.batch)]
    first = s.prefill(prompt)
    a = s.decode(steps, tokens_per_launch=1)
    s.prefill(prompt)
    b = s.decode(steps, tokens_per_launch=steps)
    print(f"decode {artifact}: first {first.tolist()} tokens {a[:, 0].tolist()}")
    print(f"one launch per token == one launch: {torch.equal(a, b)}")


def correct(artifacts: list[str], steps: int = 32) -> list[dict[str, Any]]:
    rows = []
    for art in artifacts:
        t0 = time.perf_counter()
        s = Session(art, synthetic_seed=0, synthetic_on="device")
        load = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, s.spec.vocab_size, (s.batch, 16), generator=g)
        r = greedy_check(s, prompt, steps)
        one = s.last_decode_seconds or 0.0
        logits_one = s.logits
        s.prefill(prompt)
        multi = s.decode(steps, tokens_per_launch=steps)
        many = s.last_decode_seconds or 0.0
        same = torch.equal(multi.T.cpu(), torch.tensor(r.kernel)[:, 1:]) and torch.equal(
            s.logits, logits_one
        )
        f32 = float32_check(s, prompt, 4)
        forced = forced_check(s, prompt, steps)
        f32_choices = float32_choices(s, prompt, steps)
        row = {
            "float32_rel_err_max": max(f32),
            "model": s.spec.name,
            "template": s.manifest.template,
            "identical": r.identical,
            "forced_ok": forced.ok,
            "forced_agree": forced.agree,
            "forced_ties": forced.ties,
            "forced_near": forced.near,
            "forced_largest_near_gap": forced.largest_gap,
            "forced_wrong": list(forced.wrong),
            "forced_wrong_n": len(forced.wrong),
            "float32_same": f32_choices.same,
            "float32_differ": [list(d) for d in f32_choices.differ],
            "float32_differ_n": len(f32_choices.differ),
            "first_mismatch": r.first_mismatch,
            "ref_margin_at_mismatch": r.ref_margin,
            "logits_rel_err_vs_bf16": r.logits_rel_err,
            "multi_launch_bitwise_same": same,
            "ms_per_token_1_per_launch": 1e3 * one / steps,
            "ms_per_token_all_in_one": 1e3 * many / steps,
            "load_s": load,
            "kernel_tokens": r.kernel[0][:12],
            "reference_tokens": r.reference[0][:12],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del s
        torch.cuda.empty_cache()
    print(
        "| model | template | 32 tokens identical | first mismatch (ref margin) | "
        "teacher-forced: same argmax / exact bf16 tie / near-tie (largest gap) / wrong | "
        "teacher-forced float32: same argmax / other | logits rel err vs bf16 | "
        "vs float32 (4 teacher-forced steps) | "
        "1 launch == per-token | ms/token (1/launch, host timed) | ms/token (32/launch) |"
    )
    for w in rows:
        mm = "-" if w["identical"] else f"{w['first_mismatch']} ({w['ref_margin_at_mismatch']:.1e})"
        print(f"| {w['model']} | {w['template']} | {w['identical']} | {mm} | "
              f"{w['forced_agree']} / {w['forced_ties']} / {w['forced_near']} "
              f"({w['forced_largest_near_gap']:.1e}) / {w['forced_wrong_n']} | "
              f"{w['float32_same']} / {w['float32_differ_n']} | "
              f"{w['logits_rel_err_vs_bf16']:.1e} | "
              f"{w['float32_rel_err_max']:.1e} | {w['multi_launch_bitwise_same']} | "
              f"{w['ms_per_token_1_per_launch']:.3f} | {w['ms_per_token_all_in_one']:.3f} |")  # fmt: skip
    return rows


def timing(artifacts: list[str], kv_lens: tuple[int, ...] = (128,), reps: int = 100) -> None:
    """Median ms of one kernel step at each KV length (CUDA events), per artifact: to compare
    kernel variants (schedule options) without the baselines."""
    from compiler.runtime.bench import time_calls
    from compiler.schedule.schedule import Options

    defaults = Options().to_json()
    print("| artifact | options (not the Options() default) | KV len | ms/step (1 per launch) | "
          "ms/step (32 per launch) |")  # fmt: skip
    for art in artifacts:
        s = Session(art, synthetic_seed=0, synthetic_on="device")
        s.prefill_random(max(kv_lens) + 1)
        opts = {k: v for k, v in s.schedule.options.to_json().items() if v != defaults[k]}
        for kv in kv_lens:
            one = statistics.median(time_calls(partial(s.launch, 1, kv), reps, 10))
            many = statistics.median(time_calls(partial(s.launch, 32, kv), 8, 2)) / 32
            print(f"| {art} | {opts} | {kv} | {one:.3f} | {many:.3f} |", flush=True)
        del s
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.runtime.smoke")
    sub = p.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("decode")
    d.add_argument("artifact")
    d.add_argument("steps", type=int, nargs="?", default=4)
    c = sub.add_parser("correct")
    c.add_argument("artifacts", nargs="+")
    t = sub.add_parser("time")
    t.add_argument("artifacts", nargs="+")
    t.add_argument("--kv", default="128", help="KV lengths, comma-separated")
    b = sub.add_parser("bench")
    b.add_argument("artifact")
    b.add_argument("--batch16")
    b.add_argument("--out")
    b.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    print(torch.cuda.get_device_name(), flush=True)
    if a.mode == "decode":
        decode(a.artifact, a.steps)
    elif a.mode == "correct":
        correct(a.artifacts)
    elif a.mode == "time":
        timing(a.artifacts, tuple(int(x) for x in a.kv.split(",")))
    else:
        from compiler.runtime.bench import report, run_bench

        result = run_bench(
            a.artifact,
            batch16=a.batch16,
            compiled=not a.no_compile,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        print(report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
