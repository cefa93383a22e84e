"""PPO throughput: our train_policy.py against Stable-Baselines3's PPO, side by side in one run, same env,
same step budget, same hyperparameters (8 envs x 256 steps, 10 epochs of 64-sample minibatches, 64x64 tanh
networks, observation and reward normalisation), each with the env's true reward and with a learned reward
ensemble (3 members, 2x64) evaluated for all envs of a step in one batched forward pass.

    pip install stable-baselines3==2.9.2     # for this benchmark only (make bench-ppo does it)
    python bench/bench_ppo.py --steps 200000

Each configuration runs in its own process, one torch thread (the fairest setting for both on 2 cores);
ours also runs with --overlap, which collects the next rollout in a second process, on the second core, while
the first updates. Reported: env steps per second of wall-clock time (the figure that counts on a machine
left to the benchmark) and per CPU second (the fair figure when other jobs share the cores) over the whole
run, rollouts and updates, and the peak resident memory of the largest process; and, timed inside this
process, one rollout and one update of ours (the slower of the two bounds --overlap). Writes a markdown table
to bench/out/ppo.md.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402

SB3_SCRIPT = r'''
import sys, time, numpy as np, torch, gymnasium as gym
sys.path.insert(0, ROOT)
import contract as C
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize, VecEnvWrapper
torch.set_num_threads(1)
config = C.open_run(RUN)

class LearnedReward(VecEnvWrapper):
    """Replaces the env reward by the reward ensemble's, one batched forward pass per vector step."""
    def __init__(self, venv, model):
        super().__init__(venv)
        self.model = model
    def reset(self):
        self.last_obs = self.venv.reset()
        return self.last_obs
    def step_async(self, actions):
        self.actions = np.clip(actions, self.action_space.low, self.action_space.high)
        self.venv.step_async(actions)
    def step_wait(self):
        obs, _, dones, infos = self.venv.step_wait()
        with torch.no_grad():
            reward = self.model.normalized_reward(torch.as_tensor(C.reward_input(self.last_obs, self.actions, self.model.inputs))).numpy()
        self.last_obs = obs
        return obs, reward, dones, infos

venv = DummyVecEnv([lambda: C.make_env(config["env_id"], config["env_kwargs"]) for _ in range(8)])
if REWARD == "learned":
    venv = LearnedReward(venv, C.load_reward_model(RUN))
venv = VecNormalize(venv, gamma=0.99)
model = PPO("MlpPolicy", venv, n_steps=256, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99,
            gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, device="cpu",
            seed=0, verbose=0)
