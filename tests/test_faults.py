"""Issue 7: fault injection. Real stages run as subprocesses on tiny budgets and are SIGKILLed mid-write, at
chosen points (contract's RLHF_FAULT hook writes half a file and then kills its own process) and at random
moments (loop.sh killed after random delays); then they are run again and the run directory is checked: no
label lost or counted twice, no segment id reused, no half-written file read, every .jsonl line whole except
the ones a kill tore. Also: the same seed with the oracle teacher gives the same segments, queries, labels."""
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import contract as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# Each stage's command and the flags that keep it tiny.
TINY = {"collect": (["collect.py"], ["--no-clips", "--num-envs", "2"]),
        "teach": (["label.py", "teach"], []),
        "train_reward": (["train_reward.py"], ["--steps", "3", "--threads", "1"]),
        "train_policy": (["train_policy.py"], ["--num-envs", "2", "--num-steps", "64", "--no-plot"])}


def stage(name, run, *args, fault=None, timeout=180):
    """Run one stage of the loop on run as a subprocess, with tiny budgets; fault sets RLHF_FAULT."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    env.pop("RLHF_FAULT", None)
    if fault:
        env["RLHF_FAULT"] = fault
    command, flags = TINY[name]
    return subprocess.run([PYTHON, *command, "--run", run, *flags, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def build_base(tmp_path_factory):
    """A run as the loop leaves it after one round, plus a second round collected but not yet labelled: round 0
    (6 pairs) labelled by the oracle, a reward model, a policy at step 128, round 1 (4 pairs) open. Built once
    per session and copied by each test (tests/test_bad_input.py uses it too)."""
    root = tmp_path_factory.getbasetemp() / "issue7-base"
    run = str(root / "run")
    if (root / "done").exists():
        return run
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    ok(stage("collect", run, "--env", "HalfCheetah-v5", "--pairs", "6"))
    ok(stage("teach", run))
    ok(stage("train_reward", run))
    ok(stage("train_policy", run, "--total-steps", "128"))
    ok(stage("collect", run, "--pairs", "4"))
    (root / "done").write_text("")
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory)


def copy_run(base, tmp_path, name="run"):
    target = str(tmp_path / name)
    shutil.copytree(base, target)
    return target


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def raw_lines(path):
    """(whole lines, torn last line or None) of a .jsonl file as bytes."""
    if not os.path.exists(path):
        return [], None
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    return [l for l in lines[:-1] if l.strip()], (lines[-1] or None)


def unparseable(path):
    """The lines of a .jsonl file that are not a JSON object."""
    bad = []
    whole, torn = raw_lines(path)
    for line in whole + ([torn] if torn else []):
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def oracle_choice(segments, index, query):
    """What label.py teach's oracle answers: the segment with the larger true return (summed in float64)."""
    left = np.asarray(segments["rewards"][index[query["left"]]], np.float64).sum()
    right = np.asarray(segments["rewards"][index[query["right"]]], np.float64).sum()
    return "equal" if left == right else "left" if left > right else "right"


def check_run(run, torn=(), all_labelled=True):
    """The invariants of a run directory after any crash and re-run. `torn`: lines a kill tore, the only
    ones allowed not to parse. Returns (queries, labels)."""
    config = C.open_run(run)
    for name in (C.QUERIES, C.LABELS, C.METRICS):
        bad = unparseable(os.path.join(run, name))
        assert set(bad) <= set(torn), (name, bad)
    # Every segment file loads whole, its arrays have the run's shapes, no segment id is in two files.
    segments = C.load_segments(run) or {k: np.zeros((0, config["segment_steps"], config["obs_shape"][0]))
                                        for k in ("ids", "obs", "rewards")}
    ids = segments["ids"].tolist()
    assert len(ids) == len(set(ids))
    assert segments["obs"].shape[1:] == (config["segment_steps"], config["obs_shape"][0])
    index = {s: i for i, s in enumerate(ids)}
    # Query ids unique (no line repeats one), every query names segments (and clips) on disk.
    whole, _ = raw_lines(os.path.join(run, C.QUERIES))
    parsed = [json.loads(l) for l in whole if l not in torn]
    assert len({q["query_id"] for q in parsed}) == len(parsed)
    queries = C.read_queries(run)
    for q in queries.values():
        assert q["left"] in index and q["right"] in index
        for side in ("left_clip", "right_clip"):
            assert q[side] is None or os.path.getsize(os.path.join(run, q[side])) > 0
    # No label lost or counted twice: each query answered at most (after teach: exactly) once, as the oracle.
    labels = C.read_labels(run, queries)
    answered = [l["query_id"] for l in labels]
    assert len(answered) == len(set(answered)), "a query was labelled twice"
    if all_labelled:
        assert sorted(answered) == sorted(queries)
    for l in labels:
        assert l["choice"] == oracle_choice(segments, index, queries[l["query_id"]])
    # Checkpoints load whole.
    if os.path.exists(os.path.join(run, C.REWARD_MODEL)):
        assert C.load_reward_model(run) is not None
    C.policy_step(run)
    return queries, labels


