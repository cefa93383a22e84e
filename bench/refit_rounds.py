"""Refit a finished run's reward models round by round with other train_reward.py flags, and score each round's
model on the states the policy went to next: what a change to reward training would have done to the rewards
the agent was given, in under a minute per run instead of a whole loop per run.

    .venv/bin/python bench/refit_rounds.py --rounds 4 --runs bench/out/paper-1m/Hopper-v5-700labels-s{0..7} \
        --flags "" --flags "--l2-range 1e-5 0.1"

For each run, each --flags (the first is the baseline of the paired differences) and each round r = 0 .. ROUNDS-1:
fit the ensemble as loop.sh's train_reward.py call of round r did (warm-started from round r-1's fit, on the
labels asked up to round r and the segments collected up to it, so that its input normalisation is the one
train_reward.py set then), then score it on round r+1's segments, the policy's own rollouts after it had trained
on the run's round-r model:
  spearman   rank correlation of the predicted and the true segment returns
  pair_acc   share of all pairs of those segments that the predicted returns order as the true ones do
  step_corr  correlation of the per-step reward (each member normalised over these states, then averaged, as
             the policy is given it) with the true per-step reward
  spearman_others  (with two or more runs of one env) spearman on the other runs' round r+1 segments pooled: the
             same states for every run's model, so a lower figure is a worse model, not a policy that went elsewhere
With --flags "" the fits repeat the run's own models (the L2 coefficients are those of its metrics.jsonl); the
segments of round r+1 stay those of the run, whatever model is refitted. Prints a table (mean over runs, and each
variant's paired difference from the first with its standard error); --out writes every row as JSON lines.
"""
import argparse
import json
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402
import train_reward as TR  # noqa: E402

METRICS = ("spearman", "pair_acc", "step_corr")  # spearman_others is added with 2+ runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished loop runs (run directories)")
    p.add_argument("--rounds", type=int, default=4, help="refit rounds 0 .. ROUNDS-1 (each needs the next round)")
    p.add_argument("--flags", action="append", default=None,
                   help="train_reward.py flags of one variant, quoted; repeat for more (default: one, '')")
    p.add_argument("--out", default=None, help="write every (run, variant, round) row here as JSON lines")
    args = p.parse_args(argv)
    args.flags = args.flags or [""]
    if args.rounds < 1:
        p.error("argument --rounds: must be at least 1")
    return args


def check_rounds(run, segments, rounds):
    """One sentence if a run lacks the segments of rounds 0 .. ROUNDS (each round's model is scored on the next)."""
    if segments is None:
        raise C.UserError(f"{run} has no segments")
    if segments["round"].max() < rounds:
        raise C.UserError(f"{run} has {segments['round'].max() + 1} rounds of segments; --rounds {rounds} needs "
                          f"{rounds + 1} (each round's model is scored on the next round's segments)")


def segment_scores(model, x):
    """Per-step rewards (n, t) of segments x (n, t, D) as the policy is given them: each member normalised over
    these states, then the members averaged."""
    import torch
    n, t, d = x.shape
    with torch.no_grad():
        out = model(x.reshape(n * t, d))  # (K, n * t)
        return ((out - out.mean(1, keepdim=True)) / out.std(1, keepdim=True)).mean(0).reshape(n, t)


