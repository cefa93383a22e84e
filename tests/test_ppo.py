"""Issue 5: PPO pieces against hand-computed values, and checkpoints that resume."""
import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import contract as C
import train_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    no_dones = torch.zeros(3, 1)
    adv, ret = train_policy.compute_gae(rewards, values, no_dones, torch.tensor([2.0]), torch.tensor([0.0]),
                                        gamma, lam)
    # delta_t = r_t + gamma V_{t+1} - V_t ; A_t = delta_t + gamma lam A_{t+1}
    d2 = 3 + 0.9 * 2.0 - 1.5
    d1 = 2 + 0.9 * 1.5 - 1.0
    d0 = 1 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    np.testing.assert_allclose(adv[:, 0].numpy(), [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0].numpy(), [a0 + 0.5, a1 + 1.0, a2 + 1.5], rtol=1e-6)

    # An episode boundary before step 2: step 1 must not look past it.
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    adv, _ = train_policy.compute_gae(rewards, values, dones, torch.tensor([2.0]), torch.tensor([0.0]), gamma, lam)
    d1_cut = 2 - 1.0
    np.testing.assert_allclose(adv[:, 0].numpy(), [d0 + 0.72 * d1_cut, d1_cut, d2], rtol=1e-6)

    # The last step ended an episode: no bootstrap from next_value.
    adv, _ = train_policy.compute_gae(rewards, values, no_dones, torch.tensor([2.0]), torch.tensor([1.0]), gamma, lam)
    assert adv[2, 0].item() == pytest.approx(3 - 1.5)


def test_learning_rate_decays_linearly_or_stays_constant():
    assert train_policy.learning_rate(0, 3e-4, 1000) == 3e-4
    assert math.isclose(train_policy.learning_rate(250, 3e-4, 1000), 2.25e-4)
    assert train_policy.learning_rate(1000, 3e-4, 1000) == 0.0
    assert train_policy.learning_rate(1500, 3e-4, 1000) == 0.0  # a run trained past the schedule stays at 0
    assert train_policy.learning_rate(10**9, 3e-4, 0) == 3e-4   # 0: constant


def test_entropy_bonus_decays_with_the_learning_rate_only_when_asked():
    args = train_policy.parse_args(["--run", "unused", "--ent-coef", "0.01", "--lr", "3e-4"])
    assert train_policy.entropy_coef(1.5e-4, args) == 0.01  # default: constant
    args.ent_anneal = True
    for step, expected in [(0, 0.01), (250, 0.0075), (500, 0.005), (1000, 0.0), (1500, 0.0)]:
        lr_now = train_policy.learning_rate(step, args.lr, 1000)
        assert math.isclose(train_policy.entropy_coef(lr_now, args), expected, abs_tol=1e-12), step
    assert train_policy.entropy_coef(train_policy.learning_rate(10**9, args.lr, 0), args) == 0.01  # constant lr


def test_ppo_update_uses_the_entropy_bonus_it_is_given():
    """A large bonus widens the policy's action noise; none leaves the objective to the advantages alone."""
    torch.manual_seed(0)
    obs_dim, act_dim, T, N = 3, 2, 16, 2
    batch = {"obs": torch.randn(T, N, obs_dim), "act": torch.randn(T, N, act_dim), "logp": torch.zeros(T, N),
             "rew": torch.zeros(T, N), "val": torch.zeros(T, N), "done": torch.zeros(T, N),
             "next_value": torch.zeros(N), "next_done": torch.zeros(N)}
    args = train_policy.parse_args(["--run", "unused", "--num-minibatches", "2", "--update-epochs", "2"])
    logstds = {}
    for ent_coef in (0.0, 10.0):
        torch.manual_seed(1)
        net = C.build_actor_critic(obs_dim, act_dim)
        optimizer = C.FlatAdam(net, lr=1e-2, eps=1e-5)
        batch["logp"] = train_policy.gaussian_log_prob(net.actor_mean(batch["obs"]),
                                                       net.actor_logstd.expand(T, N, act_dim),
                                                       batch["act"]).detach()
        train_policy.ppo_update(net, optimizer, batch, args, ent_coef)
        logstds[ent_coef] = net.actor_logstd.detach().clone()
    assert (logstds[10.0] > logstds[0.0] + 0.01).all()


