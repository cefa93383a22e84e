"""Stage 1 of the loop: roll out the current policy, cut its trajectories into short segments, pick pairs
of segments to ask the teacher about, render just those pairs to mp4 clips and append them to
queries.jsonl.

    python collect.py --run data/cheetah --env HalfCheetah-v5 --pairs 50
    python collect.py --run data/cheetah --label-budget 400 --schedule-steps 270000   # as loop.sh does
    python collect.py --run data/cheetah --evaluate 5                                # score + clip the agent

The latest policy checkpoint (policy.pt) is used if there is one, uniform random actions otherwise.
Reads: config.json, policy.pt, reward_model.pt (disagreement selection), queries.jsonl, labels.jsonl (refuses
answers to pairs queries.jsonl lacks), segments/ (to number new ones), metrics.jsonl (--evaluate --if-new-policy).
Writes: segments/round_RRRR.npz, clips/<segment_id>.mp4, queries.jsonl, metrics.jsonl.
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys
import time

import numpy as np

import contract as C


def at_least(minimum, kind=int, most=math.inf):
    """argparse type: a finite number >= minimum (and <= most), so that a mistyped flag is one sentence, not a
    traceback later."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not minimum <= value < math.inf:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be a finite number of at least {minimum}, not {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, not {text}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory, e.g. data/cheetah")
    p.add_argument("--env", default=None, help="gymnasium env id; required when the run is new")
    p.add_argument("--seed", type=at_least(0), default=None,
                   help="seed of a new run (default 0; stored in config.json, and a run's own is kept)")
    p.add_argument("--segment-seconds", type=at_least(1e-3, float), default=None,
                   help="segment duration of a new run, in simulated seconds (default: contract.SEGMENT_SECONDS, "
                        "the paper's: 0.48 s for Hopper, else 1.5 s)")
    p.add_argument("--env-kwargs", type=C.env_kwargs_flag, default=None,
                   help="JSON keyword arguments for gym.make of a new run (default: the paper's task, "
                        "contract.TASK_KWARGS; '{}' for gymnasium's own)")
    p.add_argument("--num-envs", type=at_least(1), default=8, help="environments rolled out side by side")
    p.add_argument("--pairs", type=at_least(0), default=None, help="number of pairs to ask about now")
    p.add_argument("--label-budget", type=at_least(0), default=None,
                   help="total pairs over the whole run; with --schedule-steps asks for as many as are due")
    p.add_argument("--schedule-steps", type=at_least(1), default=None,
                   help="policy step by which the whole label budget should have been asked")
    p.add_argument("--pretrain-fraction", type=at_least(0.0, float), default=0.25,
                   help="share of the label budget asked about the random policy, before any RL")
    p.add_argument("--random-episode-steps", type=at_least(0), default=240,
                   help="while actions are random (before any policy), end each episode after this many steps, "
                        "0 for the env's whole horizon: a random Hopper falls within ~100 steps and would lie on "
                        "the floor for the rest of its 1000, and the first pairs would be two bodies lying still")
    p.add_argument("--decay-steps", type=at_least(1.0, float), default=None,
                   help="c in the paper's label rate c/(T+c); default schedule-steps/4")
    p.add_argument("--selection", choices=["random", "disagreement"], default="disagreement",
                   help="how to choose pairs; disagreement needs a reward model and falls back to random")
    p.add_argument("--candidates-factor", type=at_least(1), default=10,
                   help="disagreement selection scores this many times more candidate pairs than it keeps")
    p.add_argument("--mean-action-share", type=at_least(0.0, float), default=0.0,
                   help="share of the rollout envs whose policy acts with its mean action instead of sampling, "
                        "so that pairs also show the (usually better) behaviour the policy is heading for")
    p.add_argument("--no-clips", action="store_true", help="skip rendering (synthetic teachers need none)")
    p.add_argument("--clip-size", type=at_least(16, most=4096), default=128,
                   help="clip width and height in pixels (16 to 4096: MuJoCo's offscreen buffer has a limit)")
    p.add_argument("--clip-fps", type=at_least(0.1, float), default=30.0,
                   help="at most this many frames per second")
    p.add_argument("--clip-min-seconds", type=at_least(0.0, float), default=1.5,
                   help="a shorter segment's clip plays slowed down to last this long, as the paper's did")
    p.add_argument("--random-policy", action="store_true", help="act uniformly at random even if a policy exists")
    p.add_argument("--evaluate", type=at_least(0), default=0, metavar="EPISODES",
                   help="instead of collecting: run this many whole episodes, log the true return, "
                        "and render a clip of the agent")
    p.add_argument("--clip-seconds", type=at_least(0.1, float), default=10.0,
                   help="length of the --evaluate clip")
    p.add_argument("--if-new-policy", action="store_true",
                   help="with --evaluate: do nothing if metrics.jsonl already has an evaluation of this very policy "
                        "with at least as many episodes (and its clip, unless --no-clips); for re-runs of loop.sh")
    args = p.parse_args(argv)
    if args.mean_action_share > 1:
        p.error(f"argument --mean-action-share: must be at most 1, not {args.mean_action_share}")
    if args.pretrain_fraction > 1:
        p.error(f"argument --pretrain-fraction: must be at most 1, not {args.pretrain_fraction}")
    if not args.evaluate and args.pairs is None and (args.label_budget is None or args.schedule_steps is None):
        p.error("give either --pairs N or both --label-budget and --schedule-steps")
    return args


