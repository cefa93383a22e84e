"""Issue 5: `make bench-paper` keeps each finished condition, re-runs only what is missing, refuses to mix
step budgets, entropy bonuses (or their schedules), policies' starting stds, label schedules, segment lengths or
tasks in one results directory, and writes its table and plot. A tiny budget on HalfCheetah."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import contract as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--envs", "HalfCheetah-v5", "--labels", "6", "--steps", "2048", "--steps-per-round", "2048",
        "--eval-episodes", "1", "--jobs", "2"]


# What is kept, refused and reported, not how well the reward is learned: loop.sh fits the reward model with a
# few gradient steps (train_reward.py's default, at least 500, is most of a tiny condition's time).
FEW_REWARD_STEPS = {"REWARD_STEPS": "30"}


def bench(out, *args):
    return subprocess.run([sys.executable, "bench/bench_paper.py", *TINY, "--out", out, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MUJOCO_GL": "egl", **FEW_REWARD_STEPS})


@pytest.mark.slow
def test_bench_paper_resumes_and_reports(tmp_path):
    out = str(tmp_path / "paper")
    first = bench(out, "--progress-every", "0.5")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # Progress while they train: each running condition's policy step out of the budget.
    assert re.search(r"^\[\d+ min\] [012] of 2 finished; HalfCheetah-v5-\S+ at step [\d,]+/2,048", first.stdout,
                     re.M), first.stdout[-2000:]
    names = ["HalfCheetah-v5-true-ent0.01-s0", "HalfCheetah-v5-6labels-s0"]
    records = {}
    for name in names:
        with open(os.path.join(out, name, "done.json")) as f:
            records[name] = json.load(f)
        assert records[name]["steps"] == 2048 and records[name]["seed"] == 0 and records[name]["ent_coef"] == 0.01
        assert records[name]["ent_anneal"] is True
    assert records[names[1]]["labels"] == 6 and records[names[0]]["labels"] is None
    # One round: the labels are due by the first collect (loop.sh clamps LABEL_STEPS to the last round's).
    assert records[names[1]]["label_steps"] == 1 and "label_steps" not in records[names[0]]
    assert len(C.read_queries(os.path.join(out, names[1]))) == 6  # all of them, not the pretraining share
    table = open(os.path.join(out, "paper.md")).read()
    assert "| HalfCheetah-v5 | RL on the true reward |" in table and "| 6 synthetic labels |" in table
    assert "Budget: 2,048 policy steps per condition, seeds [0]" in table
    assert ("entropy bonus 0.01 decaying to 0 with the learning rate and new policies' log std 0 in every "
            "condition") in table
    # Both kinds of condition trained with the decaying bonus and the same starting std: the loop's policy and
    # the true-reward baseline.
    for name in names:
        log = open(os.path.join(out, name + ".log")).read()
        assert "--ent-coef 0.01" in log and "--ent-anneal" in log and "--init-log-std 0" in log, name
        assert records[name]["init_log_std"] == 0.0
    assert os.path.getsize(os.path.join(out, "paper.png")) > 1000

    # A re-run finds every condition done: nothing is trained again, nothing changes.
    mtimes = {n: os.path.getmtime(os.path.join(out, n, "policy.pt")) for n in names}
    again = bench(out)
    assert again.returncode == 0 and "done:" not in again.stdout
    assert mtimes == {n: os.path.getmtime(os.path.join(out, n, "policy.pt")) for n in names}

    # A missing condition (here: a second seed) is the only thing run.
    more = bench(out, "--seeds", "0", "1")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    assert sorted(line.split(":")[1].strip() for line in more.stdout.splitlines() if line.startswith("done:")) \
        == ["HalfCheetah-v5-6labels-s1", "HalfCheetah-v5-true-ent0.01-s1"]
    assert mtimes == {n: os.path.getmtime(os.path.join(out, n, "policy.pt")) for n in names}

    # Another step budget in the same directory would mix budgets in one table: refused.
    other = subprocess.run([sys.executable, "bench/bench_paper.py", *TINY[:6], "--steps", "4096", "--out", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "was trained for 2,048 steps, not 4,096" in other.stdout + other.stderr
    # So would another entropy bonus: the true-reward baseline gets its own name, the loop's runs are refused.
    other = subprocess.run([sys.executable, "bench/bench_paper.py", *TINY, "--ent-coef", "0", "--out", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "was trained with entropy bonus 0.01, not 0" in other.stdout + other.stderr
    assert not os.path.exists(os.path.join(out, "HalfCheetah-v5-true-s0"))  # refused before anything ran
    # And a constant bonus where the finished runs had a decaying one.
    other = subprocess.run([sys.executable, "bench/bench_paper.py", *TINY, "--no-ent-anneal", "--out", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "entropy bonus decaying, not constant" in other.stdout + other.stderr
    # And policies started at another std.
    other = bench(out, "--init-log-std", "-1")
    assert other.returncode != 0 and "started its policy at log std 0, not -1" in other.stdout + other.stderr
    # And another segment length: it changes what the labels say, so the label conditions are refused.
    other = subprocess.run([sys.executable, "bench/bench_paper.py", *TINY, "--out", out], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "SEGMENT_SECONDS": "1"})
    assert other.returncode != 0 and "was trained on 1.5 s segments, not 1 s" in other.stdout + other.stderr
    assert records[names[1]]["segment_steps"] == 30 and "label segments of 1.5 s (HalfCheetah-v5)" in table
    # And labels asked on another schedule (here: a record edited to say so).
    done = os.path.join(out, names[1], "done.json")
    with open(done, "w") as f:
        json.dump({**records[names[1]], "label_steps": 999}, f)
    other = bench(out)
    assert other.returncode != 0 and "asked its labels until step 999, not 1" in other.stdout + other.stderr
    with open(done, "w") as f:
        json.dump(records[names[1]], f)
    # And a condition of another task: a config.json of before the paper's tasks (HalfCheetah with its control
    # cost, env kwargs {}), edited back in.
    config_path = os.path.join(out, names[0], "config.json")
    config = json.load(open(config_path))
    assert config["env_kwargs"] == {"ctrl_cost_weight": 0.0}
    with open(config_path, "w") as f:
        json.dump({**config, "env_kwargs": {}}, f)
    other = bench(out)
    assert other.returncode != 0 and "with env kwargs {}, not the paper's task" in other.stdout + other.stderr
    with open(config_path, "w") as f:
        json.dump(config, f)
    # And one scored over other evaluation episodes, or with other label rounds.
    for edit, says in [({"eval_episodes": 3}, "was scored over 3 evaluation episodes, not 1"),
                       ({"steps_per_round": 1024}, "had label rounds every 1,024 steps, not 2,048")]:
        with open(done, "w") as f:
            json.dump({**records[names[1]], **edit}, f)
        other = bench(out)
        assert other.returncode == 2 and says in other.stderr, other.stderr[-2000:]
    with open(done, "w") as f:
        json.dump(records[names[1]], f)
    # A condition that was begun with other flags and killed has no done.json, but its settings.json says what
    # it was begun with: refused too, before anything trains, instead of going on with the new flags.
    begun = os.path.join(out, "HalfCheetah-v5-6labels-s7")
    os.makedirs(begun)
    with open(os.path.join(begun, "settings.json"), "w") as f:
        json.dump({**json.load(open(os.path.join(out, names[1], "settings.json"))), "seed": 7, "steps": 4096}, f)
    other = bench(out, "--seeds", "0", "7")
    assert other.returncode == 2 and "6labels-s7 was trained for 4,096 steps, not 2,048" in other.stderr
    assert os.listdir(begun) == ["settings.json"]
    assert not os.path.exists(os.path.join(out, "HalfCheetah-v5-true-ent0.01-s7"))
    shutil.rmtree(begun)

    # score_policies rates the runs' final policies with one run's reward model; --deterministic acts with the
    # mean action, so its episodes differ from the sampled ones.
    labelled = os.path.join(out, "HalfCheetah-v5-6labels-s0")
    policies = [labelled, os.path.join(out, "HalfCheetah-v5-true-ent0.01-s0")]

    def score(*flags):
        result = subprocess.run([sys.executable, "bench/score_policies.py", "--reward-model", labelled,
                                 "--policies", *policies, "--episodes", "1", *flags],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {out}")]
        assert [row.split(" | ")[0][2:] for row in rows] == policies
        return result.stdout, rows

    (sampled, sampled_rows), (mean, mean_rows) = score(), score("--deterministic")
    assert "1 episodes per policy, sampled actions." in sampled and "1 episodes per policy, mean actions." in mean
    assert sampled_rows != mean_rows
    for row in sampled_rows + mean_rows:
        cells = row.strip("| ").split(" | ")
        assert -1.0 <= float(cells[4]) <= 1.0  # a correlation of learned with true step rewards
        # HalfCheetah's reward terms, which add up to the true return (each rounded to a whole number)
        terms = dict(item.split(" ") for item in cells[5].split(", "))
        assert sorted(terms) == ["ctrl", "forward"] and float(terms["ctrl"]) <= 0
        assert abs(sum(map(float, terms.values())) - float(cells[2].split(" +- ")[0])) <= 1.5
        assert 0.0 <= float(cells[6]) <= 1.0  # HalfCheetah is planar: the share of its steps spent upside down

    # fixed_reward trains PPO from scratch on a run's final reward model, held fixed, or on one fitted afresh
    # to its labels; it keeps what is done and refuses to mix settings in one directory.
    def fixed(out_dir, *flags):
        return subprocess.run([sys.executable, "bench/fixed_reward.py", "--runs", labelled, "--out", out_dir,
                               "--steps", "2048", "--eval-episodes", "1", *flags], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "MUJOCO_GL": "egl"})

    fixed_out = str(tmp_path / "fixed")
    first = fixed(fixed_out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = os.path.join(fixed_out, "HalfCheetah-v5-6labels-s0")
    record = json.load(open(os.path.join(run, "done.json")))
    assert record["refit"] is None and record["steps"] == 2048 and record["ent_anneal"] is True
    assert record["loop_true_return"] == records[names[1]]["eval_true_return"]
    with open(os.path.join(labelled, "reward_model.pt"), "rb") as a, open(os.path.join(run, "reward_model.pt"),
                                                                          "rb") as b:
        assert a.read() == b.read()  # the run's own model, untouched
    assert "--total-steps 2048 --ent-coef 0.01 --ent-anneal" in open(run + ".log").read()
    table = open(os.path.join(fixed_out, "fixed_reward.md")).read()
    assert "(the run's own final model)" in table and "| HalfCheetah-v5-6labels-s0 |" in table
    mtime = os.path.getmtime(os.path.join(run, "policy.pt"))
    again = fixed(fixed_out)
    assert again.returncode == 0 and "done:" not in again.stdout
    assert os.path.getmtime(os.path.join(run, "policy.pt")) == mtime
    other = fixed(fixed_out, "--refit", "--layers 1 --steps 30")
    assert other.returncode != 0 and "made with other settings" in other.stdout + other.stderr
    refit_out = str(tmp_path / "refit")
    refit = fixed(refit_out, "--refit", "--layers 1 --steps 30")
    assert refit.returncode == 0, refit.stdout[-2000:] + refit.stderr[-2000:]
    refit_run = os.path.join(refit_out, "HalfCheetah-v5-6labels-s0")
    assert "train_reward.py --run " + refit_run + " --fresh --layers 1 --steps 30" in open(refit_run + ".log").read()
    assert json.load(open(os.path.join(refit_run, "done.json")))["refit"] == "--layers 1 --steps 30"
    assert "fitted afresh with train_reward.py --fresh --layers 1 --steps 30" in open(
        os.path.join(refit_out, "fixed_reward.md")).read()
    # with --policy-seeds, PPOs of those seeds train on the same model, on the schedule of a longer run
    seeds_out = str(tmp_path / "seeds")
    seeded = fixed(seeds_out, "--policy-seeds", "5", "6", "--anneal-steps", "4096", "--policy-flags",
                   "--init-log-std -0.5")
    assert seeded.returncode == 0, seeded.stdout[-2000:] + seeded.stderr[-2000:]
    for seed in (5, 6):
        seed_run = os.path.join(seeds_out, f"HalfCheetah-v5-6labels-s0-ppo{seed}")
        assert json.load(open(os.path.join(seed_run, "config.json")))["seed"] == seed
        assert json.load(open(os.path.join(seed_run, "done.json")))["policy_seed"] == seed
        assert "--total-steps 2048 --anneal-steps 4096 --ent-coef 0.01 --ent-anneal --no-plot --init-log-std -0.5" \
            in open(seed_run + ".log").read()
        with open(os.path.join(labelled, "reward_model.pt"), "rb") as a, \
                open(os.path.join(seed_run, "reward_model.pt"), "rb") as b:
            assert a.read() == b.read()
    assert json.load(open(os.path.join(labelled, "config.json")))["seed"] == 0  # the source is untouched
    assert "| HalfCheetah-v5-6labels-s0 | " in open(os.path.join(seeds_out, "fixed_reward.md")).read()
    assert "policy seeds 5, 6" in seeded.stdout
    assert "decaying as in a run of 4,096 steps, train_policy.py --init-log-std -0.5" in seeded.stdout
    for flags, says in ((["--policy-seeds", "3", "3"], "seeds must be distinct"),
                        (["--anneal-steps", "1024"], "must be at least --steps")):
        refused = fixed(str(tmp_path / "refused"), *flags)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr


def test_fixed_reward_splits_the_variance_of_returns_into_the_models_and_ppo_seeds():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from fixed_reward import model_and_seed_variance
    # two models, two seeds each: within-model variances 2 and 2; model means 2 and 6 (variance 8), of which
    # 2 / 2 = 1 is the seeds' noise in a mean of two, so 7 is the models'
    assert model_and_seed_variance(np.array([[1.0, 3.0], [5.0, 7.0]])) == (7.0, 2.0)
    # models that do not differ beyond the seeds' noise get none (not a negative variance)
    assert model_and_seed_variance(np.array([[1.0, 5.0], [5.0, 1.0]])) == (0.0, 8.0)


def test_upside_down_is_a_torso_pitch_beyond_90_degrees_either_way_after_any_number_of_turns():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from score_policies import upside_down_share
    # upright, on its back, on its back pitched the other way, nose-down at 60 degrees, upright after a turn
    assert upside_down_share([0.0, 3.1, -2.0, 1.05, 6.3]) == 0.4
    assert upside_down_share([1.5, -1.5]) == 0.0 and upside_down_share([1.6, -1.6]) == 1.0


@pytest.mark.parametrize("flags, says", [
    (["--labels", "0"], "argument --labels: value out of range"), (["--steps", "0"], "argument --steps"),
    (["--steps-per-round", "0"], "argument --steps-per-round"), (["--jobs", "0"], "argument --jobs"),
    (["--eval-episodes", "0"], "argument --eval-episodes"), (["--seeds", "-1"], "argument --seeds"),
    (["--report-only", "--out", "/nonexistent/paper"], "no condition of these flags has finished in "
                                                        "/nonexistent/paper; nothing to report"),
])
def test_bench_paper_refuses_flags_it_cannot_run_before_it_trains_anything(flags, says):
    """--labels 0 trained the true-reward condition to the end (an hour at the default budget) before its label
    condition failed with a traceback; --jobs 0, --steps-per-round 0 and a mistyped --out of --report-only were
    tracebacks."""
    result = subprocess.run([sys.executable, "bench/bench_paper.py", "--envs", "HalfCheetah-v5", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_policy_to_score_is_a_run_or_a_checkpoint_in_one(tmp_path):
    """score_policies --policies takes a run directory (its policy.pt) or a checkpoint file, a snapshot in the
    run's snapshots/ included; the run's config.json says which env it is of. A file that is no policy
    checkpoint is one sentence, whatever its name."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from score_policies import policy_checkpoint
    run = str(tmp_path / "run")
    snapshot = os.path.join(run, C.SNAPSHOTS_DIR, "policy_step26624.pt")
    os.makedirs(os.path.dirname(snapshot))
    copy = os.path.join(run, "policy.pt.26624")
    C.save_torch_atomic(snapshot, {"model": {}, "format_version": C.FORMAT_VERSION})
    C.save_torch_atomic(copy, {"model": {}, "format_version": C.FORMAT_VERSION})
    with pytest.raises(C.UserError, match=f"is not a run directory nor a checkpoint in one: {run} has no"):
        policy_checkpoint(snapshot)
    C.write_json_atomic(os.path.join(run, C.CONFIG), {})
    assert policy_checkpoint(run) == (run, os.path.join(run, C.POLICY))
    assert policy_checkpoint(snapshot) == (run, snapshot)
    assert policy_checkpoint(copy) == (run, copy)
    with pytest.raises(C.UserError, match="is not a checkpoint this code wrote"):
        C.load_torch(snapshot, "policy checkpoint", kind=C.POLICY)
    # Mistakes: a name that is not there, the snapshots folder itself.
    with pytest.raises(C.UserError, match="run-typo does not exist; give a run directory or a checkpoint file"):
        policy_checkpoint(run + "-typo")
    with pytest.raises(C.UserError, match="is not a run directory nor a checkpoint in one"):
        policy_checkpoint(os.path.dirname(snapshot))
    result = subprocess.run([sys.executable, "bench/score_policies.py", "--reward-model", run, "--policies", run,
                             "--episodes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --episodes: at least 1, not 0" in result.stderr


@pytest.mark.slow
def test_refit_rounds_repeats_the_runs_own_models_and_scores_a_variant_on_the_next_rounds_states(tmp_path):
    """bench/refit_rounds.py: with the loop's own train_reward flags (here the few steps it was given), round 0's
    refit is the model the loop fitted (same L2 coefficients); a variant's row carries its paired difference; a
    run with too few rounds is one sentence."""
    run = str(tmp_path / "run")
    env = {**os.environ, "MUJOCO_GL": "egl", "RUN": run, "ENV_ID": "HalfCheetah-v5", "LABELS": "10",
           "TOTAL_STEPS": "1024", "STEPS_PER_ROUND": "512", "NUM_ENVS": "2", "EVAL_EPISODES": "1", "CLIPS": "0",
           "POLICY_FLAGS": "--num-steps 64 --num-minibatches 2 --no-plot", **FEW_REWARD_STEPS}
    loop = subprocess.run(["bash", "loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert loop.returncode == 0, loop.stdout[-2000:] + loop.stderr[-2000:]
    fitted = [m for m in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if m["stage"] == "train_reward"]

    def refit(*args):
        return subprocess.run([sys.executable, "bench/refit_rounds.py", "--runs", run, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    out = str(tmp_path / "rows.jsonl")
    own, variant = "--steps 30", "--steps 30 --l2-range 1e-5 0.001"
    result = refit("--rounds", "1", "--flags", own, "--flags", variant, "--out", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in open(out)]
    assert [(r["flags"], r["round"]) for r in rows] == [(own, 0), (variant, 0)]
    assert rows[0]["labels"] == fitted[0]["labels"]
    assert rows[0]["l2"] == [round(v, 4) for v in fitted[0]["l2"]]  # the loop's own round-0 model, refitted
    assert all(v <= 0.001 for v in rows[1]["l2"])
    for row in rows:
        assert -1 <= row["spearman"] <= 1 and 0 <= row["pair_acc"] <= 1 and -1 <= row["step_corr"] <= 1
    assert f"| {own} | 0 |" in result.stdout and f"| {variant} | 0 |" in result.stdout
    assert " ± " in result.stdout.split(f"| {variant} | 0 |")[1]
    too_many = refit("--rounds", "2")
    assert too_many.returncode != 0 and "has 2 rounds of segments; --rounds 2 needs 3" in too_many.stderr

    # with a second run, each model is also scored on the other run's next-round states: here a copy of the run,
    # so the other run's states are the run's own and spearman_others repeats spearman
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    two = subprocess.run([sys.executable, "bench/refit_rounds.py", "--runs", run, copy, "--rounds", "1",
                          "--flags", own, "--out", str(tmp_path / "two.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert len(rows) == 2 and all(r["spearman_others"] == pytest.approx(r["spearman"]) for r in rows)
    assert "| spearman_others |" in two.stdout


def test_step_reward_fit_finds_which_input_tells_each_step_s_reward():
    """bench/step_reward_fit.py: a reward of where each step led, drawn apart from where it started, is
    followed step by step by the linear fit of both states and of the state after, not of the state before;
    the segment returns are explained by the inputs that see it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import step_reward_fit
    rng = np.random.default_rng(0)
    obs, led_to = rng.normal(size=(400, 5, 3)), rng.normal(size=(400, 5, 3))
    segments = {"obs": obs, "next_obs": led_to, "rewards": 2 * led_to[..., 0] + 1}
    returns = segments["rewards"].sum(1)
    fits = {name: step_reward_fit.linear_fit(x, rewards, returns)
            for name, (x, rewards) in step_reward_fit.step_inputs(segments).items()}
    for name in ("obs+next", "after"):
        assert fits[name][0] == pytest.approx(1.0) and fits[name][1] == pytest.approx(1.0)
    assert fits["before"][0] < 0.1 and abs(fits["before"][1]) < 0.1
    # after-T-1 sees obs[t+1], which here is unrelated to where step t led (a drawn-apart next_obs)
    assert abs(fits["after-T-1"][1]) < 0.1


def test_upside_down_reward_finds_a_models_bonus_for_being_upside_down_at_the_same_speed():
    """bench/upside_down.py: a reward of 0.5 per unit of speed plus 0.8 for being upside down gives a bonus of
    0.8 (1.6 in speed units) even where the upside-down states are also the slow ones, and the members' std
    is read apart for upright and upside-down states."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from upside_down import in_speed_units, upside_down_reward
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2000, 12))
    obs[:, 1] *= 0.3  # pitches within 90 degrees of upright...
    obs[:500, 1] += np.pi  # ...but a quarter of them turned upside down
    obs[:500, 8] -= 2.0  # and slower: a plain difference of means would hide the bonus
    upside = np.cos(obs[:, 1]) < 0
    reward = 0.5 * obs[:, 8] + 0.8 * upside + 0.1 * obs[:, 10]
    spread = np.where(upside, 0.9, 0.2)
    members = reward + np.stack([-spread, np.zeros_like(spread), spread]) * np.sqrt(1.5)  # std over 3: spread
    f = upside_down_reward(members, obs, 8, 10)
    assert f["bonus"] == pytest.approx(0.8) and f["per_speed"] == pytest.approx(0.5)
    assert in_speed_units(f) == "+1.60"
    assert in_speed_units({"bonus": 0.8, "per_speed": 0.0}) == "n/a"  # a reward that does not rise with the speed
    assert f["std_upright"] == pytest.approx(0.2) and f["std_upside_down"] == pytest.approx(0.9)
    assert f["reward_upside_down"] == pytest.approx(reward[upside].mean())
    assert f["reward_upright"] == pytest.approx(reward[~upside].mean())
    with pytest.raises(C.UserError, match="all upright or all upside down"):
        upside_down_reward(members[:, 500:], obs[500:], 8, 10)


def test_upside_down_scores_each_models_reward_on_the_pooled_states_and_refuses_what_it_cannot(tmp_path):
    """End to end on a small HalfCheetah run whose states are partly turned over by hand: one row per model,
    the printed share of upside-down states and the true reward's fit; a run without segments or without a
    model, a path that is no run, states of two envs or none upside down, a feature out of range or a model of
    another env are one sentence each."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    run = str(tmp_path / "cheetah")
    for stage in (["collect.py", "--run", run, "--env", "HalfCheetah-v5", "--pairs", "8", "--no-clips",
                   "--num-envs", "2"], ["label.py", "teach", "--run", run],
                  ["train_reward.py", "--run", run, "--steps", "5", "--min-steps", "5"]):
        result = subprocess.run([sys.executable, *stage], cwd=ROOT, capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    path = os.path.join(run, "segments", "round_0000.npz")
    segments = dict(np.load(path))
    segments["obs"][::4, :, 1] = np.pi  # every fourth segment on its back
    C.save_segments(run, 0, segments)
    share = np.mean(np.cos(segments["obs"][..., 1]) < 0)

    def upside_down(*flags):
        return subprocess.run([sys.executable, "bench/upside_down.py", *flags], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    result = upside_down("--models", run, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{segments['obs'].shape[0] * segments['obs'].shape[1] * 2} states of HalfCheetah-v5, {share:.3f} of " \
           "them upside down" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {run} |")]
    assert len(rows) == 2 and rows[0] == rows[1]
    assert re.fullmatch(r"\| \S+ \| [+-]\d+\.\d\d \| [+-]\d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| [+-]\d+\.\d\d "
                        r"\(([+-]\d+\.\d\d|n/a)\) \| [+-]\d+\.\d\d \|", rows[0]), rows[0]
    # the true reward of the same steps, fitted the same way, and the segments' returns with and without a flip
    returns, flipped = segments["rewards"].sum(1), (np.cos(segments["obs"][..., 1]) < 0).any(1)
    assert (f"Mean true return of the {2 * flipped.sum()} segments with a step upside down "
            f"{returns[flipped].mean():+.2f}, of the other {2 * (~flipped).sum()} {returns[~flipped].mean():+.2f}."
            in result.stdout), result.stdout
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from upside_down import in_speed_units, upside_down_reward
    obs = np.concatenate([segments["obs"]] * 2).reshape(-1, segments["obs"].shape[-1])
    true_fit = upside_down_reward(np.concatenate([segments["rewards"]] * 2).reshape(1, -1), obs, 8, 10)
    assert (f"The true reward of those steps, fitted the same way: bonus {true_fit['bonus']:+.3f} "
            f"({in_speed_units(true_fit)} in speed units), per unit of speed {true_fit['per_speed']:.3f}."
            in result.stdout), result.stdout

    empty = str(tmp_path / "empty")
    C.open_run(empty, "HalfCheetah-v5")
    hopper = str(tmp_path / "hopper")
    C.open_run(hopper, "Hopper-v5")
    unfitted = str(tmp_path / "unfitted")  # segments, but no reward model yet
    shutil.copytree(run, unfitted)
    os.remove(os.path.join(unfitted, C.REWARD_MODEL))
    upright = str(tmp_path / "upright")  # no state upside down
    shutil.copytree(run, upright)
    C.save_segments(upright, 0, {**segments, "obs": segments["obs"] * np.array([1, 0] + [1] * 15, np.float32)})
    for flags, says in [(["--models", run, "--states", empty], f"{empty} has no segment files to take states from"),
                        (["--models", unfitted], f"{unfitted} has no {C.REWARD_MODEL} yet"),
                        (["--models", str(tmp_path / "typo"), "--states", run], "typo is not a run directory"),
                        (["--models", run, "--states", run, hopper], "the runs whose states to score are of "
                                                                    "HalfCheetah-v5 and Hopper-v5; give runs of one env"),
                        (["--models", upright], "none of the"),
                        (["--models", run, "--speed-feature", "17"], "observation feature 17 is not one of this "
                                                                      "env's 2..16"),
                        (["--models", hopper, "--states", run], f"{hopper} is a run of Hopper-v5; the states are "
                                                                f"of HalfCheetah-v5")]:
        result = upside_down(*flags)
        assert result.returncode != 0 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