def test_ppo_update_takes_num_minibatches_slices_of_the_whole_batch(monkeypatch):
    """A batch that --num-minibatches does not divide (2 envs x 17 steps = 34 rows in 4) is cut into exactly 4
    slices of 8-9 rows covering every row once, never a last slice of one row whose advantage std is nan and
    would turn every weight into nan."""
    torch.manual_seed(0)
    obs_dim, act_dim, T, N = 3, 2, 17, 2
    batch = {"obs": torch.randn(T, N, obs_dim), "act": torch.randn(T, N, act_dim), "logp": torch.zeros(T, N),
             "rew": torch.randn(T, N), "val": torch.zeros(T, N), "done": torch.zeros(T, N),
             "next_value": torch.zeros(N), "next_done": torch.zeros(N)}
    args = train_policy.parse_args(["--run", "unused", "--num-envs", "2", "--num-steps", "17",
                                    "--num-minibatches", "4", "--update-epochs", "1"])
    net = C.build_actor_critic(obs_dim, act_dim)
    batch["logp"] = train_policy.gaussian_log_prob(net.actor_mean(batch["obs"]),
                                                   net.actor_logstd.expand(T, N, act_dim), batch["act"]).detach()
    sizes = []
    loss = train_policy.clipped_policy_loss
    monkeypatch.setattr(train_policy, "clipped_policy_loss", lambda adv, *rest: sizes.append(len(adv)) or loss(adv, *rest))
    train_policy.ppo_update(net, C.FlatAdam(net, lr=1e-3, eps=1e-5), batch, args)
    assert sorted(sizes) == [8, 8, 9, 9]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_clipped_objective_matches_hand_computation():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 0.9, 1.1])
    loss = train_policy.clipped_policy_loss(adv, ratio, 0.2)
    # per sample max(-A r, -A clip(r)): max(-1.5,-1.2)=-1.2; max(0.5,0.8)=0.8; max(-0.9,-0.9)=-0.9; max(1.1,1.1)=1.1
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.9 + 1.1) / 4)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    torch.manual_seed(0)
    mean, log_std, action = torch.randn(5, 3), torch.randn(5, 3) * 0.3, torch.randn(5, 3)
    dist = torch.distributions.Normal(mean, log_std.exp())
    np.testing.assert_allclose(train_policy.gaussian_log_prob(mean, log_std, action).numpy(),
                               dist.log_prob(action).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(train_policy.gaussian_entropy(log_std).numpy(), dist.entropy().sum(-1).numpy(),
                               rtol=1e-5)


def test_running_mean_std_equals_batch_statistics():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 4))
    rms = C.RunningMeanStd((4,))
    for chunk in np.array_split(data, 7):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-3)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-3)
    normalized = C.normalize_obs(data, rms)
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-2)
    np.testing.assert_allclose(normalized.std(0), 1, atol=1e-2)
    assert np.abs(C.normalize_obs(np.full((1, 4), 1e6), rms)).max() == 10.0  # clipped


def test_reward_scaling_divides_by_the_std_of_the_discounted_return():
    rms = C.RunningMeanStd(())
    discounted = np.zeros(2)
    gamma = 0.5
    returns = []
    for t in range(4):
        scaled = train_policy.scale_rewards(np.array([1.0, 2.0]), discounted, rms, np.array([0.0, float(t == 2)]),
                                            gamma)
        returns.append(discounted.copy())
    # the running discounted return, reset at a done: env 0: 1, 1.5, 1.75, 1.875; env 1: 2, 3, 2 (reset), 3
    np.testing.assert_allclose(np.array(returns), [[1, 2], [1.5, 3], [1.75, 2], [1.875, 3]])
    expected_std = np.sqrt(np.var(np.array(returns).ravel()))
    np.testing.assert_allclose(scaled, np.array([1.0, 2.0]) / expected_std, rtol=1e-3)