# ------------------------------------------------------------------------------------------- rollout

def load_policy(args, config, action_space, seed):
    """(policy or None, policy_step). None means uniform random actions."""
    path = os.path.join(args.run, C.POLICY)
    if args.random_policy or not os.path.exists(path):
        return None, 0
    checkpoint = C.load_torch(path, "policy checkpoint")
    import torch
    torch.set_num_threads(1)  # a batch of num_envs tiny MLP calls: more threads only wait on each other (10x+)
    policy = C.PolicyForRollout(checkpoint, config["obs_shape"][0], config["act_shape"][0],
                                action_space.low, action_space.high, seed=seed)
    return policy, int(checkpoint["global_step"])


def rollout_episodes(envs, policy, rng, seed, max_episodes_per_env, mean_action_envs=0, max_steps=None):
    """Run each env for up to `max_episodes_per_env` episodes (stepping all envs together, one batched policy
    call per step), each to the env's end or, if given, to `max_steps`; the last `mean_action_envs` envs act
    with the policy's mean action. Returns a list of episodes, each a dict of per-step arrays: obs (T, obs_dim),
    acts (T, act_dim), rewards (T,), qpos (T, nq), qvel (T, nv); the states are those *before* the action, so
    that frame t shows what obs[t] describes; and final_obs (obs_dim,), the observation the last action led
    to (before the env was reset), so that every step's two states are known."""
    n = len(envs)
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    buffers = [{k: [] for k in ("obs", "acts", "rewards", "qpos", "qvel")} for _ in envs]
    episodes, finished = [], [0] * n
    space = envs[0].action_space
    mean_rows = np.arange(n) >= n - mean_action_envs if mean_action_envs else None
    while min(finished) < max_episodes_per_env:
        if policy is None:
            actions = rng.uniform(space.low, space.high, size=(n,) + space.shape).astype(np.float32)
        else:
            actions = policy.act(obs, mean_rows=mean_rows).astype(np.float32)
        for i, env in enumerate(envs):
            if finished[i] >= max_episodes_per_env:
                continue
            data = env.unwrapped.data
            b = buffers[i]
            b["obs"].append(obs[i].copy())
            b["qpos"].append(data.qpos.copy())
            b["qvel"].append(data.qvel.copy())
            next_obs, reward, terminated, truncated, _ = env.step(actions[i])
            b["acts"].append(actions[i])
            b["rewards"].append(reward)
            if terminated or truncated or len(b["rewards"]) == max_steps:
                episodes.append({**{k: np.asarray(v) for k, v in b.items()}, "final_obs": next_obs.copy()})
                buffers[i] = {k: [] for k in b}
                finished[i] += 1
                next_obs, _ = env.reset()
            obs[i] = next_obs
    return episodes


