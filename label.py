"""Stage 2 of the loop: answer the open queries in queries.jsonl and append the answers to labels.jsonl.

Synthetic teachers answer from a function of the segments (the env's own reward by default), so the whole
system can learn unattended, be tested and be benchmarked:

    python label.py teach --run data/cheetah                          # the perfect oracle
    python label.py teach --run data/cheetah --mistake 0.1            # B-Pref's imperfect teachers
    python label.py teach --run data/cheetah --behaviour cheetah_backwards
    python label.py teach --run data/cheetah --behaviour mymodule:my_function

A label line: {"query_id": 7, "choice": "left"|"right"|"equal"|"skip", "labeler": "oracle",
"time": 1700000000.0, "teacher": {...parameters...}} (README.md, "labels.jsonl").
Reads: config.json, queries.jsonl, labels.jsonl, segments/. Writes: labels.jsonl, metrics.jsonl.
"""
import argparse
import importlib
import os
import sys
import time

import numpy as np

import contract as C


# --------------------------------------------------------------------------- behaviours a teacher judges
# Each takes a segment (dict of per-step arrays: obs (T, obs_dim), acts (T, act_dim), rewards (T,),
# qpos (T, nq), qvel (T, nv), states before each action) and returns a per-step score (T,): the teacher
# prefers the segment whose (discounted) sum is larger.

def env_reward(segment):
    """The environment's own reward: the oracle of the paper's synthetic experiments."""
    return segment["rewards"]


def reacher_spin_ccw(segment):
    """Reacher-v5: angular velocity of the first joint (qvel[0], rad/s); counter-clockwise is positive."""
    return segment["qvel"][:, 0]


def hopper_backflip(segment):
    """Hopper-v5: backward pitch rate of the torso, -qvel[2] (rad/s; qpos[2] is the torso's pitch, which
    grows as it tips forward), plus its height above the resting height 1.25 m, so that the hopper learns
    to jump and rotate backwards rather than to fall over backwards."""
    return -segment["qvel"][:, 2] + 2.0 * (segment["qpos"][:, 1] - 1.25)


def cheetah_backwards(segment):
    """HalfCheetah-v5: velocity of the torso along -x (m/s), i.e. running backwards."""
    return -segment["qvel"][:, 0]


BEHAVIOURS = {f.__name__: f for f in (env_reward, reacher_spin_ccw, hopper_backflip, cheetah_backwards)}


def load_behaviour(name):
    """A built-in behaviour by name, or a user's function given as module:function (module on sys.path)."""
    if name in BEHAVIOURS:
        return BEHAVIOURS[name]
    if ":" not in name:
        raise C.UserError(f"unknown behaviour {name!r}; built in: {', '.join(BEHAVIOURS)}, or module:function")
    module_name, function_name = name.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise C.UserError(f"cannot load behaviour {name!r}: {e}")


# -------------------------------------------------------------------------------- synthetic teachers

def teacher_returns(score_left, score_right, gamma):
    """Myopic returns: step t of a T-step segment weighs gamma**(T-1-t), so gamma < 1 weighs the end
    more (B-Pref). score_*: (T,) per-step scores. Returns (R_left, R_right)."""
    weights = gamma ** np.arange(len(score_left) - 1, -1, -1, dtype=np.float64)
    return float(np.dot(weights, score_left)), float(np.dot(weights, score_right))


def synthetic_choice(r_left, r_right, rng, beta=np.inf, mistake=0.0, skip_threshold=-np.inf,
                     equal_threshold=0.0):
    """One answer of B-Pref's simulated teacher (Lee et al. 2021), in its order: skip when both returns are
    below skip_threshold; `equal` when they differ by less than equal_threshold; otherwise the better one
    (beta = inf) or a Bradley-Terry sample P(left) = sigmoid(beta (R_left - R_right)); finally the answer is
    flipped with probability `mistake`."""
    if max(r_left, r_right) < skip_threshold:
        return "skip"
    if abs(r_left - r_right) < equal_threshold:
        return "equal"
    if np.isinf(beta):
        if r_left == r_right:
            return "equal"
        left = r_left > r_right
    else:
        z = np.clip(beta * (r_left - r_right), -50, 50)
        left = rng.random() < 1.0 / (1.0 + np.exp(-z))
    if rng.random() < mistake:
        left = not left
    return "left" if left else "right"