def test_flat_adam_takes_torch_adams_steps_with_global_norm_clipping():
    """FlatAdam (all parameters as views of one tensor) against torch.optim.Adam after
    clip_grad_norm_, on the same losses for 20 steps with a changing learning rate; and its state resumes,
    also from the torch.optim.Adam state of the checkpoints written before it."""
    def losses(net, step):
        obs = torch.randn(16, 5, generator=torch.Generator().manual_seed(step))
        return (net.actor_mean(obs) ** 2).sum() * 10 + net.critic(obs).mean() + net.actor_logstd.sum()

    torch.manual_seed(0)
    ours = C.build_actor_critic(5, 2, 8)
    reference = C.build_actor_critic(5, 2, 8)
    reference.load_state_dict(ours.state_dict())
    flat = C.FlatAdam(ours, lr=1e-2, eps=1e-5)
    torch_adam = torch.optim.Adam(reference.parameters(), lr=1e-2, eps=1e-5)
    clipped_any = False
    for step in range(20):
        lr = 1e-2 * (1 - step / 20)
        flat.lr = lr
        for group in torch_adam.param_groups:
            group["lr"] = lr
        flat.zero_grad()
        losses(ours, step).backward()
        flat.step(max_grad_norm=0.5)
        torch_adam.zero_grad()
        losses(reference, step).backward()
        clipped_any |= float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)) > 0.5
        torch_adam.step()
    assert clipped_any
    for name, tensor in reference.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[name].numpy(), tensor.numpy(), rtol=1e-5, atol=1e-6)
    # The parameters are still views of the flat tensor (load_state_dict copies into them).
    ours.load_state_dict(reference.state_dict())
    assert all(p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr() for p in ours.parameters())
    assert torch.equal(flat.flat, torch.cat([p.detach().reshape(-1) for p in reference.parameters()]))

    resumed = C.FlatAdam(C.build_actor_critic(5, 2, 8), lr=1e-2, eps=1e-5)
    resumed.load_state_dict(flat.state_dict())
    from_torch = C.FlatAdam(C.build_actor_critic(5, 2, 8), lr=1e-2, eps=1e-5)
    from_torch.load_state_dict(torch_adam.state_dict())
    for other in (resumed, from_torch):
        assert other.steps == 20
        np.testing.assert_allclose(other.exp_avg.numpy(), flat.exp_avg.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(other.exp_avg_sq.numpy(), flat.exp_avg_sq.numpy(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError):
        C.FlatAdam(C.build_actor_critic(5, 3, 8), lr=1e-2, eps=1e-5).load_state_dict(flat.state_dict())


def test_checkpoint_resumes_where_it_stopped(tmp_path):
    run = str(tmp_path / "resume")
    common = ["--reward", "true", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4",
              "--update-epochs", "2", "--no-plot"]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    first = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--env", "InvertedPendulum-v5",
                            "--total-steps", "512", "--init-log-std", "-1", *common], cwd=ROOT,
                           capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    ckpt = C.load_torch(os.path.join(run, C.POLICY), "policy")
    assert ckpt["global_step"] == 512
    # The new policy started from --init-log-std (32 Adam steps of lr 3e-4 move it by at most 0.01).
    assert ckpt["model"]["actor_logstd"].sub(-1).abs().max() < 0.011

    # Loading the checkpoint rebuilds exactly the saved network and normalisers.
    net = C.build_actor_critic(4, 1, ckpt["hidden"])
    net.load_state_dict(ckpt["model"])
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name])
    rms = C.RunningMeanStd((4,))
    rms.load_state_dict(ckpt["obs_rms"])
    np.testing.assert_array_equal(rms.mean, ckpt["obs_rms"]["mean"])

    # Asking for a step count already reached changes nothing.
    with open(os.path.join(run, C.POLICY), "rb") as f:
        before = f.read()
    again = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--total-steps", "512", *common],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "already at step 512" in again.stdout
    with open(os.path.join(run, C.POLICY), "rb") as f:
        assert f.read() == before

    # Resuming continues counting from the saved step with the saved statistics, not from scratch.
    # (--init-log-std is about a new policy: the resumed one keeps its own.)
    more = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--total-steps", "1024",
                           "--init-log-std", "0", *common], cwd=ROOT, capture_output=True, text=True, env=env)
    assert more.returncode == 0, more.stderr
    resumed = C.load_torch(os.path.join(run, C.POLICY), "policy")
    assert resumed["global_step"] == 1024
    assert resumed["model"]["actor_logstd"].sub(-1).abs().max() < 0.021
    assert resumed["obs_rms"]["count"] > ckpt["obs_rms"]["count"] + 500
    steps = [m["step"] for m in C.read_jsonl(os.path.join(run, C.METRICS)) if m["stage"] == "train_policy"]
    assert steps == sorted(steps) and 512 < max(steps) <= 1024  # episode ends logged at their global step