start = time.time()
model.learn(total_timesteps=STEPS)
print("SPS", STEPS / (time.time() - start))
'''


def run_measured(command):
    """Run a command as a child; return (wall seconds, CPU seconds, peak RSS MiB, stdout) from wait4's rusage.
    CPU seconds (user + system) are what a configuration costs even when other jobs share the cores."""
    start = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"})
    out = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out[-3000:]}")
    return time.time() - start, rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss / 1024, out


def time_rollout_and_update(run, repeats=5):
    """(Median seconds of one rollout (Rollouts.collect, 8 x 256 steps, true reward), of one update (ppo_update,
    10 epochs over them), the rollout's steps) of our PPO, in this process with one torch thread. With
    --overlap the slower of the two bounds the speed; without it, they add up."""
    import numpy as np
    import torch
    import train_policy
    torch.set_num_threads(1)
    args = train_policy.parse_args(["--run", run, "--reward", "true", "--num-envs", "8", "--num-steps", "256"])
    config = C.read_config(run)
    net = C.build_actor_critic(config["obs_shape"][0], config["act_shape"][0], args.hidden)
    optimizer = C.FlatAdam(net, lr=args.lr, eps=1e-5)
    rollouts = train_policy.Rollouts(args, config, None, C.RunningMeanStd(tuple(config["obs_shape"])),
                                     C.RunningMeanStd(()), 0)
    rollout_seconds, update_seconds = [], []
    for _ in range(repeats + 1):  # the first of each warms up
        start = time.perf_counter()
        batch, _ = rollouts.collect(net)
        rollout_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        train_policy.ppo_update(net, optimizer, batch, args)
        update_seconds.append(time.perf_counter() - start)
    rollouts.close()
    steps = args.num_envs * args.num_steps
    return float(np.median(rollout_seconds[1:])), float(np.median(update_seconds[1:])), steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=200_000, help="env steps per configuration")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = p.parse_args()
    py = sys.executable
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # A reward model trained on a few oracle labels, so the learned-reward runs use a real one.
        base = os.path.join(tmp, "base")
        for command in (["collect.py", "--run", base, "--env", args.env, "--pairs", "100", "--no-clips"],
                        ["label.py", "teach", "--run", base], ["train_reward.py", "--run", base, "--steps", "100"]):
            run_measured([py] + command)  # (wall, CPU, RSS, output) unused here
        rollout_seconds, update_seconds, rollout_steps = time_rollout_and_update(base)
        rows = []
        for impl in ("ours", "overlap", "sb3"):
            for reward in ("true", "learned"):
                run = os.path.join(tmp, f"{impl}-{reward}")
                subprocess.run(["cp", "-r", base, run], check=True)
                if impl in ("ours", "overlap"):
                    command = [py, "train_policy.py", "--run", run, "--reward", reward, "--total-steps",
                               str(args.steps), "--num-envs", "8", "--num-steps", "256", "--no-plot"]
                    command += ["--overlap"] if impl == "overlap" else []
                else:
                    script = SB3_SCRIPT.replace("ROOT", repr(ROOT)).replace("RUN", repr(run)) \
                        .replace("REWARD", repr(reward)).replace("STEPS", str(args.steps))
                    command = [py, "-c", script]
                seconds, cpu, rss, out = run_measured(command)
                rows.append((impl, reward, args.steps / seconds, args.steps / cpu, rss))
                print(f"{impl:7s} {reward:7s} reward: {args.steps / seconds:7.0f} steps/s wall, "
                      f"{args.steps / cpu:7.0f} steps per CPU second, peak RSS {rss:6.0f} MiB", flush=True)
    wall = {(i, r): w for i, r, w, _, _ in rows}
    cpu = {(i, r): c for i, r, _, c, _ in rows}
    names = {"ours": "ours (train_policy.py)", "overlap": "ours, --overlap (2 processes)",
             "sb3": "Stable-Baselines3 2.9.2"}
    lines = [f"{args.env}, {args.steps:,} steps per configuration, 8 envs, 1 torch thread, whole process "
             f"(start-up, rollouts and updates).", "",
             "| implementation | reward | steps/s (wall) | steps per CPU second | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {names[i]} | {r} | {w:.0f} | {c:.0f} | {m:.0f} |" for i, r, w, c, m in rows]
    lines += [""] + [f"Speed-up of {names[i]} over SB3, wall-clock: {wall[i, 'true'] / wall['sb3', 'true']:.2f}x "
                     f"with the true reward, {wall[i, 'learned'] / wall['sb3', 'learned']:.2f}x with the learned "
                     f"reward; per CPU second: {cpu[i, 'true'] / cpu['sb3', 'true']:.2f}x and "
                     f"{cpu[i, 'learned'] / cpu['sb3', 'learned']:.2f}x." for i in ("ours", "overlap")]
    lines += [f"Cost of the learned reward in our PPO: "
              f"{100 * (cpu['ours', 'true'] / cpu['ours', 'learned'] - 1):.1f}% more CPU time per step.",
              f"One rollout of ours (8 x 256 steps, true reward) takes {rollout_seconds:.3f} s and one update "
              f"(10 epochs of 32 minibatches) {update_seconds:.3f} s, in one process (median of 5), so --overlap "
              f"is bounded by {rollout_steps / max(rollout_seconds, update_seconds):.0f} steps/s."]
    table = "\n".join(lines) + "\n"
    C.write_atomic(os.path.join(args.out, "ppo.md"), table.encode())
    print("\n" + table)


if __name__ == "__main__":
    main()