def cut_segments(episode, segment_steps, rng):
    """Cut one episode into non-overlapping segments of segment_steps, starting at a random offset so that
    segment boundaries differ between episodes. Returns a list of dicts of (segment_steps, ...) arrays: the
    episode's per-step arrays and next_obs, the observation each step led to; an episode shorter than one
    segment gives none."""
    length = len(episode["rewards"])
    if length < segment_steps:
        return []
    steps = {k: v for k, v in episode.items() if k != "final_obs"}
    steps["next_obs"] = np.concatenate([episode["obs"][1:], episode["final_obs"][None]])
    offset = int(rng.integers(0, length % segment_steps + 1))
    return [{k: v[start:start + segment_steps] for k, v in steps.items()}
            for start in range(offset, length - segment_steps + 1, segment_steps)]


def random_episode_steps(args, policy_step, segment_steps):
    """Where episodes are cut short: while actions are random, at --random-episode-steps, but never before one
    segment fits; a policy's episodes run to the env's end (None)."""
    if policy_step or not args.random_episode_steps:
        return None
    return max(args.random_episode_steps, segment_steps)


def mean_action_envs(args, policy_step):
    """How many of the rollout envs act with the policy's mean action (none while actions are random)."""
    return round(args.mean_action_share * args.num_envs) if policy_step else 0