def test_snapshots_keep_the_policy_at_the_steps_asked_and_change_nothing_else(tmp_path):
    """--snapshot-steps keeps a whole checkpoint at the first update at or past each step asked (updates of 128
    steps here: 200 and 256 both give the one of step 256, 300 gives 384). A run with snapshots trains exactly
    as one without, and a snapshot is the policy a run stopped at that step would have saved; a resumed run
    keeps those it has and adds only the steps it reaches anew."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    common = ["--env", "InvertedPendulum-v5", "--reward", "true", "--num-envs", "2", "--num-steps", "64",
              "--num-minibatches", "4", "--update-epochs", "2", "--anneal-steps", "512", "--save-every", "100",
              "--no-plot"]

    def train(name, total, *flags):
        run = str(tmp_path / name)
        result = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--total-steps", str(total),
                                 *common, *flags], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return run

    snapped = train("snapped", 512, "--snapshot-steps", "300", "200", "256")
    plain, stopped = train("plain", 512), train("stopped", 256)
    snapshots = os.path.join(snapped, C.SNAPSHOTS_DIR)
    assert sorted(os.listdir(snapshots)) == ["policy_step256.pt", "policy_step384.pt"]

    def checkpoint(path):
        return C.load_torch(path, "policy", kind=C.POLICY)

    def same(a, b):
        assert a["global_step"] == b["global_step"]
        for part in ("model", "obs_rms", "return_rms"):
            for key in a[part]:
                assert np.array_equal(np.asarray(a[part][key]), np.asarray(b[part][key])), (part, key)
        assert torch.equal(a["optimizer"]["exp_avg"], b["optimizer"]["exp_avg"])

    same(checkpoint(os.path.join(snapped, C.POLICY)), checkpoint(os.path.join(plain, C.POLICY)))
    same(checkpoint(os.path.join(snapshots, "policy_step256.pt")), checkpoint(os.path.join(stopped, C.POLICY)))
    assert checkpoint(os.path.join(snapshots, "policy_step384.pt"))["global_step"] == 384

    with open(os.path.join(snapshots, "policy_step256.pt"), "rb") as f:
        kept = f.read()
    train("snapped", 768, "--snapshot-steps", "200", "600")
    assert sorted(os.listdir(snapshots)) == ["policy_step256.pt", "policy_step384.pt", "policy_step640.pt"]
    with open(os.path.join(snapshots, "policy_step256.pt"), "rb") as f:
        assert f.read() == kept


def test_env_kwargs_leave_the_fixed_horizon_for_a_true_reward_baseline(tmp_path):
    """By default Hopper never terminates (the paper's task); --env-kwargs gives back the original,
    terminating Hopper for comparison with published PPO results, and every later stage uses the stored kwargs."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    common = ["--env", "Hopper-v5", "--reward", "true", "--num-envs", "2", "--num-steps", "256",
              "--update-epochs", "1", "--total-steps", "1024", "--no-plot"]
    lengths = {}
    for name, extra in [("fixed", []), ("terminating", ["--env-kwargs", '{"terminate_when_unhealthy": true}'])]:
        run = str(tmp_path / name)
        result = subprocess.run([sys.executable, "train_policy.py", "--run", run, *common, *extra], cwd=ROOT,
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        config = C.read_config(run)
        lengths[name] = [m["length"] for m in C.read_jsonl(os.path.join(run, C.METRICS))
                         if m["stage"] == "train_policy"]
        assert config["env_kwargs"] == (C.TASK_KWARGS["Hopper"] if name == "fixed" else
                                        {"terminate_when_unhealthy": True})
    assert lengths["fixed"] == []  # 512 steps per env, and a fixed-horizon episode lasts 1000: none ends
    assert len(lengths["terminating"]) > 5 and max(lengths["terminating"]) < 200  # a random hopper falls fast


def test_a_seed_fixes_the_whole_run(tmp_path):
    """Two new runs with the same seed train the same policy, bit for bit (the network's initial weights
    included); another seed trains another."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    common = ["--env", "InvertedPendulum-v5", "--reward", "true", "--num-envs", "2", "--num-steps", "64",
              "--num-minibatches", "4", "--update-epochs", "2", "--total-steps", "256", "--no-plot"]
    weights = {}
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        run = str(tmp_path / name)
        result = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--seed", seed, *common],
                                cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        weights[name] = C.load_torch(os.path.join(run, C.POLICY), "policy")["model"]
    for key in weights["a"]:
        assert torch.equal(weights["a"][key], weights["b"][key]), key
    assert not torch.equal(weights["a"]["actor_mean.0.weight"], weights["c"]["actor_mean.0.weight"])


@pytest.mark.slow
def test_overlap_is_seeded_counts_steps_and_resumes(tmp_path):
    """--overlap collects each rollout in a worker process with the policy of one update before. A seed still
    fixes the run (the worker draws its own seeded noise), and it counts, checkpoints and resumes like a plain
    run: the checkpoint carries the worker's normalisers."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    common = ["--reward", "true", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4",
              "--update-epochs", "2", "--no-plot", "--overlap"]
    ckpts = {}
    for name in ("a", "b"):
        run = str(tmp_path / name)
        result = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--env", "InvertedPendulum-v5",
                                 "--total-steps", "512", *common], cwd=ROOT, capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        ckpts[name] = C.load_torch(os.path.join(run, C.POLICY), "policy")
    assert ckpts["a"]["global_step"] == 512
    for key in ckpts["a"]["model"]:
        assert torch.equal(ckpts["a"]["model"][key], ckpts["b"]["model"][key]), key
    # The worker's observation statistics: 4 rollouts of 128 steps, and not one more that ran unused.
    assert ckpts["a"]["obs_rms"]["count"] == pytest.approx(512, abs=1)
    assert ckpts["a"]["return_rms"]["count"] == pytest.approx(512, abs=1)

    run = str(tmp_path / "a")
    more = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--total-steps", "1024", *common],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert more.returncode == 0, more.stderr[-2000:]
    resumed = C.load_torch(os.path.join(run, C.POLICY), "policy")
    assert resumed["global_step"] == 1024
    assert resumed["obs_rms"]["count"] == pytest.approx(1024, abs=1)
    assert not torch.equal(resumed["model"]["actor_mean.0.weight"], ckpts["a"]["model"]["actor_mean.0.weight"])


