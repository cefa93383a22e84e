"""What does a reward model pay a planar body (HalfCheetah; Hopper and Walker2d only where their episodes go on
after a fall) for being upside down, and how much do its ensemble's members agree about it? A HalfCheetah that
flips onto its back early runs on it for the rest of the run, at about half the speed of one that stayed upright
(BENCHMARKS.md); a first reward model that pays for the flip makes PPO take it.

    .venv/bin/python bench/upside_down.py --models bench/out/paper-500k/HalfCheetah-v5-700labels-s{0..9}

Scores the states of the --states runs' segment files (default: the --models runs' own, pooled: the same states
for every model) with each model, and prints a table, one row per model:
  reward upright / upside down   the members' normalised rewards averaged (the reward the agent is paid),
                                 mean over the states whose torso pitch (observation[1]) is within / beyond 90
                                 degrees
  members' std upright / upside down   the std over the members of their normalised rewards, mean over those
                                 states: how much the ensemble disagrees (what train_policy.py --explore-coef
                                 adds, or with a negative weight subtracts)
  bonus   the least-squares reward of being upside down at the same forward speed and pitch rate: r ~ a * speed
          + bonus * [upside down] + c * pitch rate + d over all the states, and that bonus in units of speed
          (bonus / a, m/s on HalfCheetah), and a itself
and under the table the same fit of the true reward of those steps, which is what the labels were about, and the
mean true return of the segments with and without an upside-down state.
Reads only; writes nothing.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="run directories with a reward_model.pt")
    p.add_argument("--states", nargs="+", default=None,
                   help="run directories whose segments' states to score (default: the --models runs)")
    p.add_argument("--speed-feature", type=int, default=8,
                   help="observation index of the forward speed (HalfCheetah 8, Hopper 5, Walker2d 8)")
    p.add_argument("--pitch-rate-feature", type=int, default=10,
                   help="observation index of the torso's pitch rate (HalfCheetah 10, Hopper 7, Walker2d 10)")
    return p.parse_args(argv)


def is_upside_down(pitch):
    """pitch (...,) radians, any number of turns -> bool (...,): the torso tipped beyond 90 degrees either way
    (bench/score_policies.py's upside_down_share is the mean of this)."""
    return np.cos(pitch) < 0


def upside_down_reward(members, obs, speed_feature, pitch_rate_feature):
    """members (K, B): each member's normalised reward of the states obs (B, D), whose [:, 1] is the torso's
    pitch. Returns the table's figures: reward and members' std, upright and upside down; the bonus for being
    upside down and the speed's coefficient of the least-squares fit."""
    upside = is_upside_down(obs[:, 1])
    if upside.all() or not upside.any():
        raise C.UserError("the states are all upright or all upside down: nothing to compare")
    reward, spread = members.mean(0), members.std(0)
    design = np.stack([obs[:, speed_feature], upside, obs[:, pitch_rate_feature], np.ones(len(obs))], 1)
    (per_speed, bonus, _, _), *_ = np.linalg.lstsq(design.astype(np.float64), reward.astype(np.float64),
                                                   rcond=None)
    return {"reward_upright": float(reward[~upside].mean()), "reward_upside_down": float(reward[upside].mean()),
            "std_upright": float(spread[~upside].mean()), "std_upside_down": float(spread[upside].mean()),
            "bonus": float(bonus), "per_speed": float(per_speed)}


def run_config(run):
    """The run's config.json, or one sentence saying that `run` is not a run directory."""
    config = C.read_config(run)
    if config is None:
        raise C.UserError(f"{run} is not a run directory (it has no {C.CONFIG})")
    return config


def in_speed_units(fit):
    """The fit's bonus divided by its reward per unit of speed, as text; n/a where the reward does not rise with
    the speed (a wrong --speed-feature, or a model that learnt nothing), where the quotient would mislead."""
    return f"{fit['bonus'] / fit['per_speed']:+.2f}" if fit["per_speed"] > 1e-6 else "n/a"


def main():
    args = parse_args()
    import torch
    env_ids, states, rewards, returns, flipped = set(), [], [], [], []
    for run in args.states or args.models:
        env_ids.add(run_config(run)["env_id"])
        if len(env_ids) > 1:
            raise C.UserError(f"the runs whose states to score are of {' and '.join(sorted(env_ids))}; give runs "
                              f"of one env")
        segments = C.load_segments(run)
        if segments is None:
            raise C.UserError(f"{run} has no segment files to take states from")
        states.append(segments["obs"].reshape(-1, segments["obs"].shape[-1]))
        rewards.append(segments["rewards"].reshape(-1))
        returns.append(segments["rewards"].sum(1))
        flipped.append(is_upside_down(segments["obs"][..., 1]).any(1))  # (N,): any step upside down
    obs, rewards, returns, flipped = (np.concatenate(a) for a in (states, rewards, returns, flipped))
    (env_id,) = env_ids
    for feature in (args.speed_feature, args.pitch_rate_feature):
        if not 1 < feature < obs.shape[1]:
            raise C.UserError(f"observation feature {feature} is not one of this env's 2..{obs.shape[1] - 1}")
    upside_down = is_upside_down(obs[:, 1])
    if not upside_down.any():
        raise C.UserError(f"none of the {len(obs)} states is upside down, so there is no bonus to measure (Hopper "
                          f"and Walker2d episodes end before the torso tips that far); give runs with such states")
    if upside_down.all():
        raise C.UserError(f"all {len(obs)} states are upside down, so there is nothing upright to compare them with")
    models = []
    for run in args.models:
        config = run_config(run)
        if config["env_id"] != env_id:
            raise C.UserError(f"{run} is a run of {config['env_id']}; the states are of {env_id}")
        model = C.load_reward_model(run, config)
        if model is None:
            raise C.UserError(f"{run} has no {C.REWARD_MODEL} yet; run train_reward.py on it first")
        if model.inputs != "obs":
            raise C.UserError(f"{run}'s reward model is of {model.inputs}; this scores models of the observation only")
        models.append((run, model))
    print(f"{len(obs)} states of {env_id}, {upside_down.mean():.3f} of them upside down\n")
    print("| model | reward upright | reward upside down | members' std upright | members' std upside down "
          "| bonus (in speed units) | reward per unit of speed |\n|---|---|---|---|---|---|---|")
    for run, model in models:
        with torch.no_grad():
            members = model.member_rewards(torch.as_tensor(C.reward_input(obs, None, model.inputs),
                                                           dtype=torch.float32)).numpy()
        model_fit = upside_down_reward(members, obs, args.speed_feature, args.pitch_rate_feature)
        print(f"| {run} | {model_fit['reward_upright']:+.2f} | {model_fit['reward_upside_down']:+.2f} "
              f"| {model_fit['std_upright']:.2f} | {model_fit['std_upside_down']:.2f} | {model_fit['bonus']:+.2f} "
              f"({in_speed_units(model_fit)}) | {model_fit['per_speed']:+.2f} |")
    true_fit = upside_down_reward(rewards[None], obs, args.speed_feature, args.pitch_rate_feature)
    print(f"\nThe true reward of those steps, fitted the same way: bonus {true_fit['bonus']:+.3f} "
          f"({in_speed_units(true_fit)} in speed units), per unit of speed {true_fit['per_speed']:.3f}. "
          f"Mean true return of the {flipped.sum()} segments with a step upside down {returns[flipped].mean():+.2f}, "
          f"of the other {(~flipped).sum()} {returns[~flipped].mean():+.2f}.")


if __name__ == "__main__":
    C.run_main(main)
