"""Reward model and query selection benchmark (issue 4): how well train_reward.py's ensemble, fitted to N
oracle labels chosen at random or by ensemble disagreement, predicts which of two unseen segments is better
and how their true returns rank.

    python bench/bench_reward.py                          # HalfCheetah-v5 and Hopper-v5 (make bench-reward)
    python bench/bench_reward.py --envs HalfCheetah-v5 --labels 700

On 2 shared CPU cores: 25 min once the pool is cached (HalfCheetah 3 min, Hopper 22 min: its segments are
188 steps long, not 30); the first run also trains PPO (2 x 300k steps) and rolls out the pool, which took
another 5 min for HalfCheetah and 35 min for Hopper.

For each env, a fixed pool of 1.5 s segments from policies of varied skill: uniform random actions and
checkpoints of one PPO run on the true reward (train_policy.py --reward true) at several step counts.
The pool is split once into training segments and held-out evaluation segments. For each label budget N and
selection rule, the loop is emulated: a first chunk of random pairs, then chunks whose pairs are chosen from
fresh segments as collect.py does (`select_pairs`, random or by disagreement among --candidates-factor x as
many candidate pairs), with the ensemble refitted (warm-started, as in loop.sh) after each chunk. The last
fit, on all N labels, is evaluated on random pairs of held-out segments (disjoint from every training
pair), ranking segments by the summed normalised ensemble reward that the policy would see; its training
time is measured (wall and CPU seconds: the latter is what an otherwise idle machine would take). Policies and the segment pool are cached under --out/reward_cache,
so a re-run only refits. Prints a markdown table and writes it to --out/reward.md.
"""
import argparse
import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import collect  # noqa: E402  (benchmarks may use stage functions; stages never import each other)
import contract as C  # noqa: E402
import train_reward  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    p.add_argument("--labels", nargs="+", type=int, default=[100, 350, 700, 1400], help="label budgets N")
    p.add_argument("--selections", nargs="+", default=["random", "disagreement"],
                   choices=["random", "disagreement"])
    p.add_argument("--checkpoints", nargs="+", type=int, default=[25_000, 75_000, 150_000, 300_000],
                   help="PPO env steps at which a policy joins the pool (plus random actions)")
    p.add_argument("--segments-per-policy", type=int, default=800, help="pool segments from each policy")
    p.add_argument("--eval-segments", type=int, default=1000, help="pool segments held out for evaluation")
    p.add_argument("--eval-pairs", type=int, default=2000, help="random pairs of held-out segments scored")
    p.add_argument("--chunks", type=int, default=4, help="label chunks per budget (a refit after each)")
    p.add_argument("--candidates-factor", type=int, default=10, help="as collect.py's flag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-flags", default="", help="extra train_reward.py flags, e.g. '--epochs 50'")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    return p.parse_args()


# ---------------------------------------------------------------------------------------- the pool

def train_policies(args, env_id, cache):
    """One true-reward PPO run, resumed up to each checkpoint; returns the checkpoint paths, cached."""
    run = os.path.join(cache, "ppo")
    paths = []
    for steps in sorted(args.checkpoints):
        path = os.path.join(cache, f"policy_{steps}.pt")
        if not os.path.exists(path):
            print(f"{env_id}: PPO on the true reward up to {steps} steps", flush=True)
            subprocess.run([sys.executable, "train_policy.py", "--run", run, "--env", env_id, "--seed",
                            str(args.seed), "--reward", "true", "--total-steps", str(steps), "--anneal-steps",
                            str(max(args.checkpoints)), "--no-plot"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "MUJOCO_GL": "egl"})
            shutil.copy(os.path.join(run, C.POLICY), path)
        paths.append(path)
    return run, paths


