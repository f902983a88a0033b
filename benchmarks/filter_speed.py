"""How long one re-filter takes: the studio re-runs apply_filter on every slider move, so it has
to stay well under a frame of human patience (goal: <= 50 ms for 100k candidates x 4 rewards).

    .venv/bin/python benchmarks/filter_speed.py [--candidates 100000] [--runs 20]

Prints the median wall time per normalisation (and of select_for_training, which adds group
advantages and weights). Synthetic pool: groups of (1 + 4 variants) x 4 seeds, variant images a
little better on average, ~0.1 % NaN rewards.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import pandas as pd

from craft.stages.advantages import select_for_training
from craft.stages.filtering import FilterSettings, apply_filter

REWARDS = ("hps", "pick", "aes", "extra")


def synthetic_pool(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    df = pd.DataFrame({"candidate_id": idx, "prompt_id": idx // 20,
                       "variant_idx": (idx % 20) // 4, "seed": idx % 4})
    for name in REWARDS:
        values = rng.normal(size=n) + 0.2 * (df["variant_idx"].to_numpy() > 0)
        values[rng.random(n) < 0.001] = np.nan
        df[name] = values
    return df


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: first-call imports and allocations are not what a slider move costs
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    df = synthetic_pool(args.candidates)
    base = FilterSettings(rewards=REWARDS,
                          weights={"hps": 0.4, "pick": 0.4, "aes": 0.2, "extra": 0.1},
                          roles={"h": "hps", "p": "pick", "a": "aes"}, level="hpa", top_k=1000)
    print(f"{args.candidates} candidates x {len(REWARDS)} rewards, median of {args.runs} runs")
    for method in ("zscore", "rank", "minmax"):
        s = dataclasses.replace(base, normalization=method)
        ms = median_ms(lambda: apply_filter(df, s), args.runs)
        print(f"  apply_filter ({method:6s}):        {ms:7.1f} ms")
    print(f"  select_for_training (zscore): "
          f"{median_ms(lambda: select_for_training(df, base), args.runs):7.1f} ms")


if __name__ == "__main__":
    main()
