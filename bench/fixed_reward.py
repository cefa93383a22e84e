"""Is a run's reward model a good reward to learn from? PPO from scratch on it, held fixed.

For each finished run of the loop, copies its reward model (or, with --refit, fits a fresh one to the run's
labels with the given train_reward.py flags) into a new run directory and trains PPO from scratch on it for
--steps steps, the model never changing, with the flags bench_paper.py gives its true-reward condition (same
entropy bonus, same seed); then evaluates the final policy's true return. Compare with the loop run itself,
whose reward moved every round, and with PPO on the true reward: a model that rates good behaviour highly but
leads PPO from scratch elsewhere is a poorly shaped reward, not merely a late one.

    python bench/fixed_reward.py --out bench/out/fixed-final --runs bench/out/entanneal/HalfCheetah-v5-700labels-s*
    python bench/fixed_reward.py --out bench/out/refit-obs+act --refit "--inputs obs+act" --runs ...

Any run directory with a reward_model.pt will do, e.g. one that stopped after its first train_reward.py: with
--policy-seeds, several PPOs of other seeds train on each run's model, and the table says how much of the
spread of their returns is the model's and how much PPO's seed (is an early trap in the reward or in the policy?):

    python bench/fixed_reward.py --out bench/out/first-model --steps 100000 --anneal-steps 500000 \
        --policy-seeds 100 101 102 --runs bench/out/round0/Hopper-v5-700labels-s*

Resumable: each result lives in <out>/<name of the run>[-ppo<seed>] and is marked done by done.json; a re-run
does only what is missing, and refuses an --out made with other --refit flags or another budget. Prints a markdown
table (and writes it to <out>/fixed_reward.md): per run, the loop's own final true return (from its done.json,
if bench_paper.py made it) and that of PPO on the fixed model.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished loop run directories")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--refit", default=None, metavar="FLAGS",
                   help='fit a fresh model to the run\'s labels with these train_reward.py flags ("" for its '
                        "defaults) instead of taking the run's own reward_model.pt")
    p.add_argument("--steps", type=int, default=500_000, help="PPO steps from scratch")
    p.add_argument("--anneal-steps", type=int, default=None,
                   help="the learning rate and bonus decay as in a run this long (default: --steps); e.g. the "
                        "first 100k steps of a 500k-step loop: --steps 100000 --anneal-steps 500000")
    p.add_argument("--policy-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train one PPO per seed on each run's model (default: one, with the run's own seed), to "
                        "tell what the model decides from what PPO's seed does")
    p.add_argument("--ent-coef", type=float, default=0.01, help="entropy bonus (bench_paper.py's)")
    p.add_argument("--ent-anneal", action=argparse.BooleanOptionalAction, default=True,
                   help="the bonus decays to 0 with the learning rate (bench_paper.py's default)")
    p.add_argument("--policy-flags", default="", metavar="FLAGS",
                   help='more train_policy.py flags, quoted, e.g. "--init-log-std 0.5"')
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one core each)")
    args = p.parse_args()
    if args.policy_seeds is not None and (min(args.policy_seeds) < 0
                                          or len(set(args.policy_seeds)) < len(args.policy_seeds)):
        p.error("argument --policy-seeds: seeds must be distinct whole numbers of at least 0")
    if args.anneal_steps is not None and args.anneal_steps < args.steps:
        p.error("argument --anneal-steps: must be at least --steps (the decay of a run at least this long)")
    return args


def run_one(args, source, policy_seed):
    """Train and evaluate PPO (of seed policy_seed; None: the run's own) on source's (or a refitted) fixed reward
    model; returns the done.json record."""
    name = os.path.basename(os.path.normpath(source))
    run = os.path.join(args.out, name + ("" if policy_seed is None else f"-ppo{policy_seed}"))
    settings = {"source": os.path.abspath(source), "refit": args.refit, "steps": args.steps,
                "anneal_steps": args.anneal_steps, "ent_coef": args.ent_coef, "ent_anneal": args.ent_anneal,
                "policy_seed": policy_seed, "policy_flags": args.policy_flags or None}  # (None: as before the flag)
    done = os.path.join(run, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            record = json.load(f)
        if {k: record.get(k) for k in settings} != settings:
            raise SystemExit(f"fixed_reward: {run} was made with other settings "
                             f"({ {k: record.get(k) for k in settings} }); give another --out")
        return record
    shutil.rmtree(run, ignore_errors=True)  # an interrupted one starts again: its policy.pt is half-trained
    os.makedirs(run)
    files = [C.CONFIG] + ([C.SEGMENTS_DIR, C.QUERIES, C.LABELS] if args.refit is not None else [C.REWARD_MODEL])
    for f in files:
        (shutil.copytree if os.path.isdir(os.path.join(source, f)) else shutil.copy)(
            os.path.join(source, f), os.path.join(run, f))
    if policy_seed is not None:  # train_policy.py seeds the network, its actions and its envs from the run's seed
        config = C.read_config(run)
        C.write_json_atomic(os.path.join(run, C.CONFIG), {**config, "seed": policy_seed})
    python, started = sys.executable, time.time()
    commands = ([[python, "train_reward.py", "--run", run, "--fresh", *args.refit.split()]]
                if args.refit is not None else [])
    commands += [[python, "train_policy.py", "--run", run, "--reward", "learned", "--total-steps", str(args.steps),
                  *(["--anneal-steps", str(args.anneal_steps)] if args.anneal_steps is not None else []),
                  "--ent-coef", str(args.ent_coef), *(["--ent-anneal"] if args.ent_anneal else []), "--no-plot",
                  *args.policy_flags.split()],
                 [python, "collect.py", "--run", run, "--evaluate", str(args.eval_episodes), "--no-clips"]]
    env = {"MUJOCO_GL": "egl", **os.environ, "OMP_NUM_THREADS": "1"}
    with open(run + ".log", "a") as log:
        for command in commands:
            log.write("+ " + " ".join(command) + "\n")
            log.flush()
            if subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{name} failed; see {run}.log")
    evaluation = [m for m in C.read_jsonl(os.path.join(run, C.METRICS), warn=False)
                  if m["stage"] == "evaluate"][-1]
    loop = None
    if os.path.exists(os.path.join(source, "done.json")):
        with open(os.path.join(source, "done.json")) as f:
            loop = json.load(f)["eval_true_return"]
    record = {**settings, "name": name, "loop_true_return": loop, "eval_true_return": evaluation["true_return_mean"],
              "minutes": round((time.time() - started) / 60, 1)}
    C.write_json_atomic(done, record)
    print(f"done: {name}: true return {record['eval_true_return']:.1f} (the loop: {loop})", flush=True)
    return record


def model_and_seed_variance(returns):
    """The variance of returns[i, j] (run i's model, policy seed j; shape (runs, seeds)) split into that of the
    models' true means and that of PPO's seeds around them (one-way random-effects ANOVA; the model's part is
    clipped at 0). Returns (between-model variance, within-model variance)."""
    seeds = returns.shape[1]
    within = returns.var(axis=1, ddof=1).mean()  # mean square within
    between = max(0.0, (seeds * returns.mean(axis=1).var(ddof=1) - within) / seeds)
    return float(between), float(within)


def loop_cell(record):
    """The loop's own final true return for the table, or nothing when the run was not made by bench_paper.py."""
    return "" if record["loop_true_return"] is None else round(record["loop_true_return"])


def main():
    args = parse_args()
    needed = C.LABELS if args.refit is not None else C.REWARD_MODEL
    missing = [r for r in args.runs if not os.path.exists(os.path.join(r, needed))]
    if missing:
        raise SystemExit(f"fixed_reward: {missing[0]} has no {needed}")
    os.makedirs(args.out, exist_ok=True)
    jobs = [(r, seed) for r in args.runs for seed in (args.policy_seeds or [None])]
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda job: run_one(args, *job), jobs))
    source = "fitted afresh with train_reward.py --fresh " + (args.refit or "(defaults)") if args.refit is not None \
        else "the run's own final model"
    anneal = "" if args.anneal_steps is None else f", decaying as in a run of {args.anneal_steps:,} steps"
    flags = f", train_policy.py {args.policy_flags}" if args.policy_flags else ""
    lines = [f"PPO from scratch for {args.steps:,} steps on a fixed reward model ({source}), entropy bonus "
             f"{args.ent_coef:g}{' decaying' if args.ent_anneal else ''}{anneal}{flags}; true return = mean of "
             f"{args.eval_episodes} evaluation episodes of the final policy.", ""]
    loops = [r["loop_true_return"] for r in records if r["loop_true_return"] is not None]
    loop_mean = f"{np.mean(loops):.0f}" if len(loops) == len(records) else ""  # (only over the same runs)
    if args.policy_seeds is None:
        lines += ["| run | the loop | PPO on the fixed model |", "|---|---|---|"]
        lines += [f"| {r['name']} | {loop_cell(r)} | {r['eval_true_return']:.0f} |" for r in records]
        lines.append(f"| mean | {loop_mean} | {np.mean([r['eval_true_return'] for r in records]):.0f} |")
    else:
        # returns[i, j]: PPO of policy seed j on run i's model
        returns = np.array([r["eval_true_return"] for r in records]).reshape(len(args.runs), len(args.policy_seeds))
        seeds = ", ".join(map(str, args.policy_seeds))
        lines += [f"| run | the loop | PPO on the fixed model, policy seeds {seeds} | mean |", "|---|---|---|---|"]
        for i, r in enumerate(records[::len(args.policy_seeds)]):
            lines.append(f"| {r['name']} | {loop_cell(r)} | {', '.join(f'{x:.0f}' for x in returns[i])} | "
                         f"{returns[i].mean():.0f} |")
        lines.append(f"| mean | {loop_mean} | | {returns.mean():.0f} |")
        between, within = model_and_seed_variance(returns) if min(returns.shape) > 1 else (0.0, 0.0)
        if between + within > 0:  # (none with one run or one seed, or returns all equal)
            lines += ["", f"Between the models: sd {np.sqrt(between):.0f}; between PPO seeds on one model: sd "
                          f"{np.sqrt(within):.0f}; share of the variance that is the model's: "
                          f"{between / (between + within):.2f} (one-way random-effects ANOVA)."]
    table = "\n".join(lines) + "\n"
    C.write_atomic(os.path.join(args.out, "fixed_reward.md"), table.encode())
    print(table)


if __name__ == "__main__":
    main()