# ------------------------------------------------------------------------------------------- the hook

def test_the_fault_hook_writes_half_then_kills_or_fails_like_a_full_disk(tmp_path):
    path = str(tmp_path / "x.jsonl")
    C.append_jsonl(path, {"a": 1})
    code = f"import contract; contract.append_jsonl({path!r}, {{'b': 2, 'c': 3}})"
    env = {**os.environ, "RLHF_FAULT": "kill:x.jsonl"}
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    whole, torn = raw_lines(path)
    assert whole == [b'{"a": 1}'] and torn == b'{"b": 2,'  # half of the line
    # Second write of that name, as a full disk: the half written is taken back, the error is one sentence.
    env["RLHF_FAULT"] = "enospc:x.jsonl:2"
    code = (f"import contract; contract.run_main(lambda: [contract.append_jsonl({path!r}, {{'d': i}}) "
            f"for i in range(2)])")
    before = open(path, "rb").read()
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: the disk is full (writing " + path)
    assert open(path, "rb").read() == before + b'\n{"d": 0}\n'  # the torn line was closed, then one record


# ------------------------------------------------------------------------------ SIGKILL mid-write

KILL_POINTS = {
    # name: (stage, extra args, fault, file the kill tears)
    "collect-segments": ("collect", (), "kill:round_0002.npz", "segments/round_0002.npz"),
    "collect-queries": ("collect", (), "kill:queries.jsonl", C.QUERIES),
    "collect-metrics": ("collect", (), "kill:metrics.jsonl", C.METRICS),
    "teach-labels": ("teach", (), "kill:labels.jsonl", C.LABELS),
    "train_reward-checkpoint": ("train_reward", (), "kill:reward_model.pt", C.REWARD_MODEL),
    "train_policy-checkpoint": ("train_policy", ("--total-steps", "256"), "kill:policy.pt", C.POLICY),
}
SCHEDULE = ("--label-budget", "30", "--schedule-steps", "1000", "--pretrain-fraction", "0.5")


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_mid_write_then_rerun_loses_nothing(base, tmp_path, point):
    name, args, fault, torn_file = KILL_POINTS[point]
    run = copy_run(base, tmp_path)
    if name == "collect":
        args = SCHEDULE
    before = {p: file_hash(p) for p in glob.glob(os.path.join(run, "**", "*"), recursive=True) if os.path.isfile(p)}
    target = os.path.join(run, torn_file)

    result = stage(name, run, *args, fault=fault)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    torn = []
    if target.endswith(".jsonl"):
        whole, last = raw_lines(target)
        assert last is not None, "the kill should have torn the last line"
        torn.append(last)
        with open(target, "rb") as f:  # an append never touches what was there
            assert f.read().startswith(open(os.path.join(base, torn_file), "rb").read())
    else:  # an atomic write: the old file (or none) is there, whole; the half-written one is a .tmp-* file
        assert (file_hash(target) if os.path.exists(target) else None) == before.get(target)
        assert glob.glob(os.path.join(os.path.dirname(target), ".tmp-*" + os.path.basename(target)))
    # Whatever the kill left, every reader takes it: no half-written file is read.
    check_run(run, torn, all_labelled=False)

    ok(stage(name, run, *args))  # re-run: it resumes
    if name != "teach":
        ok(stage("teach", run))  # and the open queries get their labels
    queries, labels = check_run(run, torn)
    if name == "collect":  # the schedule's 19 pairs are asked, however the kill split them
        assert len(queries) == 19 and sorted(queries) == list(range(19))
    if name == "train_policy":
        assert C.policy_step(run) == 256
    if name == "train_reward":
        assert file_hash(target) != before[target]


def test_sigkill_while_rendering_clips_leaves_only_whole_clips(base, tmp_path):
    """The slowest part of collect, so the likeliest place for a kill: clips are renamed into place whole."""
    import imageio.v2 as imageio
    run = copy_run(base, tmp_path)
    command = [PYTHON, "collect.py", "--run", run, "--pairs", "6", "--num-envs", "2", "--clip-size", "64"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "MUJOCO_GL": "egl"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    clips = os.path.join(run, C.CLIPS_DIR)
    deadline = time.time() + 120
    while process.poll() is None and len(os.listdir(clips)) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the stage and its ffmpeg
    process.wait()
    segment_steps = C.open_run(run)["segment_steps"]
    for path in glob.glob(os.path.join(clips, "*.mp4")):  # never the .tmp-* ones
        assert len(imageio.mimread(path)) == segment_steps, path
    ok(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180))
    ok(stage("teach", run))
    queries, _ = check_run(run)
    assert sum(q["left_clip"] is not None for q in queries.values()) == 6


def test_a_stale_temp_file_is_never_read_and_is_removed_after_an_hour(base, tmp_path):
    run = copy_run(base, tmp_path)
    old = os.path.join(run, C.SEGMENTS_DIR, ".tmp-abc-round_0005.npz")
    new = os.path.join(run, ".tmp-def-policy.pt")
    for path in (old, new):
        with open(path, "wb") as f:
            f.write(b"half a file")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert [os.path.basename(p) for p in C.segment_files(run)] == ["round_0000.npz", "round_0001.npz"]
    ok(stage("teach", run))
    assert not os.path.exists(old) and os.path.exists(new)  # the young one may be a stage writing now
    check_run(run)


def test_a_second_collect_on_the_same_run_is_refused_while_the_first_runs(base, tmp_path):
    """What a SIGKILL of loop.sh alone (not its process group) leads to: its stage runs on, and the re-run
    loop starts a second one beside it. Without the lock both would number round 2 and its segments alike."""
    run = copy_run(base, tmp_path)
    with C.exclusive(run):
        result = stage("collect", run, "--pairs", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"another process is writing queries or labels to {run} right now" in result.stderr
    ok(stage("collect", run, "--pairs", "2"))  # the lock went with its holder


def test_a_second_teacher_is_refused_while_the_first_runs(base, tmp_path):
    run = copy_run(base, tmp_path)
    with C.exclusive(run):
        result = stage("teach", run)
    assert result.returncode == 2 and "another process is writing queries or labels" in result.stderr
    check_run(run, all_labelled=False)


# ------------------------------------------------------------------------------ SIGKILL at random

@pytest.mark.slow
def test_loop_killed_at_random_moments_resumes_and_loses_no_label(tmp_path):
    run = str(tmp_path / "loop")
    env = {**os.environ, "RUN": run, "ENV_ID": "HalfCheetah-v5", "TOTAL_STEPS": "512", "STEPS_PER_ROUND": "256",
           "LABELS": "16", "NUM_ENVS": "2", "REWARD_STEPS": "5",
           "EVAL_EPISODES": "1", "CLIPS": "0", "PYTHON": PYTHON, "MUJOCO_GL": "egl"}
    env.pop("RLHF_FAULT", None)
    rng = random.Random(7)
    torn = []
    for attempt in range(4):
        process = subprocess.Popen(["bash", "loop.sh"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            process.wait(timeout=rng.uniform(1.0, 9.0))
            finished = True
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # loop.sh and whichever stage it is running
            process.wait()
            finished = False
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert "Traceback" not in stderr, stderr[-3000:]
        if finished:
            assert process.returncode == 0, stderr[-3000:]
            break
        for name in (C.QUERIES, C.LABELS, C.METRICS):
            torn += unparseable(os.path.join(run, name))
        if os.path.exists(os.path.join(run, C.CONFIG)):
            check_run(run, torn, all_labelled=False)  # what a kill leaves is always readable
    result = subprocess.run(["bash", "loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained agent:" in result.stdout
    queries, labels = check_run(run, torn)
    assert sorted(queries) == list(range(16)) and len(labels) == 16
    assert C.policy_step(run) >= 512


# ----------------------------------------------------------------------------------------- determinism

@pytest.mark.slow
def test_the_same_seed_with_the_oracle_gives_the_same_segments_queries_and_labels(base, tmp_path):
    """Two fresh runs, then a second round of each with the same policy and reward model: random actions and
    env resets, the policy's sampled actions, random and disagreement pair selection, the teacher."""
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for run in runs:
        ok(stage("collect", run, "--env", "HalfCheetah-v5", "--seed", "3", "--pairs", "5"))
        ok(stage("teach", run))
        for name in (C.POLICY, C.REWARD_MODEL):
            shutil.copy(os.path.join(base, name), os.path.join(run, name))
        ok(stage("collect", run, "--pairs", "4"))
        ok(stage("collect", run, "--pairs", "3", "--selection", "random"))
        ok(stage("teach", run))

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    a, b = runs
    for name in ("round_0000.npz", "round_0001.npz", "round_0002.npz"):
        with np.load(os.path.join(a, C.SEGMENTS_DIR, name)) as x, np.load(os.path.join(b, C.SEGMENTS_DIR, name)) as y:
            for key in C.SEGMENT_FIELDS:
                assert x[key].tobytes() == y[key].tobytes(), (name, key)
    for name in (C.QUERIES, C.LABELS):
        records = [without_time(C.read_jsonl(os.path.join(run, name))) for run in runs]
        assert records[0] == records[1], name
    queries = C.read_queries(a)
    assert len(queries) == 12 and {q["selection"] for q in queries.values()} == {"random", "disagreement"}
    assert C.load_segments(a)["policy_step"].max() == 128  # the second round acted with the policy
    # and another seed gives other segments
    other = str(tmp_path / "c")
    ok(stage("collect", other, "--env", "HalfCheetah-v5", "--seed", "4", "--pairs", "5"))
    with np.load(os.path.join(a, C.SEGMENTS_DIR, "round_0000.npz")) as x, \
            np.load(os.path.join(other, C.SEGMENTS_DIR, "round_0000.npz")) as y:
        assert x["obs"].tobytes() != y["obs"].tobytes()
