"""Stage 4 of the loop: train the agent with PPO on the learned reward (or, as a baseline, the env's own).

PPO for continuous actions, written out here in torch after CleanRL's ppo_continuous_action.py: several
environments stepped together, GAE, clipped surrogate and value losses, observation normalisation and
return-based reward scaling, a state-independent Gaussian policy. Time-limit truncation bootstraps from the
value of the final observation instead of pretending the episode ended. The learned reward of all
environments of a step is one batched forward pass of the reward ensemble. With --overlap a second process
collects the next rollout while this one updates (each rollout then comes from the policy one update old).

    python train_policy.py --run data/cheetah --total-steps 300000          # learned reward
    python train_policy.py --run data/cheetah-rl --env HalfCheetah-v5 --reward true --total-steps 1000000

--total-steps is the policy's step count to reach: a second call resumes from policy.pt and trains on until
it, so loop.sh can alternate it with the reward trainer.
Reads: config.json, reward_model.pt, policy.pt. Writes: policy.pt, metrics.jsonl, learning_curve.png.
"""
import argparse
import os
import resource
import time

import numpy as np
import torch

import contract as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--env", default=None, help="gymnasium env id; required when the run is new")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of a new run (default 0; stored in config.json, and a run's own is kept)")
    p.add_argument("--env-kwargs", type=C.env_kwargs_flag, default=None,
                   help="JSON keyword arguments for gym.make of a new run, e.g. '{\"terminate_when_unhealthy\": "
                        "true}' for the original Hopper (default: the paper's task, contract.TASK_KWARGS)")
    p.add_argument("--reward", choices=["learned", "true"], default="learned", help="reward to maximise")
    p.add_argument("--total-steps", type=int, default=300_000, help="train until the policy has this many steps")
    p.add_argument("--anneal-steps", type=int, default=None,
                   help="learning rate decays linearly to 0 at this step (default: --total-steps); 0 keeps it "
                        "constant, for a reward that keeps changing")
    p.add_argument("--num-envs", type=int, default=8, help="environments stepped together")
    p.add_argument("--async-envs", action="store_true", help="step environments in worker processes")
    p.add_argument("--overlap", action="store_true",
                   help="collect the next rollout on a second core while updating (one update of policy lag)")
    p.add_argument("--num-steps", type=int, default=256, help="steps per environment per rollout")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--gamma", type=float, default=0.99, help="discount")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--num-minibatches", type=int, default=32, help="minibatches per epoch")
    p.add_argument("--update-epochs", type=int, default=10, help="epochs per rollout")
    p.add_argument("--clip-coef", type=float, default=0.2, help="surrogate clipping")
    p.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus")
    p.add_argument("--ent-anneal", action="store_true",
                   help="the entropy bonus decays to 0 with the learning rate: explore early, act precisely late")
    p.add_argument("--explore-coef", type=float, default=0.0,
                   help="learned reward only: add this times the reward ensemble's disagreement (std of its "
                        "members' normalised rewards), decaying to 0 with the learning rate, so that the agent "
                        "visits what the model is unsure of and the next labels are asked there (RUNE); "
                        "negative: a penalty instead, so that the agent keeps away from states the model has "
                        "seen too rarely to agree on (a conservative reward)")
    p.add_argument("--reward-state", choices=C.REWARD_STATES, default=None,
                   help="which observation a model of the observation alone rewards a step for: the one the "
                        "step started from, or the one its action led to (BENCHMARKS.md, 'Which state a step's "
                        "reward is of'); default: the one reward_model.pt was fitted to (train_reward.py "
                        "--reward-state)")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clipping")
    p.add_argument("--target-kl", type=float, default=None, help="stop an update's epochs early above this KL")
    p.add_argument("--init-log-std", type=float, default=0.0,
                   help="log std of a new policy's actions, -10 to 2 (CleanRL's 0: std 1; a resumed run keeps its "
                        "own)")
    p.add_argument("--hidden", type=int, default=64, help="width of the policy and value MLPs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (small nets: 1 is fastest)")
    p.add_argument("--save-every", type=int, default=20, help="updates between checkpoints")
    p.add_argument("--snapshot-steps", type=int, nargs="+", default=[], metavar="STEP",
                   help="also keep the policy as snapshots/policy_step<S>.pt at the first update at or past each "
                        "of these env steps (S: that update's step), to look at how a run got where it ended")
    p.add_argument("--no-plot", action="store_true", help="do not redraw learning_curve.png")
    args = p.parse_args(argv)
    # A mistyped flag is one sentence now, before the run directory is touched, rather than a traceback later.
    rules = {"--seed": args.seed is None or args.seed >= 0, "--total-steps": args.total_steps >= 0,
             "--num-envs": args.num_envs >= 1, "--num-steps": args.num_steps >= 1,
             # at least 2 rows each: the advantages of a minibatch are normalised by their std
             "--num-minibatches": 1 <= args.num_minibatches <= args.num_envs * args.num_steps // 2,
             # (upper bounds: inf trains NaN weights without an error, 1e308 overflows torch's float32)
             "--update-epochs": args.update_epochs >= 1, "--lr": 0 < args.lr <= 1, "--gamma": 0 <= args.gamma <= 1,
             "--gae-lambda": 0 <= args.gae_lambda <= 1, "--clip-coef": 0 < args.clip_coef < 1e6,
             "--ent-coef": 0 <= args.ent_coef < 1e6, "--explore-coef": abs(args.explore_coef) < 1e6,
             "--vf-coef": 0 <= args.vf_coef < 1e6, "--max-grad-norm": 0 < args.max_grad_norm < 1e6,
             "--target-kl": args.target_kl is None or 0 < args.target_kl < 1e6, "--hidden": args.hidden >= 1,
             "--threads": args.threads >= 1, "--save-every": args.save_every >= 1,
             "--snapshot-steps": all(step >= 1 for step in args.snapshot_steps),
             "--init-log-std": -10 <= args.init_log_std <= 2}  # (and not nan)
    for flag, ok in rules.items():
        if not ok:
            p.error(f"argument {flag}: value out of range (see --help)")
    return args


