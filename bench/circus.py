"""The agent circus: teach behaviours that no environment rewards, from scratch, with synthetic teachers that
judge segments by the behaviour's own formula (label.py's BEHAVIOURS), at most 1000 labels each.

    python bench/circus.py                                    # cheetah_backwards and reacher_spin_ccw
    python bench/circus.py --behaviours hopper_backflip

For each behaviour it runs loop.sh with `TEACHER=synthetic TEACHER_FLAGS="--behaviour NAME"`, then measures the
behaviour (mean per-step value of its formula over whole evaluation episodes) for the trained agent, the random
policy and an agent trained with PPO on the env's normal reward for the same number of steps. Writes a clip of
each trained agent, a frame strip per behaviour (bench/results/circus_NAME.png) and the table
bench/out/circus.md. Resumable: finished runs are kept under --out.
"""
import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import collect  # noqa: E402  (a benchmark, not a stage: it may reuse the rollout code)
import contract as C  # noqa: E402
import label  # noqa: E402

# name: (env id, label budget, policy steps, segment seconds, what the measure means)
CIRCUS = {
    "cheetah_backwards": ("HalfCheetah-v5", 800, 500_000, 1.5, "backward velocity (m/s)"),
    "reacher_spin_ccw": ("Reacher-v5", 600, 300_000, 0.5, "counter-clockwise angular velocity of joint 0 (rad/s)"),
    "hopper_backflip": ("Hopper-v5", 900, 1_000_000, 1.5, "backward pitch rate + 2 x height above 1.25 m"),
}


def sh(command, env=None, log=None):
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "MUJOCO_GL": "egl", **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (see {log.name if log else 'output'})")


def measure(run, behaviour, episodes, random_policy=False):
    """Mean per-step value of the behaviour over `episodes` whole episodes of the run's policy."""
    config = C.open_run(run)
    envs = [C.make_env(config["env_id"], config["env_kwargs"]) for _ in range(episodes)]

    class Args:
        pass
    args = Args()
    args.run, args.random_policy = run, random_policy
    policy, _ = collect.load_policy(args, config, envs[0].action_space, seed=123)
    rollouts = collect.rollout_episodes(envs, policy, np.random.default_rng(123), 123, 1)
    for env in envs:
        env.close()
    return float(np.mean([np.mean(behaviour(e)) for e in rollouts]))


def frame_strip(clip_path, png_path, frames=6):
    import imageio.v2 as imageio
    video = imageio.mimread(clip_path, memtest=False)
    picks = np.linspace(0, len(video) - 1, frames).astype(int)
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    C.write_atomic(png_path, imageio.imwrite("<bytes>", np.concatenate([video[i] for i in picks], axis=1),
                                             extension=".png"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--behaviours", nargs="+", default=["cheetah_backwards", "reacher_spin_ccw"],
                   choices=sorted(CIRCUS))
    p.add_argument("--episodes", type=int, default=5, help="evaluation episodes per agent")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "circus"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.behaviours:
        env_id, labels, steps, seconds, meaning = CIRCUS[name]
        behaviour = label.BEHAVIOURS[name]
        taught = os.path.join(args.out, name)
        baseline = os.path.join(args.out, f"{env_id}-true")
        with open(os.path.join(args.out, f"{name}.log"), "a") as log:
            sh(["bash", "loop.sh"], log=log, env={
                "RUN": taught, "ENV_ID": env_id, "LABELS": str(labels), "TOTAL_STEPS": str(steps),
                "SEGMENT_SECONDS": str(seconds), "TEACHER": "synthetic", "TEACHER_FLAGS": f"--behaviour {name}",
                "PYTHON": sys.executable})
            os.makedirs(baseline, exist_ok=True)
            if not os.path.exists(os.path.join(baseline, C.CONFIG)):  # same env, kwargs and segment length
                config = C.open_run(taught)
                C.write_json_atomic(os.path.join(baseline, C.CONFIG), config)
            sh([sys.executable, "train_policy.py", "--run", baseline, "--env", env_id, "--reward", "true",
                "--total-steps", str(steps)], log=log)
        metrics = C.read_jsonl(os.path.join(taught, C.METRICS))
        evaluations = [m for m in metrics if m["stage"] == "evaluate" and m["policy"] != "random"]
        clip = evaluations[-1]["clip"]
        minutes = (evaluations[0]["time"] - metrics[0]["time"]) / 60  # the first whole loop, also when re-run
        strip = os.path.join(ROOT, "bench", "results", f"circus_{name}.png")
        frame_strip(os.path.join(taught, clip), strip)
        row = (name, env_id, len(C.read_labels(taught)), steps, meaning,
               measure(taught, behaviour, args.episodes), measure(taught, behaviour, args.episodes, True),
               measure(baseline, behaviour, args.episodes), minutes, os.path.join(taught, clip), strip)
        rows.append(row)
        print(f"{name}: taught {row[5]:.2f}, random {row[6]:.2f}, env-reward agent {row[7]:.2f} "
              f"({meaning}); {minutes:.1f} min; clip {row[9]}", flush=True)
    lines = ["| behaviour | env | labels | policy steps | measure | taught agent | random policy | "
             "agent trained on the env reward | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.0f} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    C.write_atomic(os.path.join(args.out, "circus.md"), table.encode())
    print("\n" + table)


if __name__ == "__main__":
    main()