def refit(run, rounds, flags, segments, others=()):
    """The rows {round, labels, l2, spearman, pair_acc, step_corr[, spearman_others]} of one run refitted with
    train_reward flags; segments: the run's (a load_segments dict, checked by check_rounds), others: those of other
    runs of the same env."""
    import torch
    args = TR.parse_args(["--run", run] + shlex.split(flags))
    torch.set_num_threads(args.threads)
    config = C.open_run(run, create=False)
    seed = config["seed"] if args.seed is None else args.seed
    torch.manual_seed(seed)  # as train_reward.py's main: the same initial weights
    queries = C.read_queries(run)
    labels = [l for l in C.read_labels(run, queries) if C.preference_target(l["choice"]) is not None]
    if not labels:
        raise C.UserError(f"{run} has no labels")
    assert (np.diff(segments["round"]) >= 0).all(), "load_segments reads the segments in round order"
    index = {int(s): i for i, s in enumerate(segments["ids"])}
    x = torch.as_tensor(C.segment_reward_input(segments["obs"], segments["acts"], args.inputs, args.reward_state,
                                               segments.get("next_obs")))
    model, l2, rows = None, None, []
    for r in range(rounds):
        asked = [l for l in labels if queries[l["query_id"]]["round"] <= r]
        left, right, target = TR.label_tensors(asked, queries, index)
        is_val, counts = TR.split_labels([l["query_id"] for l in asked], args.members, args.val_fraction, seed)
        known = int((segments["round"] <= r).sum())  # the segments train_reward.py had in round r: a prefix
        model, l2, _ = TR.fit(x[:known], left, right, target, is_val, counts, args, model, l2, seed)

        following = np.flatnonzero(segments["round"] == r + 1)
        step_reward = segment_scores(model, x[following])  # (n, t)
        n, t = step_reward.shape
        true = segments["rewards"][following]  # (n, T)
        if true.shape[1] != t:  # a model of the state after sees T-1 steps of each segment
            true = true[:, :t]
        predicted, actual = step_reward.sum(1).numpy(), true.sum(1)
        i, j = np.triu_indices(n, 1)
        rows.append({"round": r, "labels": len(asked), "l2": [round(float(v), 4) for v in l2],
                     "spearman": TR.rank_correlation(predicted, actual),
                     "pair_acc": float(np.mean((predicted[i] > predicted[j]) == (actual[i] > actual[j]))),
                     "step_corr": float(np.corrcoef(step_reward.numpy().ravel(), true.ravel())[0, 1])})
        if others:
            inputs, returns = [], []
            for other in others:
                at = other["round"] == r + 1
                next_obs = other.get("next_obs")
                inputs.append(C.segment_reward_input(other["obs"][at], other["acts"][at], args.inputs,
                                                     args.reward_state, None if next_obs is None else next_obs[at]))
                returns.append(other["rewards"][at][:, :t].sum(1))
            scores = segment_scores(model, torch.as_tensor(np.concatenate(inputs))).sum(1).numpy()
            rows[-1]["spearman_others"] = TR.rank_correlation(scores, np.concatenate(returns))
    return rows


def main():
    args = parse_args()
    results = {}  # (flags, run) -> rows
    out = open(args.out, "a") if args.out else None
    for run in args.runs:
        C.open_run(run, create=False)  # one sentence if it is not a run directory
    segments = {run: C.load_segments(run) for run in args.runs}  # read once, whatever the variants
    for run, seg in segments.items():
        check_rounds(run, seg, args.rounds)
    shapes = {run: seg["obs"].shape[2:] + seg["acts"].shape[2:] for run, seg in segments.items()}
    if len(set(shapes.values())) > 1:
        raise C.UserError("--runs must all be runs of one env (spearman_others scores each run's model "
                          f"on the others' states); observation and action sizes: {shapes}")
    metrics = METRICS + ("spearman_others",) * (len(segments) > 1)
    for run in args.runs:
        others = [segments[o] for o in args.runs if o != run]
        for flags in args.flags:
            rows = refit(run, args.rounds, flags, segments[run], others)
            results[flags, run] = rows
            if out:
                for row in rows:
                    print(json.dumps({"run": run, "flags": flags, **row}), file=out, flush=True)
            print(f"refit: {run} [{flags}] " + ", ".join(f"r{row['round']} {row['pair_acc']:.3f}" for row in rows),
                  flush=True)
    print(f"\nmean over {len(args.runs)} runs; for each variant after the first, its paired difference from the "
          "first (± standard error)")
    print("| train_reward flags | round | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for flags in args.flags:
        for r in range(args.rounds):
            cells = []
            for metric in metrics:
                values = np.array([results[flags, run][r][metric] for run in args.runs])
                cell = f"{values.mean():.3f}"
                if flags != args.flags[0]:
                    diff = values - np.array([results[args.flags[0], run][r][metric] for run in args.runs])
                    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
                    cell += f" ({diff.mean():+.3f} ± {se:.3f})"
                cells.append(cell)
            name = flags or "(the run's own)"
            print(f"| {name} | {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    C.run_main(main)