def build_pool(args, env_id):
    """Segments of every policy, cached: obs (S, T, obs), acts (S, T, act) and next_obs (S, T, obs) float32,
    true returns (S,), policy (S,) index into [random] + checkpoints."""
    cache = os.path.join(args.out, "reward_cache", env_id)
    os.makedirs(cache, exist_ok=True)
    key = f"seed{args.seed}-ckpt{'_'.join(map(str, sorted(args.checkpoints)))}-n{args.segments_per_policy}"
    pool_path = os.path.join(cache, f"pool-{key}.npz")
    if os.path.exists(pool_path):
        with np.load(pool_path) as npz:
            if "next_obs" in npz.files:  # (a cache of before next_obs is built again)
                return {k: npz[k] for k in npz.files}
    run, paths = train_policies(args, env_id, cache)
    config = C.open_run(run)
    envs = [C.make_env(env_id, config["env_kwargs"]) for _ in range(8)]
    space = envs[0].action_space
    per_episode = max(1, (envs[0].spec.max_episode_steps or 1000) // config["segment_steps"])
    episodes_per_env = -(-args.segments_per_policy // (per_episode * len(envs)))
    parts = {"obs": [], "acts": [], "next_obs": [], "returns": [], "policy": [], "episode_return": []}
    for p, path in enumerate([None] + paths):
        seed = args.seed * 1000 + p * 100
        rng = np.random.default_rng(seed)
        policy = None if path is None else C.PolicyForRollout(
            C.load_torch(path, "policy"), config["obs_shape"][0], config["act_shape"][0], space.low, space.high,
            seed=seed)
        started = time.time()
        episodes = collect.rollout_episodes(envs, policy, rng, seed, episodes_per_env)
        segments = [s for e in episodes for s in collect.cut_segments(e, config["segment_steps"], rng)]
        segments = [segments[i] for i in rng.permutation(len(segments))[:args.segments_per_policy]]
        parts["obs"].append(np.stack([s["obs"] for s in segments]).astype(np.float32))
        parts["acts"].append(np.stack([s["acts"] for s in segments]).astype(np.float32))
        parts["next_obs"].append(np.stack([s["next_obs"] for s in segments]).astype(np.float32))
        parts["returns"].append(np.array([s["rewards"].sum() for s in segments]))
        parts["policy"].append(np.full(len(segments), p))
        episode_return = float(np.mean([e["rewards"].sum() for e in episodes]))
        parts["episode_return"].append([episode_return])
        print(f"{env_id}: policy {'random' if path is None else os.path.basename(path)}: episode return "
              f"{episode_return:.0f}, {len(segments)} segments ({time.time() - started:.0f} s)", flush=True)
    for env in envs:
        env.close()
    pool = {k: np.concatenate(v) for k, v in parts.items()}
    buf = io.BytesIO()  # atomically: a cache cut short by a kill would be loaded, and fail, on every later run
    np.savez(buf, **pool)
    C.write_atomic(pool_path, buf.getvalue())
    return pool


# ------------------------------------------------------------------------------ one condition

def oracle_targets(returns, pairs):
    """The perfect teacher (label.py teach's default): P(left preferred) for pairs (P, 2) of segments with
    true returns (S,): 1 or 0 for the better one, 0.5 for a tie. (P,) float32."""
    a, b = returns[pairs[:, 0]], returns[pairs[:, 1]]
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5)).astype(np.float32)


