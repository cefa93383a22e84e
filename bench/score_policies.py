"""Which behaviour does a reward model prefer? Rolls out the final policies of several runs of one env and
scores every episode twice: with the env's true reward and with one run's learned reward model (the
normalised reward the agent was trained on). If the model rates another policy, say PPO's on the true
reward, far above the agent trained on that very model, the reward model is not what holds the agent back:
the policy optimisation is.

    python bench/score_policies.py --reward-model bench/out/paper-500k-obs+act/HalfCheetah-v5-1400labels-s0 \
        --policies bench/out/paper-500k-obs+act/HalfCheetah-v5-1400labels-s0 \
                   bench/out/paper-500k-obs+act/HalfCheetah-v5-true-s0

Prints a markdown table: for each policy the mean and standard deviation over --episodes whole episodes of
the true and the learned return, and the correlation of the learned with the true reward step by step over
those episodes: how closely the model tracks the true reward among the states that policy visits, where its
gradient has to lead the agent on. For the planar bodies (HalfCheetah, Hopper, Walker2d), whose observation[1]
is the torso's pitch, it also gives the share of steps spent upside down (pitch beyond 90 degrees): a
HalfCheetah that flipped onto its back early runs on it, at about half the speed of one that stayed upright.
Actions are sampled from the policy, as in training and in collect.py --evaluate, or with --deterministic are
the policy's mean action. A policy is a run directory (its final policy.pt) or a checkpoint file of one, such as
a snapshot that train_policy.py --snapshot-steps kept (RUN/snapshots/policy_step26624.pt): how a run got where
it ended. Reads only; writes nothing.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402


PLANAR_ENVS = ("HalfCheetah", "Hopper", "Walker2d")  # observation[1] is the torso's pitch in radians


def upside_down_share(pitch):
    """Share of the steps whose torso pitch (radians, any number of turns; (T,)) is beyond 90 degrees either
    way, i.e. whose torso is upside down."""
    return float(np.mean(np.cos(pitch) < 0))


def policy_checkpoint(policy):
    """(run directory, checkpoint path) of a --policies entry: a run directory, whose policy.pt it is, or a
    checkpoint file in one, directly or in its snapshots/."""
    if os.path.isdir(policy):
        run, path = policy, os.path.join(policy, C.POLICY)
    elif os.path.isfile(policy):
        run, path = os.path.dirname(os.path.abspath(policy)), policy
        run = os.path.dirname(run) if os.path.basename(run) == C.SNAPSHOTS_DIR else run
    else:
        raise C.UserError(f"{policy} does not exist; give a run directory or a checkpoint file in one")
    if not os.path.exists(os.path.join(run, C.CONFIG)):
        raise C.UserError(f"{policy} is not a run directory nor a checkpoint in one: {run} has no {C.CONFIG}")
    return run, path


def episode_rewards(env, policy, reward_model, seed, deterministic=False):
    """One whole episode of T steps: (true rewards (T,), learned rewards (T,), terms, observations (T, D)),
    where terms sums each of the env's reward terms over the episode ({"forward": ..., "ctrl": ...}: the info
    entries "reward_*" that MuJoCo envs report, whose sum is the true reward)."""
    import torch
    obs, _ = env.reset(seed=seed)
    observations, actions, led_to, true_rewards, terms, done = [], [], [], [], {}, False
    while not done:
        action = policy.act(obs[None], deterministic=deterministic)[0]
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        led_to.append(obs)
        true_rewards.append(float(reward))
        for key in info:
            if key.startswith("reward_"):
                terms[key[len("reward_"):]] = terms.get(key[len("reward_"):], 0.0) + float(info[key])
        done = terminated or truncated
    # Each step's reward of the state the model was fitted to reward it for (contract.REWARD_STATES).
    rewarded = led_to if C.rewards_led_to_state(reward_model.inputs, reward_model.reward_state) else observations
    x = torch.as_tensor(C.reward_input(np.array(rewarded), np.array(actions), reward_model.inputs, np.array(led_to)))
    with torch.no_grad():
        learned_rewards = reward_model.normalized_reward(x.float()).numpy()
    return np.array(true_rewards), learned_rewards, terms, np.array(observations)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reward-model", required=True, help="run directory whose reward_model.pt scores the episodes")
    p.add_argument("--policies", nargs="+", required=True,
                   help="run directories whose policy.pt to roll out, or checkpoint files in them (snapshots/*.pt)")
    p.add_argument("--episodes", type=int, default=5, help="episodes per policy (at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode's reset")
    p.add_argument("--deterministic", action="store_true",
                   help="act with the policy's mean action instead of sampling (how much does its noise cost?)")
    args = p.parse_args()
    if args.episodes < 1:
        p.error(f"argument --episodes: at least 1, not {args.episodes}")
    import torch
    torch.set_num_threads(1)

    config = C.read_config(args.reward_model)
    reward_model = C.load_reward_model(args.reward_model)
    if reward_model is None:
        raise C.UserError(f"{args.reward_model} has no {C.REWARD_MODEL}")
    env = C.make_env(config["env_id"], config["env_kwargs"])
    obs_dim, act_dim = config["obs_shape"][0], config["act_shape"][0]
    lines = [f"{config['env_id']}, reward model of {args.reward_model} ({reward_model.inputs}), "
             f"{args.episodes} episodes per policy, {'mean' if args.deterministic else 'sampled'} actions.", "",
             "| policy of | policy step | true return | learned return | corr(learned, true) per step "
             "| the true return's terms | share of steps upside down |", "|---|---|---|---|---|---|---|"]
    planar = config["env_id"].split("-")[0] in PLANAR_ENVS
    for policy_path in args.policies:
        run, checkpoint_path = policy_checkpoint(policy_path)
        other = C.read_config(run)
        if (other["env_id"], other["env_kwargs"]) != (config["env_id"], config["env_kwargs"]):
            raise C.UserError(f"{run} is a run of {other['env_id']} {other['env_kwargs']}, not of "
                              f"{config['env_id']} {config['env_kwargs']}")
        checkpoint = C.load_torch(checkpoint_path, "policy checkpoint", kind=C.POLICY)
        policy = C.PolicyForRollout(checkpoint, obs_dim, act_dim, env.action_space.low, env.action_space.high,
                                    seed=args.seed)
        episodes = [episode_rewards(env, policy, reward_model, args.seed + i, args.deterministic)
                    for i in range(args.episodes)]
        trues, learneds, term_sums, observations = zip(*episodes)
        scores = np.array([(true.sum(), learned.sum()) for true, learned in zip(trues, learneds)])
        correlation = np.corrcoef(np.concatenate(trues), np.concatenate(learneds))[0, 1]
        terms = ", ".join(f"{key} {np.mean([t[key] for t in term_sums]):.0f}" for key in term_sums[0])
        pitch = np.concatenate([o[:, 1] for o in observations])
        upside_down = f"{upside_down_share(pitch):.2f}" if planar else "-"
        lines.append(f"| {policy_path} | {checkpoint['global_step']} "
                     f"| {scores[:, 0].mean():.0f} +- {scores[:, 0].std():.0f} "
                     f"| {scores[:, 1].mean():.0f} +- {scores[:, 1].std():.0f} | {correlation:.2f} | {terms} "
                     f"| {upside_down} |")
        print(f"score_policies: {policy_path}: true {scores[:, 0].mean():.1f}, learned {scores[:, 1].mean():.1f}",
              file=sys.stderr, flush=True)
    env.close()
    print("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