def collect_segment_pool(args, config, needed, seed):
    """Roll out until at least `needed` segments are cut. Returns (pool dict of stacked arrays, policy_step,
    mean true return of the finished episodes). `seed` fixes everything: env resets, random or policy
    actions, where segments are cut."""
    envs = [C.make_env(config["env_id"], config["env_kwargs"]) for _ in range(args.num_envs)]
    rng = np.random.default_rng(seed)
    policy, policy_step = load_policy(args, config, envs[0].action_space, seed)
    horizon = envs[0].spec.max_episode_steps or 1000
    max_steps = random_episode_steps(args, policy_step, config["segment_steps"])
    per_episode = max(1, min(horizon, max_steps or horizon) // config["segment_steps"])
    rounds = math.ceil(needed / (per_episode * args.num_envs))
    segments, returns, barren = [], [], 0
    # Short (terminating) episodes may need many more rollouts than estimated: go on while they still give
    # segments (up to 1000 rollouts), and give up after 20 in a row without one (episodes shorter than a segment).
    for attempt in range(1000):
        episodes = rollout_episodes(envs, policy, rng, seed + 1000 * attempt, rounds,
                                    mean_action_envs(args, policy_step), max_steps)
        returns += [float(e["rewards"].sum()) for e in episodes]
        before = len(segments)
        for episode in episodes:
            segments += cut_segments(episode, config["segment_steps"], rng)
        barren = 0 if len(segments) > before else barren + 1
        if len(segments) >= needed or barren >= 20:
            break
    for env in envs:
        env.close()
    if len(segments) < needed:
        raise C.UserError(f"episodes of {config['env_id']} are too short to cut {needed} segments of "
                          f"{config['segment_steps']} steps ({len(returns)} episodes gave {len(segments)}); start a "
                          f"new run with a shorter --segment-seconds")
    pool = {k: np.stack([s[k] for s in segments]) for k in segments[0]}
    return pool, policy_step, float(np.mean(returns)) if returns else float("nan")


# ---------------------------------------------------------------------------------- pair selection

def pairs_due(args, policy_step, asked):
    """How many pairs to ask now: --pairs, or the paper's schedule. The schedule asks pretrain_fraction of
    the budget before RL, then at a rate proportional to c/(T+c) in the policy's env steps T, so that the
    whole budget is due at --schedule-steps. Counting against pairs already asked makes a re-run after a
    crash ask for nothing twice."""
    if args.pairs is not None:
        return args.pairs
    total_steps = max(1, args.schedule_steps)
    c = args.decay_steps or total_steps / 4
    progress = math.log1p(min(policy_step, total_steps) / c) / math.log1p(total_steps / c)
    due = args.label_budget * (args.pretrain_fraction + (1 - args.pretrain_fraction) * progress)
    return max(0, int(round(due)) - asked)


def segment_returns_per_member(model, pool):
    """Each ensemble member's predicted return of each pooled segment: (members, N). pool: obs (N, T, obs_dim),
    acts (N, T, act_dim) and, for a model of obs+next, next_obs (N, T, obs_dim)."""
    import torch
    x = torch.as_tensor(C.segment_reward_input(pool["obs"], pool["acts"], model.inputs, model.reward_state,
                                               pool.get("next_obs")))
    n, t, d = x.shape
    with torch.no_grad():
        return model(x.reshape(n * t, d)).reshape(model.members, n, t).sum(-1).numpy()


def select_pairs(pool_size, n_pairs, rng, member_returns=None, candidates_factor=10):
    """Choose n_pairs pairs of pool indices. Random: distinct segments, shuffled. Disagreement (given
    member_returns (K, N)): draw candidates_factor * n_pairs random pairs and keep those whose predicted
    preference P(left > right) = sigmoid(R_k(left) - R_k(right)) varies most across the members k.
    Returns an (n_pairs, 2) int array."""
    if member_returns is None:
        order = rng.permutation(pool_size)
        if pool_size >= 2 * n_pairs:
            return order[:2 * n_pairs].reshape(n_pairs, 2)
        return np.stack([rng.choice(pool_size, 2, replace=False) for _ in range(n_pairs)])
    m = candidates_factor * n_pairs
    left = rng.integers(0, pool_size, m)
    right = (left + rng.integers(1, pool_size, m)) % pool_size  # never a segment against itself
    # Candidates are drawn with replacement: ask about each pair once, not as often as it was drawn. Each
    # keeps the side its segments were drawn on: sorted, the earlier segment would always be on the left,
    # and a person's bias for one side would become a bias for early segments.
    _, first = np.unique(np.sort(np.stack([left, right], axis=1), axis=1), axis=0, return_index=True)
    # Too few distinct candidates (a low --candidates-factor): draw more, so that no pair is asked twice, as far
    # as the pool has pairs enough (collect's pool always has: two segments a pair).
    while len(first) < min(n_pairs, pool_size * (pool_size - 1) // 2):
        more = rng.integers(0, pool_size, m)
        left, right = np.concatenate([left, more]), np.concatenate([right, (more + rng.integers(1, pool_size, m))
                                                                   % pool_size])
        _, first = np.unique(np.sort(np.stack([left, right], axis=1), axis=1), axis=0, return_index=True)
    if len(first) >= n_pairs:
        left, right = left[first], right[first]
    diff = np.clip(member_returns[:, left] - member_returns[:, right], -50, 50)
    p_left = 1.0 / (1.0 + np.exp(-diff))
    keep = np.argsort(-p_left.var(axis=0), kind="stable")[:n_pairs]
    return np.stack([left[keep], right[keep]], axis=1)


# ---------------------------------------------------------------------------------------- rendering

class ClipRenderer:
    """Re-renders saved physics states offscreen (no display, no shadows) and writes mp4 clips."""

    def __init__(self, config, size, max_fps, min_seconds=0.0):
        import mujoco
        self.env = C.make_env(config["env_id"], config["env_kwargs"], render_size=size)
        self.env.reset(seed=0)
        viewer = self.env.unwrapped.mujoco_renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # HalfCheetah's default camera stays put and a running agent leaves the picture: follow the torso
        # (gymnasium resets the camera type on every render, so we move the free camera's target instead).
        self.camera = viewer.cam
        self.follow = "trackbodyid" not in (self.env.unwrapped.mujoco_renderer.default_cam_config or {})
        # A segment of T steps lasts T * dt in real time; one shorter than min_seconds (Hopper's 0.48 s) is
        # too quick to judge, so it plays slowed down to min_seconds. Steps above max_fps are skipped.
        steps_per_second = 1.0 / config["dt"] / max(1.0, min_seconds / (config["segment_steps"] * config["dt"]))
        self.every = max(1, math.ceil(steps_per_second / max_fps))
        self.fps = steps_per_second / self.every

    def frames(self, qpos, qvel):
        """qpos (T, nq), qvel (T, nv) -> uint8 frames (ceil(T/every), H, W, 3)."""
        out = []
        for t in range(0, len(qpos), self.every):
            self.env.unwrapped.set_state(qpos[t], qvel[t])
            if self.follow:
                self.camera.lookat[0] = self.env.unwrapped.data.xpos[1][0]
            out.append(self.env.render().copy())  # the renderer reuses one buffer
        return np.stack(out)

    def write(self, path, qpos, qvel):
        """Encode to a scratch file (ffmpeg writes files), then write its bytes with write_atomic, so that a
        clip on disk is always whole and fsynced (a crash leaves only .tmp-* files, which nothing reads and
        open_run removes later)."""
        import imageio.v2 as imageio
        frames = self.frames(qpos, qvel)
        tmp = os.path.join(os.path.dirname(path), ".tmp-encode-" + os.path.basename(path))
        try:
            with imageio.get_writer(tmp, fps=self.fps, codec="libx264", quality=7, macro_block_size=16,
                                    ffmpeg_log_level="error") as writer:
                for frame in frames:
                    writer.append_data(frame)
            with open(tmp, "rb") as f:
                C.write_atomic(path, f.read())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def close(self):
        self.env.close()


# ---------------------------------------------------------------------------------------------- main

def evaluate(args, config):
    """Run whole episodes with the current policy (or random actions), log their true return and render
    the start of the first one to clips/policy_step<N>.mp4."""
    digest = policy_digest(args)
    if args.if_new_policy:
        done = earlier_evaluation(args, digest)
        if done is not None:
            print(f"evaluate: {done['policy']} policy was evaluated already ({done['episodes']} episodes, true "
                  f"return {done['true_return_mean']:.1f}); nothing to do")
            return
    seed = config["seed"] * 7919 + 12345
    envs = [C.make_env(config["env_id"], config["env_kwargs"]) for _ in range(args.evaluate)]
    policy, policy_step = load_policy(args, config, envs[0].action_space, seed)
    episodes = rollout_episodes(envs, policy, np.random.default_rng(seed), seed, 1)
    for env in envs:
        env.close()
    returns = [float(e["rewards"].sum()) for e in episodes]
    name = "random" if policy is None else f"step{policy_step}"
    clip = None
    if not args.no_clips:
        steps = int(args.clip_seconds / config["dt"])
        renderer = ClipRenderer(config, args.clip_size, args.clip_fps)
        clip = os.path.join(C.CLIPS_DIR, f"policy_{name}.mp4")
        renderer.write(os.path.join(args.run, clip), episodes[0]["qpos"][:steps], episodes[0]["qvel"][:steps])
        renderer.close()
    C.log_metrics(args.run, "evaluate", policy_step=policy_step, policy=name, policy_digest=digest,
                  episodes=len(returns), true_return_mean=float(np.mean(returns)),
                  true_return_std=float(np.std(returns)), clip=clip)
    print(f"evaluate: {name} policy, {len(returns)} episodes, true return {np.mean(returns):.1f} "
          f"+- {np.std(returns):.1f}" + (f", clip {os.path.join(args.run, clip)}" if clip else ""))
    if os.path.exists(os.path.join(args.run, C.LEARNING_CURVE)):  # (train_policy.py --no-plot leaves none)
        C.plot_learning_curve(args.run)  # with this evaluation on it


def policy_digest(args):
    """SHA-256 of the policy.pt that --evaluate evaluates (None for the random policy): which policy an
    evaluation was of, since a policy trained again from scratch to the same step has the same name."""
    path = os.path.join(args.run, C.POLICY)
    if args.random_policy or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def earlier_evaluation(args, digest):
    """The last metrics.jsonl record that evaluated the policy --evaluate would evaluate now (the same
    policy.pt, byte for byte: its policy_digest), with at least as many episodes and, unless --no-clips, a clip
    still on disk; None if there is none. An evaluation is a pure function of the run's seed and policy, so
    running it again would log the same figures a second time."""
    random_policy = args.random_policy or not os.path.exists(os.path.join(args.run, C.POLICY))
    name = "random" if random_policy else f"step{C.policy_step(args.run)}"
    for m in reversed(C.read_jsonl(os.path.join(args.run, C.METRICS), warn=False)):
        if (m.get("stage") == "evaluate" and m.get("policy") == name and m.get("policy_digest") == digest
                and m.get("episodes", 0) >= args.evaluate
                and (args.no_clips or (m.get("clip") and os.path.exists(os.path.join(args.run, m["clip"]))))):
            return m
    return None


def main():
    args = parse_args()
    new_run = C.read_config(args.run) is None
    there_before = set(os.listdir(args.run)) if os.path.isdir(args.run) else None
    config = C.open_run(args.run, args.env, args.seed, args.segment_seconds, env_kwargs=args.env_kwargs)
    os.makedirs(os.path.join(args.run, C.CLIPS_DIR), exist_ok=True)
    os.makedirs(os.path.join(args.run, C.SEGMENTS_DIR), exist_ok=True)
    if args.evaluate:
        return evaluate(args, config)
    # One collect at a time: two would give their rounds, segments and queries the same numbers.
    with C.exclusive(args.run):
        try:
            collect(args, config)
        except BaseException:
            if new_run:  # (under the lock: one refused by it leaves the run to the collect holding it)
                forget_empty_run(args.run, there_before)
            raise


def forget_empty_run(run, there_before):
    """Remove the config.json (and empty directories) open_run made for a new run whose first collect then
    failed, e.g. on episodes too short for its segments: left behind, it would refuse the same command with a
    shorter --segment-seconds. Only while the collect wrote nothing else; what was there before (there_before:
    the names in the directory, or None if there was none) is not touched."""
    try:
        before = there_before or set()
        subdirs = [os.path.join(run, d) for d in (C.SEGMENTS_DIR, C.CLIPS_DIR)]
        written = set(os.listdir(run)) - before - {C.CONFIG, C.SEGMENTS_DIR, C.CLIPS_DIR}
        if written or any(os.listdir(d) for d in subdirs if os.path.isdir(d)):
            return
        os.remove(os.path.join(run, C.CONFIG))
        for d in subdirs:
            if os.path.isdir(d) and os.path.basename(d) not in before:
                os.rmdir(d)
        if there_before is None:
            os.rmdir(run)
    except OSError:
        pass  # what is left stays, as it did before this cleanup: the user can remove it


def collect(args, config):
    """One round: segments, then clips, then queries, in that order, so that whatever a crash interrupts,
    every query on disk names segments (and clips) that are on disk. A re-run after a crash asks only what
    is still due and numbers everything after what is on disk or named by a query."""
    queries = C.read_queries(args.run)
    # Labels of queries that queries.jsonl no longer has (a lost or replaced file) would answer the new queries
    # numbered after what is left: refused here, as train_reward.py refuses them, before any id is given out.
    C.read_labels(args.run, queries, warn=False)
    round_index, first_id = C.next_round_and_segment_id(args.run, queries)
    policy_step = 0 if args.random_policy else C.policy_step(args.run)
    n_pairs = pairs_due(args, policy_step, len(queries))
    if n_pairs <= 0:
        print(f"collect: {len(queries)} pairs asked so far, none due at policy step {policy_step}")
        return
    started = time.time()
    # Independent streams for the rollout (env resets, actions, cuts) and for the choice of pairs, both fixed
    # by the run's seed and the round: a fresh run with the same seed asks the same pairs.
    rollout_seed, select_seed = (int(s) for s in np.random.SeedSequence([config["seed"], round_index])
                                 .generate_state(2))
    rng = np.random.default_rng(select_seed)

    model = C.load_reward_model(args.run, config) if args.selection == "disagreement" else None
    if args.selection == "disagreement" and model is None:
        print("collect: no reward model yet, so this round's pairs are chosen at random")
    pool, policy_step, mean_return = collect_segment_pool(args, config, 2 * n_pairs, rollout_seed)
    member_returns = segment_returns_per_member(model, pool) if model is not None else None
    pairs = select_pairs(len(pool["obs"]), n_pairs, rng, member_returns, args.candidates_factor)

    # Keep only the segments that are in a pair; number them after everything already on disk.
    used = np.unique(pairs)
    new_id = {int(j): first_id + i for i, j in enumerate(used)}
    segments = {k: pool[k][used] for k in ("obs", "acts", "rewards", "qpos", "qvel", "next_obs")}
    segments["ids"] = np.array([new_id[int(j)] for j in used], np.int64)
    segments["policy_step"] = np.full(len(used), policy_step, np.int64)
    segments["obs"] = segments["obs"].astype(np.float32)
    segments["next_obs"] = segments["next_obs"].astype(np.float32)
    segments["acts"] = segments["acts"].astype(np.float32)
    segments["rewards"] = segments["rewards"].astype(np.float32)
    C.save_segments(args.run, round_index, segments)

    clips = {}
    if not args.no_clips:
        renderer = ClipRenderer(config, args.clip_size, args.clip_fps, args.clip_min_seconds)
        for n, j in enumerate(used):
            rel = os.path.join(C.CLIPS_DIR, f"{new_id[int(j)]}.mp4")
            renderer.write(os.path.join(args.run, rel), pool["qpos"][j], pool["qvel"][j])
            clips[int(j)] = rel
            if sys.stderr.isatty() or n + 1 == len(used):
                print(f"\rcollect: rendered {n + 1}/{len(used)} clips", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        renderer.close()

    # Queries go last: a query only ever appears once its segments (and clips) are on disk.
    first_query = max(queries) + 1 if queries else 0
    selection = "random" if model is None else "disagreement"
    now = time.time()
    records = [{"query_id": first_query + i, "left": new_id[int(a)], "right": new_id[int(b)],
                "left_clip": clips.get(int(a)), "right_clip": clips.get(int(b)), "round": round_index,
                "selection": selection, "policy_step": policy_step, "time": round(now, 3)}
               for i, (a, b) in enumerate(pairs)]
    C.append_jsonl(os.path.join(args.run, C.QUERIES), records)
    C.log_metrics(args.run, "collect", round=round_index, policy_step=policy_step, pairs=len(records),
                  segments=len(used), pairs_total=len(queries) + len(records), selection=selection,
                  rollout_true_return=mean_return,
                  episode_steps=random_episode_steps(args, policy_step, config["segment_steps"]),
                  mean_action_envs=mean_action_envs(args, policy_step),
                  seconds=round(time.time() - started, 2))
    print(f"collect: round {round_index}, policy step {policy_step}, {len(records)} pairs ({selection}), "
          f"{len(used)} segments, {len(clips)} clips, {time.time() - started:.1f}s")


if __name__ == "__main__":
    C.run_main(main)