# ------------------------------------------------------------------------------------- PPO arithmetic

def compute_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Generalised advantage estimation. rewards, values, dones: (T, N) with dones[t] = 1 if the episode
    had ended before step t (so values[t] starts a new episode); next_value, next_done: (N,) for the state
    after the last step. Returns (advantages, returns), each (T, N)."""
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        not_done = 1.0 - (next_done if t == steps - 1 else dones[t + 1])
        following = next_value if t == steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * following * not_done - values[t]
        last = delta + gamma * lam * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def learning_rate(step, lr, anneal_steps):
    """Adam's learning rate at policy step `step`: lr decaying linearly to 0 at anneal_steps, or lr throughout
    when anneal_steps is 0."""
    return lr * max(0.0, 1.0 - step / anneal_steps) if anneal_steps else lr


def entropy_coef(lr_now, args):
    """The entropy bonus of an update at learning rate lr_now: --ent-coef, or with --ent-anneal the same share
    of it as lr_now is of --lr (so it decays along the learning rate's schedule)."""
    return args.ent_coef * (lr_now / args.lr) if args.ent_anneal else args.ent_coef


def exploration_coef(step, args):
    """The weight of the reward ensemble's disagreement in the reward at policy step `step`: --explore-coef,
    decaying as the learning rate does (linearly to 0 at --anneal-steps, default --total-steps; constant if
    that is 0). Early models are unsure of much, and the bonus pays the agent to show them; the final agent
    should maximise the reward alone. A negative weight penalises the disagreement instead: an early model's
    reward for states it saw rarely is a guess its members disagree on, and the penalty keeps the agent from
    chasing it before labels have checked it."""
    anneal_steps = args.total_steps if args.anneal_steps is None else args.anneal_steps
    return learning_rate(step, args.explore_coef, anneal_steps)


def clipped_policy_loss(advantages, ratio, clip_coef):
    """PPO's clipped surrogate, to minimise: mean(max(-A r, -A clip(r, 1-c, 1+c)))."""
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()


def scale_rewards(rewards, discounted, return_rms, dones, gamma, clip=10.0):
    """Return-based reward scaling (gymnasium's NormalizeReward): divide by the running std of the
    discounted return. rewards, dones: (N,); discounted: (N,) running discounted returns, updated in place.
    Returns the scaled rewards (N,)."""
    discounted[:] = discounted * gamma * (1 - dones) + rewards
    return_rms.update(discounted[:, None])
    return np.clip(rewards / np.sqrt(return_rms.var[0] + 1e-8), -clip, clip)


LOG_SQRT_2PI = 0.5 * float(np.log(2 * np.pi))


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)) summed over action dims: (B, act_dim) -> (B,). Written out because
    torch.distributions' argument checks cost more than the arithmetic on these tiny batches."""
    return (-0.5 * ((action - mean) * torch.exp(-log_std)) ** 2 - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of N(mean, exp(log_std)) summed over action dims: (..., act_dim) -> (...). It does not depend
    on the mean, so for our state-independent std it is the same for every observation."""
    return (log_std + 0.5 + LOG_SQRT_2PI).sum(-1)


# ------------------------------------------------------------------------------------------ rollouts

def make_envs(args, config):
    import gymnasium as gym
    factories = [lambda: C.make_env(config["env_id"], config["env_kwargs"]) for _ in range(args.num_envs)]
    vector = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    return vector(factories, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class Rollouts:
    """Steps the vector env with a policy, --num-steps steps at a time. Owns everything stepping changes: the
    envs, the observation and return normalisers, the running discounted returns and episode sums."""

    def __init__(self, args, config, reward_model, obs_rms, return_rms, start_step):
        self.args, self.reward_model, self.obs_rms, self.return_rms = args, reward_model, obs_rms, return_rms
        self.envs = make_envs(args, config)
        self.low, self.high = self.envs.single_action_space.low, self.envs.single_action_space.high
        self.step = start_step
        # Which state the learned reward is of, fixed for the run: --reward-state, else what the model was fitted to.
        self.reward_after = reward_model is not None and \
            C.rewards_led_to_state(reward_model.inputs, args.reward_state or reward_model.reward_state)
        # Whether the model needs the state each action led to: to reward it, or beside the one it started from.
        self.needs_led_to = self.reward_after or (reward_model is not None and reward_model.inputs == "obs+next")
        n = args.num_envs
        self.raw_obs, _ = self.envs.reset(seed=config["seed"] * 10_007 + start_step)
        self.next_done = torch.zeros(n)
        self.discounted = np.zeros(n)
        self.episode_true, self.episode_learned, self.episode_len = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)

    def collect(self, net):
        """Run net's policy for T = --num-steps steps of all N envs. Returns (batch, episodes). batch: tensors
        obs (T, N, obs_dim) normalised as the policy saw them, act (T, N, act_dim) as sampled (before clipping
        to the action bounds), logp, val, rew (scaled, plus gamma * V(final observation) where a time limit
        cut the episode) and done (1 where an episode had ended before that step), each (T, N); next_value and
        next_done (N,) for the state after the last step. episodes: one dict per episode that ended, with its
        true and learned return (the learned one without --explore-coef's bonus)."""
        args, n, reward_model = self.args, self.args.num_envs, self.reward_model
        obs_buf = torch.zeros((args.num_steps, n, self.raw_obs.shape[1]))
        act_buf = torch.zeros((args.num_steps, n, self.low.shape[0]))
        logp_buf, rew_buf, done_buf, val_buf = (torch.zeros((args.num_steps, n)) for _ in range(4))
        episodes = []
        explore_coef = exploration_coef(self.step, args) if reward_model is not None else 0.0
        for t in range(args.num_steps):
            self.obs_rms.update(self.raw_obs)
            obs = torch.as_tensor(C.normalize_obs(self.raw_obs, self.obs_rms))
            with torch.no_grad():
                mean = net.actor_mean(obs)
                log_std = net.actor_logstd.expand_as(mean)
                action = mean + log_std.exp() * torch.randn_like(mean)
                logp = gaussian_log_prob(mean, log_std, action)
                value = net.critic(obs).squeeze(-1)
            env_action = np.clip(action.numpy(), self.low, self.high)
            next_raw, true_reward, terminated, truncated, info = self.envs.step(env_action)
            done = np.logical_or(terminated, truncated)
            if reward_model is not None:
                led_to = None
                if self.needs_led_to:
                    # The state the action led to (an ended episode's final observation, not the next one's
                    # first), so that an action changes its own step's reward, as it changes the env's.
                    led_to = next_raw.copy()
                    for i in np.flatnonzero(done):
                        led_to[i] = info["final_obs"][i]
                rewarded_obs = led_to if self.reward_after else self.raw_obs
                with torch.no_grad():
                    members = reward_model.member_rewards(torch.as_tensor(
                        C.reward_input(rewarded_obs, env_action, reward_model.inputs, led_to)))
                learned = members.mean(0).numpy()
                reward = learned + explore_coef * members.std(0).numpy() if explore_coef else learned
            else:
                learned = np.full(n, np.nan)
                reward = true_reward
            scaled = scale_rewards(reward, self.discounted, self.return_rms, done.astype(np.float64), args.gamma)
            # A time limit is not a real end: bootstrap from the value of the observation it cut off at.
            cut = np.flatnonzero(truncated & ~terminated)
            if len(cut):
                final = np.stack([info["final_obs"][i] for i in cut])
                with torch.no_grad():
                    final_value = net.critic(torch.as_tensor(C.normalize_obs(final, self.obs_rms))).squeeze(-1)
                scaled[cut] += args.gamma * final_value.numpy()

            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t] = obs, action, logp, value
            rew_buf[t] = torch.as_tensor(scaled, dtype=torch.float32)
            done_buf[t] = self.next_done
            self.next_done = torch.as_tensor(done, dtype=torch.float32)

            self.episode_true += true_reward
            self.episode_learned += learned
            self.episode_len += 1
            self.step += n
            for i in np.flatnonzero(done):
                episodes.append({"step": self.step, "true_return": float(self.episode_true[i]),
                                 "learned_return": None if reward_model is None else float(self.episode_learned[i]),
                                 "length": int(self.episode_len[i])})
                self.episode_true[i] = self.episode_learned[i] = self.episode_len[i] = 0
            self.raw_obs = next_raw
        with torch.no_grad():
            next_value = net.critic(torch.as_tensor(C.normalize_obs(self.raw_obs, self.obs_rms))).squeeze(-1)
        batch = {"obs": obs_buf, "act": act_buf, "logp": logp_buf, "val": val_buf, "rew": rew_buf,
                 "done": done_buf, "next_value": next_value, "next_done": self.next_done.clone()}
        return batch, episodes

    def close(self):
        self.envs.close()


def rollout_worker(conn, args, config, obs_rms, return_rms, start_step):
    """--overlap: the process that collects rollouts on the second core. Receives a policy's weights (numpy,
    so that nothing is shared with the learner while it trains), answers with (batch as numpy, episodes,
    normaliser states); None ends it. A failure is sent back as its traceback."""
    import traceback
    try:
        torch.set_num_threads(1)
        # Loaded again here (it cannot be pickled); main() has checked that it fits the env.
        reward_model = C.load_reward_model(args.run) if args.reward == "learned" else None
        torch.manual_seed(config["seed"] * 10_007 + start_step + 1)  # the actions' noise: its own stream here
        net = C.build_actor_critic(config["obs_shape"][0], config["act_shape"][0], args.hidden)
        rollouts = Rollouts(args, config, reward_model, obs_rms, return_rms, start_step)
        while (weights := conn.recv()) is not None:
            net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            batch, episodes = rollouts.collect(net)
            conn.send(({k: v.numpy() for k, v in batch.items()}, episodes, obs_rms.state_dict(),
                       return_rms.state_dict()))
        rollouts.close()
    except KeyboardInterrupt:  # Ctrl-C reaches both processes; the learner reports it
        pass
    except Exception:
        conn.send(traceback.format_exc())


class OverlappedRollouts:
    """--overlap: the same collect(net) as Rollouts, but a worker process steps the envs on the second core
    while this one updates the policy. collect() hands over the rollout collected meanwhile and at once asks
    for the next one with the policy as it is now, before the update; so each rollout comes from the policy
    one update old (as in Cleanba's PPO). The update's ratio is taken against the policy that collected the
    data, so the clipping bounds the step from there; the values and the bootstrap come from the critic of
    that policy too. An approximation of PPO, close enough to reach the same returns (BENCHMARKS.md)."""

    def __init__(self, args, config, net, obs_rms, return_rms, start_step):
        import multiprocessing
        self.args, self.obs_rms, self.return_rms, self.step = args, obs_rms, return_rms, start_step
        self.conn, worker_end = multiprocessing.Pipe()
        self.worker = multiprocessing.get_context("spawn").Process(
            target=rollout_worker, daemon=True, args=(worker_end, args, config, obs_rms, return_rms, start_step))
        self.worker.start()
        worker_end.close()  # the worker's end lives in the worker alone, so its death reads as end of file here
        self.request(net)

    def request(self, net):
        try:
            self.conn.send({k: v.numpy() for k, v in net.state_dict().items()})
        except (BrokenPipeError, ConnectionResetError):
            raise RuntimeError("train_policy: the rollout worker process died") from None

    def collect(self, net):
        """(batch, episodes) as Rollouts.collect returns them; this process's normalisers take the worker's
        state, for the checkpoint."""
        try:
            message = self.conn.recv()
        except (EOFError, ConnectionResetError):
            raise RuntimeError("train_policy: the rollout worker process died") from None
        if isinstance(message, str):
            raise RuntimeError(f"train_policy: the rollout worker failed:\n{message}")
        batch, episodes, obs_state, return_state = message
        self.obs_rms.load_state_dict(obs_state)
        self.return_rms.load_state_dict(return_state)
        self.step += self.args.num_envs * self.args.num_steps
        if self.step < self.args.total_steps:
            self.request(net)
        return {k: torch.from_numpy(v) for k, v in batch.items()}, episodes

    def close(self):
        self.conn.send(None)
        self.worker.join(timeout=60)


# -------------------------------------------------------------------------------------------- update

def ppo_update(net, optimizer, batch, args, ent_coef=None):
    """--update-epochs passes over one rollout's batch (from Rollouts.collect) in shuffled minibatches.
    Returns the last minibatch's policy loss, value loss and approximate KL, and the mean clip fraction of
    each epoch's last minibatch. ent_coef: this update's entropy bonus (default: --ent-coef)."""
    ent_coef = args.ent_coef if ent_coef is None else ent_coef
    advantages, returns = compute_gae(batch["rew"], batch["val"], batch["done"], batch["next_value"],
                                      batch["next_done"], args.gamma, args.gae_lambda)
    obs_dim, act_dim = batch["obs"].shape[-1], batch["act"].shape[-1]
    # One (B, obs_dim + act_dim + 4) table, shuffled with one gather per epoch; a minibatch is then slices.
    table = torch.cat([batch["obs"].reshape(-1, obs_dim), batch["act"].reshape(-1, act_dim),
                       torch.stack([batch["logp"], advantages, returns, batch["val"]], -1).reshape(-1, 4)], 1)
    batch_size = table.shape[0]
    # --num-minibatches slices as even as the batch allows (the default 2048 rows: 32 of 64)
    bounds = [batch_size * i // args.num_minibatches for i in range(args.num_minibatches + 1)]
    clip_fractions = []
    for epoch in range(args.update_epochs):
        shuffled = table[torch.randperm(batch_size)]
        all_obs, all_act = shuffled[:, :obs_dim], shuffled[:, obs_dim:obs_dim + act_dim]
        # contiguous: mean() and std() of a strided column add up in another order, and the run would
        # differ in the last bits from one that gathers each array separately
        all_old_logp, all_adv, all_ret, all_old_val = shuffled[:, -4:].T.contiguous()
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows = slice(start, end)
            obs, act, old_logp, adv = all_obs[rows], all_act[rows], all_old_logp[rows], all_adv[rows]
            ret, old_val = all_ret[rows], all_old_val[rows]
            mean = net.actor_mean(obs)
            new_logp = gaussian_log_prob(mean, net.actor_logstd.expand_as(mean), act)
            log_ratio = new_logp - old_logp
            ratio = log_ratio.exp()
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = clipped_policy_loss(adv, ratio, args.clip_coef)
            new_value = net.critic(obs).squeeze(-1)
            v_clipped = old_val + torch.clamp(new_value - old_val, -args.clip_coef, args.clip_coef)
            v_loss = 0.5 * torch.max((new_value - ret) ** 2, (v_clipped - ret) ** 2).mean()
            loss = pg_loss + args.vf_coef * v_loss
            if ent_coef:  # skipped at 0, the default: on these tiny batches every op costs
                loss = loss - ent_coef * gaussian_entropy(net.actor_logstd).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(args.max_grad_norm)
        with torch.no_grad():  # diagnostics of the epoch's last minibatch only: they cost as much as a step
            approx_kl = ((ratio - 1) - log_ratio).mean().item()
            clip_fractions.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    return pg_loss.item(), v_loss.item(), approx_kl, float(np.mean(clip_fractions))


# ---------------------------------------------------------------------------------------------- main

def save_checkpoint(path, net, optimizer, obs_rms, return_rms, global_step, args):
    C.save_torch_atomic(path, {
        "model": net.state_dict(), "optimizer": optimizer.state_dict(), "obs_rms": obs_rms.state_dict(),
        "return_rms": return_rms.state_dict(), "global_step": global_step, "hidden": args.hidden,
        "reward": args.reward, "torch_rng": torch.get_rng_state(), "format_version": C.FORMAT_VERSION})


def main():
    args = parse_args()
    if args.anneal_steps is not None and args.anneal_steps < 0:
        raise C.UserError(f"--anneal-steps must be 0 (constant learning rate) or positive, not {args.anneal_steps}")
    if args.overlap and args.async_envs:
        raise C.UserError("--overlap and --async-envs do not combine: the rollout process cannot start its own "
                          "env processes")
    if args.explore_coef and args.reward == "true":
        raise C.UserError("--explore-coef needs the learned reward: it is the reward ensemble's disagreement")
    if args.reward_state and args.reward == "true":
        raise C.UserError("--reward-state is about the learned reward; the env's own reward is always of the "
                          "state the action led to")
    torch.set_num_threads(args.threads)
    # Only the true reward can start a run: the learned one needs labels, so collect.py comes first.
    config = C.open_run(args.run, args.env, args.seed, env_kwargs=args.env_kwargs, create=args.reward == "true")
    obs_dim, act_dim = config["obs_shape"][0], config["act_shape"][0]
    reward_model = None
    if args.reward == "learned":  # (with --overlap, loaded here to check it; the worker loads its own)
        reward_model = C.load_reward_model(args.run, config)
        if reward_model is None:
            raise C.UserError(f"{args.run} has no {C.REWARD_MODEL} yet; run train_reward.py first, or train "
                              f"on the env's reward with --reward true")
        if args.reward_state == "after" and reward_model.inputs != "obs":
            sees = "the action too" if reward_model.inputs == "obs+act" else "both states of a step"
            raise C.UserError(f"--reward-state after needs a model of the observation alone; {C.REWARD_MODEL} "
                              f"sees {sees}, so it is given the state the step started from")
        if args.explore_coef and reward_model.members < 2:
            raise C.UserError(f"--explore-coef needs a reward ensemble of at least 2 members; {C.REWARD_MODEL} "
                              f"has {reward_model.members}")

    torch.manual_seed(config["seed"])  # before the network's random init, so that a seed fixes the whole run
    net = C.build_actor_critic(obs_dim, act_dim, args.hidden)
    with torch.no_grad():  # (a checkpoint, loaded below, overwrites it)
        net.actor_logstd.fill_(args.init_log_std)
    optimizer = C.FlatAdam(net, lr=args.lr, eps=1e-5)  # CleanRL's eps
    obs_rms, return_rms = C.RunningMeanStd((obs_dim,)), C.RunningMeanStd(())
    global_step = 0
    path = os.path.join(args.run, C.POLICY)
    if os.path.exists(path):
        ckpt = C.load_torch(path, "policy checkpoint")
        if ckpt["hidden"] != args.hidden:
            raise C.UserError(f"{path} has hidden size {ckpt['hidden']}, not {args.hidden}")
        # Going on with the other reward would leave a policy of both, labelled as trained on the last one.
        if ckpt.get("reward", args.reward) != args.reward:
            raise C.UserError(f"{path} was trained on the {ckpt['reward']} reward, not the {args.reward} one; go on "
                              f"with --reward {ckpt['reward']}, or train on the {args.reward} reward in a new run "
                              f"directory")
        try:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            obs_rms.load_state_dict(ckpt["obs_rms"])
            return_rms.load_state_dict(ckpt["return_rms"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise C.UserError(f"{path} does not fit this run's {obs_dim} observations and {act_dim} actions "
                              f"({type(e).__name__}); it belongs to another run")
        global_step = int(ckpt["global_step"])
        torch.set_rng_state(ckpt["torch_rng"])
    if global_step >= args.total_steps:
        print(f"train_policy: policy already at step {global_step} >= --total-steps {args.total_steps}")
        return

    batch_size = args.num_envs * args.num_steps
    anneal_steps = args.total_steps if args.anneal_steps is None else args.anneal_steps
    if args.overlap:
        rollouts = OverlappedRollouts(args, config, net, obs_rms, return_rms, global_step)
    else:
        rollouts = Rollouts(args, config, reward_model, obs_rms, return_rms, global_step)
    started, start_step, update = time.time(), global_step, 0
    recent_true = []

    while global_step < args.total_steps:
        update += 1
        optimizer.lr = learning_rate(global_step, args.lr, anneal_steps)
        batch, episodes = rollouts.collect(net)
        step_before, global_step = global_step, global_step + batch_size
        pg_loss, v_loss, approx_kl, clip_fraction = ppo_update(net, optimizer, batch, args,
                                                               entropy_coef(optimizer.lr, args))

        recent_true += [e["true_return"] for e in episodes]
        sps = (global_step - start_step) / (time.time() - started)
        if episodes:
            C.append_jsonl(os.path.join(args.run, C.METRICS),
                           [{"stage": "train_policy", "time": round(time.time(), 3), "reward": args.reward, **e}
                            for e in episodes])
        if update % args.save_every == 0:
            save_checkpoint(path, net, optimizer, obs_rms, return_rms, global_step, args)
        # A snapshot is a whole checkpoint like policy.pt (so it can be scored or resumed); saving one draws no
        # random numbers, so a run with snapshots trains exactly as one without.
        if any(step_before < step <= global_step for step in args.snapshot_steps):
            os.makedirs(os.path.join(args.run, C.SNAPSHOTS_DIR), exist_ok=True)
            save_checkpoint(os.path.join(args.run, C.SNAPSHOTS_DIR, f"policy_step{global_step}.pt"), net, optimizer,
                            obs_rms, return_rms, global_step, args)
        if update % 10 == 0 or global_step >= args.total_steps:
            mean_true = np.mean(recent_true[-20:]) if recent_true else float("nan")
            print(f"train_policy: step {global_step}/{args.total_steps}, true return (last 20 episodes) "
                  f"{mean_true:.1f}, policy loss {pg_loss:.3f}, value loss {v_loss:.3f}, "
                  f"kl {approx_kl:.4f}, clip {clip_fraction:.3f}, {sps:.0f} steps/s", flush=True)

    rollouts.close()
    save_checkpoint(path, net, optimizer, obs_rms, return_rms, global_step, args)
    C.log_metrics(args.run, "train_policy_summary", step=global_step, reward=args.reward,
                  steps_per_second=round((global_step - start_step) / (time.time() - started), 1),
                  true_return_last20=float(np.mean(recent_true[-20:])) if recent_true else None,
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  **({"worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                                                  1)} if args.overlap else {}))
    if not args.no_plot:
        C.plot_learning_curve(args.run)


if __name__ == "__main__":
    C.run_main(main)
