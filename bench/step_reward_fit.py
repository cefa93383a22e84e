"""How well could a reward of each input explain the labels' signal? For each finished run, fit the best linear
reward of each of the reward model's possible inputs to the true returns of the run's segments (what the oracle's
labels are about), by least squares, and see how well it follows the true reward of each step, which the agent
is paid by.

    .venv/bin/python bench/step_reward_fit.py --runs bench/out/paper-500k/HalfCheetah-v5-700labels-s{0..3}

Inputs (contract.REWARD_INPUTS and REWARD_STATES), each a linear r(x) = w.x + b of the step's x:
  before     obs[t], the state the step started from (the default reward model's input)
  after-T-1  obs[t+1], the state the step led to, for the first T-1 steps of a segment (--reward-state after)
  after      next_obs[t], the state the step led to, all T steps
  obs+next   (obs[t], next_obs[t]), both
For each: return_r2, the share of the variance of the segment returns the fit explains (the labels compare
returns, so a fit of 1.0 would order every pair right), and step_corr, the correlation of the fitted per-step
reward with the true one over all steps of all segments. Also the correlation of one observation feature
(--feature, default 8: HalfCheetah's forward speed; for Hopper 5) before and after each step with the step's true
reward. Needs segment files with next_obs (runs of 2026-12-02 and later). Prints a table, one row per run, and
the mean.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402

INPUTS = ("before", "after-T-1", "after", "obs+next")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run directories with segment files")
    p.add_argument("--feature", type=int, default=8, help="observation feature whose correlations to print")
    return p.parse_args(argv)


def step_inputs(segments):
    """Each input's per-step x and the true per-step reward: {name: (x (S, T', D), rewards (S, T'))}."""
    obs, led_to, rewards = segments["obs"], segments["next_obs"], segments["rewards"]
    return {"before": (obs, rewards), "after-T-1": (obs[:, 1:], rewards[:, :-1]), "after": (led_to, rewards),
            "obs+next": (np.concatenate([obs, led_to], -1), rewards)}


def linear_fit(x, rewards, returns):
    """The least-squares linear reward of x (S, T', D) whose segment sums best match returns (S,) (every step
    of the segment, T, counts in the return even where x covers T' < T of them). Returns (return_r2, step_corr)."""
    s, t, d = x.shape
    design = np.concatenate([x.sum(1), np.full((s, 1), t)], 1).astype(np.float64)  # (S, D+1): sum of w.x + b
    w, *_ = np.linalg.lstsq(design, returns, rcond=None)
    residual = returns - design @ w
    return_r2 = 1 - residual.var() / returns.var()
    step = x.reshape(-1, d) @ w[:-1]
    return float(return_r2), float(np.corrcoef(step, rewards.reshape(-1))[0, 1])


def main():
    args = parse_args()
    header = (["run", "segments"] + [f"{name} {m}" for name in INPUTS for m in ("return_r2", "step_corr")]
              + [f"obs[{args.feature}] before", f"obs[{args.feature}] after"])
    rows = []
    for run in args.runs:
        segments = C.load_segments(run)
        if segments is None or "next_obs" not in segments:
            raise SystemExit(f"step_reward_fit: {run} has no segment files with next_obs (written 2026-12-02 "
                             f"or later)")
        returns = segments["rewards"].sum(1).astype(np.float64)
        row = []
        for name, (x, rewards) in step_inputs(segments).items():
            row += linear_fit(x, rewards, returns)
        r = segments["rewards"].reshape(-1)
        for states in (segments["obs"], segments["next_obs"]):
            row.append(float(np.corrcoef(states[..., args.feature].reshape(-1), r)[0, 1]))
        rows.append((os.path.basename(os.path.normpath(run)), len(returns), row))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, n, row in rows:
        print(f"| {name} | {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    mean = np.mean([row for _, _, row in rows], 0)
    print(f"| mean of {len(rows)} | {sum(n for _, n, _ in rows)} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")


if __name__ == "__main__":
    C.run_main(main)