def test_overlap_trains_on_the_learned_reward(tmp_path):
    """The rollout worker loads the run's reward model itself and reports each episode's learned return."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    run = str(tmp_path / "learned")
    for stage in (["collect.py", "--run", run, "--env", "InvertedPendulum-v5", "--segment-seconds", "0.1",
                   "--pairs", "20", "--no-clips"],
                  ["label.py", "teach", "--run", run], ["train_reward.py", "--run", run, "--steps", "20"],
                  ["train_policy.py", "--run", run, "--total-steps", "1024", "--num-envs", "2", "--num-steps",
                   "64", "--update-epochs", "1", "--no-plot", "--overlap"]):
        result = subprocess.run([sys.executable, *stage], cwd=ROOT, capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    episodes = [m for m in C.read_jsonl(os.path.join(run, C.METRICS)) if m["stage"] == "train_policy"]
    assert episodes and all(m["reward"] == "learned" and math.isfinite(m["learned_return"]) for m in episodes)
    assert C.load_torch(os.path.join(run, C.POLICY), "policy")["global_step"] == 1024


def test_a_failing_rollout_worker_is_reported_not_waited_for(tmp_path, monkeypatch):
    """A worker that fails sends its traceback; one that dies outright closes its end of the pipe. Either way
    the learner raises instead of waiting for a rollout that will never come."""
    config = C.open_run(str(tmp_path / "run"), "InvertedPendulum-v5")
    args = train_policy.parse_args(["--run", str(tmp_path / "run"), "--reward", "true", "--num-envs", "1",
                                    "--num-steps", "4", "--num-minibatches", "1", "--overlap"])
    net = C.build_actor_critic(4, 1)
    rollouts = train_policy.OverlappedRollouts(args, config, net, C.RunningMeanStd((4,)), C.RunningMeanStd(()), 0)
    batch, episodes = rollouts.collect(net)  # a working worker first
    assert batch["obs"].shape == (4, 1, 4) and rollouts.step == 4
    rollouts.worker.kill()
    rollouts.worker.join()
    with pytest.raises(RuntimeError, match="rollout worker process died"):
        for _ in range(2):  # the first may still hand over a rollout the worker sent before it died
            rollouts.collect(net)

    learner, worker = multiprocessing.Pipe()
    rollouts.conn = learner
    worker.send("Traceback (most recent call last):\nValueError: the env broke")
    with pytest.raises(RuntimeError, match="(?s)rollout worker failed.*the env broke"):
        rollouts.collect(net)


def test_exploration_bonus_is_the_ensembles_disagreement_decaying_with_the_learning_rate(tmp_path, monkeypatch):
    """--explore-coef adds c * (std of the members' normalised rewards) to the learned reward the policy is
    trained on, c decaying with the learning rate (a negative c subtracts it); the learned return reported
    stays the model's alone."""
    args = train_policy.parse_args(["--run", "unused", "--explore-coef", "0.5", "--total-steps", "1000"])
    for step, expected in [(0, 0.5), (250, 0.375), (1000, 0.0), (1500, 0.0)]:
        assert math.isclose(train_policy.exploration_coef(step, args), expected), step
    args.anneal_steps = 0  # a constant learning rate: a constant bonus
    assert train_policy.exploration_coef(10**9, args) == 0.5

    env = {**os.environ, "MUJOCO_GL": "egl"}
    run = str(tmp_path / "run")
    for stage in (["collect.py", "--run", run, "--env", "InvertedPendulum-v5", "--segment-seconds", "0.1",
                   "--pairs", "20", "--no-clips"],
                  ["label.py", "teach", "--run", run], ["train_reward.py", "--run", run, "--steps", "20"]):
        result = subprocess.run([sys.executable, *stage], cwd=ROOT, capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    config, reward_model = C.read_config(run), C.load_reward_model(run)
    seen = []
    members = reward_model.member_rewards
    monkeypatch.setattr(reward_model, "member_rewards", lambda x: seen.append(x.clone()) or members(x))
    # Unscaled rewards, so that the bonus can be read off the batch.
    monkeypatch.setattr(train_policy, "scale_rewards", lambda rewards, *rest, **kw: rewards.astype(np.float32))

    def collect(coef):
        args = train_policy.parse_args(["--run", run, "--num-envs", "2", "--num-steps", "8", "--num-minibatches",
                                        "1", "--total-steps", "1000", "--explore-coef", str(coef)])
        torch.manual_seed(0)
        net = C.build_actor_critic(4, 1)
        rollouts = train_policy.Rollouts(args, config, reward_model, C.RunningMeanStd((4,)), C.RunningMeanStd(()),
                                         start_step=250)
        seen.clear()
        batch, episodes = rollouts.collect(net)
        rollouts.close()
        return batch, episodes, list(seen)

    plain, plain_episodes, inputs = collect(0.0)
    explored, explored_episodes, same_inputs = collect(0.5)
    assert all(torch.equal(a, b) for a, b in zip(inputs, same_inputs))  # the same states and actions
    with torch.no_grad():
        spread = torch.stack([members(x).std(0) for x in inputs])  # (T, N)
    assert torch.all(spread > 0)
    not_ended = plain["done"][1:] == 0  # (a step whose episode ended may carry a bootstrap: not compared)
    bonus = (explored["rew"] - plain["rew"])[:-1][not_ended]
    torch.testing.assert_close(bonus, (0.375 * spread)[:-1][not_ended], rtol=1e-4, atol=1e-5)
    assert [e["learned_return"] for e in explored_episodes] == [e["learned_return"] for e in plain_episodes]
    # A negative weight is a penalty of the same size.
    penalised, penalised_episodes, penalised_inputs = collect(-0.5)
    assert all(torch.equal(a, b) for a, b in zip(inputs, penalised_inputs))
    assert [e["learned_return"] for e in penalised_episodes] == [e["learned_return"] for e in plain_episodes]
    torch.testing.assert_close((penalised["rew"] - plain["rew"])[:-1][not_ended], -bonus, rtol=1e-4, atol=1e-5)

    # Refused where there is no disagreement to add: the true reward, or an ensemble of one.
    for flags, message in [(["--reward", "true"], "needs the learned reward"),
                           ([], "at least 2 members")]:
        if not flags:
            subprocess.run([sys.executable, "train_reward.py", "--run", run, "--fresh", "--members", "1", "--steps",
                            "5"], cwd=ROOT, capture_output=True, env=env, timeout=120, check=True)
        result = subprocess.run([sys.executable, "train_policy.py", "--run", run, "--explore-coef", "0.5",
                                 "--total-steps", "64", *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_model_of_the_observation_rewards_the_state_the_action_led_to(tmp_path, monkeypatch):
    """With --reward-state after step t is rewarded for the observation its action led to: the next step's
    observation, or, where the episode ended, its final observation (not the next episode's first). With
    before, for the observation it started from. Without the flag, as the model was fitted. A model that also
    sees the action is always given the observation the action was chosen in, with that action."""
    config = C.open_run(str(tmp_path / "run"), "InvertedPendulum-v5")
    seen = []

    def collect(reward_model, state=None):
        args = train_policy.parse_args(["--run", str(tmp_path / "run"), "--num-envs", "2", "--num-steps", "48",
                                        *(["--reward-state", state] if state else [])])
        torch.manual_seed(0)
        net = C.build_actor_critic(4, 1)
        rollouts = train_policy.Rollouts(args, config, reward_model, C.RunningMeanStd((4,)), C.RunningMeanStd(()), 0)
        seen.clear()
        batch, _ = rollouts.collect(net)
        rollouts.close()
        return torch.stack(seen), batch["done"]  # (T, N, in_dim), (T, N)

    def recording(reward_model):
        members = reward_model.member_rewards
        monkeypatch.setattr(reward_model, "member_rewards", lambda x: seen.append(x.clone()) or members(x))
        return reward_model

    obs_model = recording(C.build_reward_ensemble(4, members=2, inputs="obs"))
    before, done = collect(obs_model, "before")
    after, same_done = collect(obs_model, "after")
    assert torch.equal(done, same_done)  # the same trajectories
    ended = same_done[1:] == 1  # (T-1, N): the episode ended at step t, the env reset before step t+1
    assert ended.any() and (~ended).any()
    # Where the episode went on, the state the action led to is where the next step started.
    torch.testing.assert_close(after[:-1][~ended], before[1:][~ended])
    # Where it ended, the pendulum had fallen past the env's 0.2 rad; the next episode starts upright.
    assert torch.all(after[:-1][ended][:, 1].abs() > 0.2)
    assert torch.all(before[1:][ended][:, 1].abs() < 0.2)
    # Without the flag, the state the model was fitted to (train_reward.py --reward-state, in reward_model.pt).
    assert torch.equal(collect(obs_model)[0], before)
    assert torch.equal(collect(recording(C.build_reward_ensemble(4, members=2, reward_state="after")))[0], after)

    obs_act_model = recording(C.build_reward_ensemble(5, members=2, inputs="obs+act"))
    with_action_after, _ = collect(obs_act_model, "after")
    with_action_before, _ = collect(obs_act_model, "before")
    assert torch.equal(with_action_after, with_action_before)
    torch.testing.assert_close(with_action_after[..., :4], before)

    # A model of a step's two states is given both: where it started and where its action led.
    both, _ = collect(recording(C.build_reward_ensemble(8, members=2, inputs="obs+next")))
    torch.testing.assert_close(both, torch.cat([before, after], -1))