def teach(args):
    config = C.open_run(args.run, create=False)
    behaviour = load_behaviour(args.behaviour)
    queries = C.read_queries(args.run)
    labels = C.read_labels(args.run, queries)
    answered = {label["query_id"] for label in labels}
    open_queries = [q for qid, q in sorted(queries.items()) if qid not in answered]
    if not open_queries:
        print(f"label: all {len(queries)} queries already answered")
        return
    segments = C.load_segments(args.run)
    if segments is None:
        raise C.UserError(f"{args.run} has queries but no segment files; they were deleted or never written")
    index = {int(s): i for i, s in enumerate(segments["ids"])}

    def segment(segment_id):
        if segment_id not in index:
            raise C.UserError(f"segment {segment_id} named by a query is missing from {C.SEGMENTS_DIR}/")
        i = index[segment_id]
        return {k: segments[k][i] for k in ("obs", "acts", "rewards", "qpos", "qvel")}

    # B-Pref scales the skip and equal thresholds by the typical size of a segment's return.
    all_scores = [behaviour({k: segments[k][i] for k in ("obs", "acts", "rewards", "qpos", "qvel")})
                  for i in range(len(segments["ids"]))]
    margin = float(np.mean([abs(np.sum(s)) for s in all_scores])) if all_scores else 1.0
    skip_threshold = args.skip * margin if args.skip > 0 else -np.inf
    equal_threshold = args.equal * margin
    teacher = {"behaviour": args.behaviour, "beta": None if np.isinf(args.beta) else args.beta,
               "gamma": args.gamma, "mistake": args.mistake, "skip": args.skip, "equal": args.equal,
               "margin": round(margin, 6)}
    labeler = args.labeler or ("oracle" if teacher_is_oracle(args) else "synthetic")
    records, now = [], time.time()
    for q in open_queries:
        rng = np.random.default_rng([config["seed"], q["query_id"]])  # same answers on every re-run
        r_left, r_right = teacher_returns(np.asarray(behaviour(segment(q["left"])), np.float64),
                                          np.asarray(behaviour(segment(q["right"])), np.float64), args.gamma)
        choice = synthetic_choice(r_left, r_right, rng, args.beta, args.mistake, skip_threshold,
                                  equal_threshold)
        records.append({"query_id": q["query_id"], "choice": choice, "labeler": labeler,
                        "time": round(now, 3), "teacher": teacher})
    C.append_jsonl(os.path.join(args.run, C.LABELS), records)
    counts = {c: sum(r["choice"] == c for r in records) for c in C.CHOICES}
    C.log_metrics(args.run, "label", labeler=labeler, labels=len(records), labels_total=len(labels) + len(records),
                  **{f"choice_{c}": n for c, n in counts.items()})
    print(f"label: {labeler} answered {len(records)} queries ({counts}); {len(labels) + len(records)} labels in all")


def teacher_is_oracle(args):
    return (args.behaviour == "env_reward" and np.isinf(args.beta) and args.gamma == 1.0 and args.mistake == 0
            and args.skip == 0 and args.equal == 0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teach", help="answer every open query with a synthetic teacher",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--run", required=True, help="run directory")
    t.add_argument("--behaviour", default="env_reward",
                   help=f"what the teacher wants: one of {', '.join(BEHAVIOURS)}, or module:function")
    t.add_argument("--beta", type=float, default=np.inf, help="stochastic teacher's rationality (inf: perfect)")
    t.add_argument("--gamma", type=float, default=1.0, help="myopic teacher's discount (<1 weighs the end more)")
    t.add_argument("--mistake", type=float, default=0.0, help="probability of flipping the answer")
    t.add_argument("--skip", type=float, default=0.0,
                   help="answer 'skip' when both returns are below this times the mean |segment return|")
    t.add_argument("--equal", type=float, default=0.0,
                   help="answer 'equal' when returns differ by less than this times the mean |segment return|")
    t.add_argument("--labeler", default=None, help="labeler id written into each label (default: oracle/synthetic)")
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.command == "teach":
        teach(args)


if __name__ == "__main__":
    C.run_main(main)