def run_condition(args, train_args, pool, x, train_segments, eval_pairs, n_labels, selection):
    """Ask n_labels pairs in --chunks chunks chosen by `selection`, refitting after each; evaluate the last fit.
    x: (S, T, D) the whole pool; train_segments: indices of x labels may be asked about; eval_pairs (P, 2)
    pairs of held-out segments. Returns a dict of figures."""
    seed = [args.seed, n_labels, int(selection == "disagreement")]
    rng = np.random.default_rng(seed)
    torch.manual_seed(rng.integers(2 ** 31))
    fresh_order = rng.permutation(train_segments)  # each chunk rolls out fresh segments, as collect.py does
    sizes = np.diff(np.linspace(0, n_labels, args.chunks + 1).round().astype(int))
    pairs, model, l2, used, fit_wall, fit_cpu, total_wall = np.zeros((0, 2), int), None, None, 0, 0.0, 0.0, 0.0
    for n in sizes:
        fresh = fresh_order[used:used + 2 * n]
        used += 2 * n
        member_returns = None
        if selection == "disagreement" and model is not None:  # the first chunk: no model yet, so random
            member_returns = train_reward.all_segment_returns(model, x[torch.as_tensor(fresh)]).numpy()
        pairs = np.concatenate([pairs, fresh[collect.select_pairs(len(fresh), n, rng, member_returns,
                                                                  args.candidates_factor)]])
        # Fit on the labelled segments only, renumbered 0..U-1; query id = order asked (keeps each role).
        labelled, local = np.unique(pairs, return_inverse=True)
        local = local.reshape(pairs.shape)
        x_lab = x[torch.as_tensor(labelled)]
        left, right = torch.as_tensor(local[:, 0]), torch.as_tensor(local[:, 1])
        target = torch.as_tensor(oracle_targets(pool["returns"], pairs))
        is_val, counts = train_reward.split_labels(np.arange(len(pairs)), train_args.members,
                                                   train_args.val_fraction, args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        model, l2, report = train_reward.fit(x_lab, left, right, target, is_val, counts, train_args, model, l2,
                                             args.seed)
        fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
        total_wall += fit_wall
    figures = train_reward.evaluate(model, x_lab, left, right, target, is_val, counts,
                                    pool["returns"][labelled], train_args.random_answer)
    train_reward.normalize_output(model, x_lab)  # over the states asked about, as the stage does

    # The reward the policy would see, summed over each held-out segment.
    held = np.unique(eval_pairs)
    with torch.no_grad():
        xs = x[torch.as_tensor(held)]
        predicted = model.normalized_reward(xs.reshape(-1, xs.shape[-1])).reshape(len(held), -1).sum(1).numpy()
    pred = dict(zip(held.tolist(), predicted))
    p_left = np.array([pred[a] for a in eval_pairs[:, 0]])
    p_right = np.array([pred[b] for b in eval_pairs[:, 1]])
    truth = oracle_targets(pool["returns"], eval_pairs)
    strict = truth != 0.5
    return {"accuracy": float(np.mean((p_left > p_right)[strict] == (truth[strict] == 1.0))),
            "spearman": train_reward.rank_correlation(predicted, pool["returns"][held]),
            "fit_wall": fit_wall, "fit_cpu": fit_cpu, "total_wall": total_wall, "steps": report["steps"],
            "val_accuracy": float(np.nanmean(figures["val_accuracy"])),
            "ratio": float(np.nanmean(figures["val_loss"] / figures["train_loss"])),
            "in_range": float(np.mean([(1.1 <= r) & (r <= 1.5) for r in np.ravel(report["ratios"])]))
            if report["ratios"] else float("nan")}


# ---------------------------------------------------------------------------------------------- main

def main():
    args = parse_args()
    train_args = train_reward.parse_args(["--run", "unused", *args.train_flags.split()])
    torch.set_num_threads(train_args.threads)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    rows = []
    for env_id in args.envs:
        pool = build_pool(args, env_id)
        x = torch.as_tensor(C.segment_reward_input(pool["obs"], pool["acts"], train_args.inputs,
                                                   train_args.reward_state, pool["next_obs"]))
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(x))
        held, train_segments = order[:args.eval_segments], order[args.eval_segments:]
        needed = 2 * max(args.labels)
        if len(train_segments) < needed:
            raise SystemExit(f"{env_id}: {len(train_segments)} training segments, {needed} needed; raise "
                             f"--segments-per-policy")
        left = rng.choice(held, args.eval_pairs)
        right = np.array([rng.choice(held[held != a]) for a in left])
        eval_pairs = np.stack([left, right], axis=1)
        for n_labels in args.labels:
            for selection in args.selections:
                r = run_condition(args, train_args, pool, x, train_segments, eval_pairs, n_labels, selection)
                rows.append((env_id, n_labels, selection, r))
                print(f"{env_id} {n_labels:5d} labels {selection:12s}: held-out accuracy {r['accuracy']:.3f}, "
                      f"spearman {r['spearman']:.3f}, last fit {r['steps']} steps {r['fit_wall']:.1f} s "
                      f"({r['fit_cpu']:.1f} s CPU), val/train loss {r['ratio']:.2f}, "
                      f"[{time.time() - started:.0f} s]", flush=True)
    returns = ", ".join(f"{e}: " + " / ".join(f"{v:.0f}" for v in build_pool(args, e)["episode_return"])
                        for e in args.envs)
    lines = [f"Segment pool per env: {args.segments_per_policy} segments (1.5 s) from each of random actions and "
             f"PPO checkpoints at {', '.join(f'{s // 1000}k' for s in sorted(args.checkpoints))} true-reward "
             f"steps (episode returns {returns}); {args.eval_segments} segments held out, accuracy on "
             f"{args.eval_pairs} random pairs of them. Labels asked in {args.chunks} chunks, refit after each "
             f"(train_reward.py defaults{', ' + args.train_flags if args.train_flags else ''}; seed {args.seed}).",
             "", "| env | labels | selection | held-out accuracy | Spearman (return) | last fit: steps | "
                 "last fit: s (CPU s) | all fits: s | val/train loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {e} | {n} | {s} | {r['accuracy']:.3f} | {r['spearman']:.3f} | {r['steps']} | "
              f"{r['fit_wall']:.1f} ({r['fit_cpu']:.1f}) | {r['total_wall']:.1f} | {r['ratio']:.2f} |"
              for e, n, s, r in rows]
    lines += ["", f"Total wall time {time.time() - started:.0f} s (pool cached under {args.out}/reward_cache)."]
    table = "\n".join(lines) + "\n"
    C.write_atomic(os.path.join(args.out, "reward.md"), table.encode())
    print("\n" + table)


if __name__ == "__main__":
    main()
