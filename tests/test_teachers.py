"""Issue 6: synthetic teachers (B-Pref's imperfect ones) and the built-in behaviours."""
import os
import subprocess
import sys

import numpy as np
import pytest

import contract as C
import label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answers(r_left, r_right, n=4000, seed=0, **teacher):
    rng = np.random.default_rng(seed)
    return [label.synthetic_choice(r_left, r_right, rng, **teacher) for _ in range(n)]


def test_oracle_prefers_the_larger_return():
    assert label.synthetic_choice(2.0, 1.0, np.random.default_rng(0)) == "left"
    assert label.synthetic_choice(-3.0, 1.0, np.random.default_rng(0)) == "right"
    assert label.synthetic_choice(1.0, 1.0, np.random.default_rng(0)) == "equal"


def test_mistake_teacher_flips_about_ten_percent():
    flipped = np.mean([a == "right" for a in answers(2.0, 1.0, mistake=0.1)])
    # binomial(4000, 0.1): std 0.0047, so +-0.02 is over 4 standard deviations
    assert abs(flipped - 0.1) < 0.02, flipped


def test_stochastic_teacher_follows_bradley_terry():
    beta, diff = 1.0, 1.0
    p_left = np.mean([a == "left" for a in answers(1.0 + diff, 1.0, beta=beta)])
    assert abs(p_left - 1 / (1 + np.exp(-beta * diff))) < 0.025, p_left
    # infinitely rational: always the better one; near-zero rationality: a coin flip
    assert set(answers(1.1, 1.0, n=200, beta=np.inf)) == {"left"}
    assert abs(np.mean([a == "left" for a in answers(5.0, 1.0, beta=1e-6)]) - 0.5) < 0.03


def test_skip_and_equal_thresholds():
    rng = np.random.default_rng(0)
    assert label.synthetic_choice(0.5, 0.4, rng, skip_threshold=1.0) == "skip"      # both below: can't tell
    assert label.synthetic_choice(1.5, 0.4, rng, skip_threshold=1.0) == "left"      # one above: answer
    assert label.synthetic_choice(1.0, 1.05, rng, equal_threshold=0.1) == "equal"   # too close to call
    assert label.synthetic_choice(1.0, 1.2, rng, equal_threshold=0.1) == "right"
    # skip is decided before equal, as in B-Pref
    assert label.synthetic_choice(0.5, 0.5, rng, skip_threshold=1.0, equal_threshold=0.1) == "skip"


def test_myopic_teacher_weighs_the_end_of_the_segment_more():
    early = np.array([1.0, 0.0, 0.0, 0.0])
    late = np.array([0.0, 0.0, 0.0, 1.0])
    r_early, r_late = label.teacher_returns(early, late, gamma=0.9)
    assert r_early == pytest.approx(0.9 ** 3) and r_late == pytest.approx(1.0)
    assert label.teacher_returns(early, late, gamma=1.0) == (1.0, 1.0)


def segment(columns=None, T=30, nq=9, nv=9):
    """A hand-made segment: columns maps (array name, column) -> constant value."""
    seg = {"obs": np.zeros((T, 17)), "acts": np.zeros((T, 6)), "rewards": np.zeros(T),
           "qpos": np.zeros((T, nq)), "qvel": np.zeros((T, nv))}
    for (key, column), value in (columns or {}).items():
        seg[key][:, column] = value
    return seg


def score(behaviour, seg):
    return float(np.sum(label.BEHAVIOURS[behaviour](seg)))


def test_built_in_behaviours_rank_a_segment_showing_them_first():
    spinning_ccw = segment({("qvel", 0): 3.0}, nq=4, nv=4)
    spinning_cw = segment({("qvel", 0): -3.0}, nq=4, nv=4)
    assert score("reacher_spin_ccw", spinning_ccw) > score("reacher_spin_ccw", spinning_cw)

    backwards = segment({("qvel", 0): -2.0})
    forwards = segment({("qvel", 0): 2.0})
    assert score("cheetah_backwards", backwards) > score("cheetah_backwards", forwards)

    flipping_back = segment({("qvel", 2): -4.0, ("qpos", 1): 1.4}, nq=6, nv=6)
    falling_forward = segment({("qvel", 2): 1.0, ("qpos", 1): 0.8}, nq=6, nv=6)
    standing = segment({("qpos", 1): 1.25}, nq=6, nv=6)
    assert score("hopper_backflip", flipping_back) > score("hopper_backflip", standing) > \
        score("hopper_backflip", falling_forward)

    rewarded = segment({("qvel", 0): 0.0})
    rewarded["rewards"][:] = 1.0
    assert score("env_reward", rewarded) > score("env_reward", segment())


def test_teach_records_the_teacher_and_loads_user_behaviours(tmp_path):
    run = str(tmp_path / "run")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    subprocess.run([sys.executable, "collect.py", "--run", run, "--env", "HalfCheetah-v5", "--pairs", "40",
                    "--no-clips", "--num-envs", "2"], cwd=ROOT, check=True, capture_output=True, env=env)
    with open(tmp_path / "my_behaviours.py", "w") as f:
        f.write("def fast_backwards(segment):\n    return -segment['qvel'][:, 0]\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "label.py"), "teach", "--run", run, "--behaviour",
                             "my_behaviours:fast_backwards", "--mistake", "0.1", "--gamma", "0.9"],
                            cwd=str(tmp_path), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    labels = C.read_labels(run)
    assert len(labels) == 40
    teacher = labels[0]["teacher"]
    assert teacher["behaviour"] == "my_behaviours:fast_backwards" and teacher["mistake"] == 0.1
    assert teacher["gamma"] == 0.9 and labels[0]["labeler"] == "synthetic"
    # the answers follow the user's function (up to the 10% mistakes)
    segments = C.load_segments(run)
    index = {int(s): i for i, s in enumerate(segments["ids"])}
    queries = C.read_queries(run)
    backward = -segments["qvel"][:, :, 0]
    weights = 0.9 ** np.arange(backward.shape[1] - 1, -1, -1)
    agree = [(backward[index[queries[l["query_id"]]["left"]]] @ weights >
              backward[index[queries[l["query_id"]]["right"]]] @ weights) == (l["choice"] == "left")
             for l in labels]
    assert 0.75 < np.mean(agree) < 1.0  # some of the 10% mistakes were made
    # ... exactly the answers of --gamma 0.9 and --mistake 0.1, each query's random numbers seeded by its id
    seed = C.read_config(run)["seed"]
    expected = [label.synthetic_choice(*label.teacher_returns(backward[index[queries[l["query_id"]]["left"]]],
                                                              backward[index[queries[l["query_id"]]["right"]]],
                                                              0.9),
                                       np.random.default_rng([seed, l["query_id"]]), mistake=0.1)
                for l in labels]
    assert [l["choice"] for l in labels] == expected

    bad = subprocess.run([sys.executable, "label.py", "teach", "--run", run, "--behaviour", "no_such_thing"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown behaviour" in bad.stderr and "Traceback" not in bad.stderr
