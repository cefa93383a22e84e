"""Issue 7: bad input. Each test breaks a copy of a small run the way a user (or a crash, or a full disk) might,
runs a real stage on it as a subprocess and checks: a non-zero exit (2 for what the user can fix, 1 for the
machine: a full disk), exactly one `error: ...` sentence on stderr, no traceback, and not one byte of the
run directory changed. A malformed line is the exception: reported with its line number and skipped, and
the stage goes on with the rest."""
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import contract as C
from test_faults import build_base, copy_run, stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Round 0 (6 pairs) labelled, reward model, policy at step 128, round 1 (4 pairs) not yet labelled."""
    return build_base(tmp_path_factory)


@pytest.fixture
def run(base, tmp_path):
    return copy_run(base, tmp_path)


def snapshot(run):
    """Every file under run (temp files included) -> sha256 of its bytes; None if run does not exist."""
    if not os.path.exists(run):
        return None
    hashes = {}
    for directory, _, files in os.walk(run):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, run)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def refused(run, name, *args, code=2, says=(), fault=None):
    """Run stage `name` on run; assert it fails with `code`, one error sentence containing `says`, no
    traceback, and nothing on disk changed. Returns the error line."""
    before = snapshot(run)
    result = stage(name, run, *args, fault=fault)
    assert result.returncode == code, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in (says,) if isinstance(says, str) else says:
        assert text in errors[0], errors[0]
    assert errors[0].count(". ") == 0, errors[0]  # one sentence
    assert snapshot(run) == before, "the run directory changed"
    return errors[0]


def flag_refused(run, run_stage, says):
    """run_stage() (a stage given a mistyped flag) exits 2 with `says` on stderr, without a traceback, and
    nothing on disk changed: argparse's own "prog: error:" line, which refused() does not expect."""
    before = snapshot(run)
    result = run_stage()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert says in result.stderr, result.stderr[-2000:]
    assert snapshot(run) == before


def lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")


# --------------------------------------------------------------------------------- environment ids

@pytest.mark.parametrize("name, env_id, says", [
    ("collect", "Nope-v0", "unknown or unavailable environment id 'Nope-v0'"),
    ("collect", "HalfCheetah-v99", "unknown or unavailable environment id 'HalfCheetah-v99'"),
    ("collect", "nomodule:Cheetah-v0", "unknown or unavailable environment id"),
    ("collect", "CartPole-v1", "CartPole-v1 is not a MuJoCo environment"),
    ("train_policy", "Nope-v0", "unknown or unavailable environment id 'Nope-v0'"),
])
def test_an_unknown_env_id(tmp_path, name, env_id, says):
    run = str(tmp_path / "new")
    refused(run, name, "--env", env_id, *(["--reward", "true"] if name == "train_policy" else ["--pairs", "2"]),
            says=says)
    assert not os.path.exists(run)  # not even the directory


@pytest.mark.parametrize("name, args", [("collect", ("--pairs", "2")), ("train_policy", ("--reward", "true"))])
def test_a_run_made_for_another_env(run, name, args):
    refused(run, name, "--env", "Hopper-v5", *args, says=f"{run} is a run of HalfCheetah-v5, not Hopper-v5")


@pytest.mark.parametrize("name", ["collect", "teach", "train_reward", "train_policy"])
def test_a_run_of_an_older_format(run, name):
    path = os.path.join(run, C.CONFIG)
    config = json.load(open(path))
    C.write_json_atomic(path, {**config, "format_version": 0})
    refused(run, name, *(["--pairs", "2"] if name == "collect" else []),
            says=("data format version 0", f"reads version {C.FORMAT_VERSION}"))


@pytest.mark.parametrize("name, flags, says", [
    ("collect", ("--pairs", "2", "--seed", "7"), "was created with seed 0, not 7; pick another --run, or leave"),
    ("collect", ("--pairs", "2", "--segment-seconds", "0.5"), "cuts segments of 30 steps, not the 10 of 0.5 s"),
    ("train_policy", ("--seed", "7"), "was created with seed 0, not 7"),
])
def test_a_seed_or_segment_length_other_than_the_runs(run, name, flags, says):
    """Both are fixed when the run is created; given again with another value they were ignored without a
    word (README's `SEGMENT_SECONDS=1.0 ./loop.sh` on an existing run kept its old length). The run's own value,
    given again, is fine."""
    refused(run, name, *flags, says=says)
    from test_faults import ok
    ok(stage("collect", run, "--pairs", "2", "--seed", "0", "--segment-seconds", "1.5"))


def test_a_config_without_the_env_sizes(run):
    path = os.path.join(run, C.CONFIG)
    config = json.load(open(path))
    del config["obs_shape"]
    C.write_json_atomic(path, config)
    refused(run, "train_policy", "--reward", "true", says="lacks a valid 'obs_shape'")


@pytest.mark.parametrize("content, says", [
    (b'{"format_version": 1, "env_id": "HalfCh', "is not valid JSON"),
    (b"[1, 2]", "is not a JSON object"),
    (b'{"format_version": 1, "env_id": "HalfCheetah-v5"}', "lacks a valid 'env_kwargs'"),
])
def test_a_broken_config(run, content, says):
    with open(os.path.join(run, C.CONFIG), "wb") as f:
        f.write(content)
    refused(run, "teach", says=says)


@pytest.mark.parametrize("key, value", [("segment_steps", 0), ("segment_steps", -3), ("dt", float("nan")),
                                        ("obs_shape", [0]), ("nv", 0), ("seed", -1)])
def test_a_config_edited_to_a_value_no_run_has(run, key, value):
    """The types were checked, not the values: segment_steps 0 was a ZeroDivisionError in collect.py."""
    path = os.path.join(run, C.CONFIG)
    C.write_json_atomic(path, {**json.load(open(path)), key: value})
    refused(run, "collect", "--pairs", "2", says=f"lacks a valid {key!r}")


# ----------------------------------------------------------------------------------- segment files

def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("name, damage", [("teach", truncate), ("train_reward", truncate), ("collect", truncate),
                                          ("teach", flip_a_byte)])
def test_a_truncated_or_corrupt_segment_file(run, name, damage):
    path = os.path.join(run, C.SEGMENTS_DIR, "round_0000.npz")
    damage(path)
    refused(run, name, *(["--pairs", "2"] if name == "collect" else []),
            says=f"segment file {path} is corrupt or truncated")


def test_a_segment_file_of_another_run(run, tmp_path):
    other = str(tmp_path / "hopper")
    assert stage("collect", other, "--env", "Hopper-v5", "--pairs", "1").returncode == 0
    shutil.copy(os.path.join(other, C.SEGMENTS_DIR, "round_0000.npz"),
                os.path.join(run, C.SEGMENTS_DIR, "round_0001.npz"))
    refused(run, "teach", says="does not fit this run")


# ------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("checkpoint, name, damage", [
    (C.REWARD_MODEL, "train_reward", truncate),
    (C.REWARD_MODEL, "train_policy", flip_a_byte),  # torch.load would take it: the zip CRC catches it
    (C.REWARD_MODEL, "collect", truncate),  # disagreement selection
    (C.POLICY, "train_policy", truncate),
    (C.POLICY, "collect", flip_a_byte),
])
def test_a_truncated_or_corrupt_checkpoint(run, checkpoint, name, damage):
    path = os.path.join(run, checkpoint)
    damage(path)
    args = {"train_policy": ("--total-steps", "256"), "collect": ("--pairs", "2")}.get(name, ())
    refused(run, name, *args, says=(path, "is corrupt or truncated"))


def policy_of_another_env(path):
    """A well-formed policy.pt of an env with 11 observations and 3 actions (Hopper's), no training needed."""
    import torch
    net = C.build_actor_critic(11, 3)
    C.save_torch_atomic(path, {"model": net.state_dict(), "optimizer": torch.optim.Adam(net.parameters()).state_dict(),
                               "obs_rms": C.RunningMeanStd((11,)).state_dict(),
                               "return_rms": C.RunningMeanStd(()).state_dict(), "global_step": 64, "hidden": 64,
                               "reward": "true", "torch_rng": torch.get_rng_state(),
                               "format_version": C.FORMAT_VERSION})


def test_a_policy_of_another_env_in_collect(run):
    policy_of_another_env(os.path.join(run, C.POLICY))
    refused(run, "collect", "--pairs", "2", says="the policy checkpoint does not fit this run's 17 observations")


def test_a_policy_of_another_env_in_train_policy(run):
    policy_of_another_env(os.path.join(run, C.POLICY))
    refused(run, "train_policy", "--total-steps", "256", says="policy.pt")


def test_a_policy_without_its_random_state(run):
    """A resumed run restores torch's random state from policy.pt; a file without it was a KeyError."""
    import torch
    path = os.path.join(run, C.POLICY)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["torch_rng"]
    C.save_torch_atomic(path, checkpoint)
    refused(run, "train_policy", "--total-steps", "256", says="is not a checkpoint this code wrote (it lacks torch_rng")


@pytest.mark.parametrize("name, args", [("collect", ("--pairs", "2")), ("train_policy", ("--total-steps", "256"))])
def test_a_reward_model_of_another_env(run, name, args):
    """A well-formed reward_model.pt of an env with 11 observations (Hopper's), copied into a HalfCheetah run."""
    import torch
    model = C.build_reward_ensemble(11)
    C.save_torch_atomic(os.path.join(run, C.REWARD_MODEL), {
        "model": model.state_dict(), "members": 3, "hidden": 64, "layers": 2, "in_dim": 11, "inputs": "obs",
        "reward_state": "before", "l2": [0.01] * 3, "labels": 6, "format_version": C.FORMAT_VERSION})
    assert torch.equal(C.load_reward_model(run).in_mean, model.in_mean)  # readable, only not for this env
    refused(run, name, *args, says=(C.REWARD_MODEL, "expects 11 inputs, but HalfCheetah-v5 gives it 17 (obs)"))


def test_the_loop_on_a_corrupt_checkpoint(run):
    C.log_metrics(run, "evaluate", policy="random", policy_step=0, episodes=1, true_return_mean=0.0,
                  true_return_std=0.0, clip=None)  # so that loop.sh goes straight to the policy's step
    truncate(os.path.join(run, C.POLICY))
    before = snapshot(run)
    env = {**os.environ, "RUN": run, "NUM_ENVS": "2", "CLIPS": "0", "PYTHON": PYTHON, "MUJOCO_GL": "egl"}
    result = subprocess.run(["bash", "loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [l for l in result.stderr.splitlines() if l.startswith("error:")] == [
        f"error: policy checkpoint {run}/policy.pt is corrupt or truncated (BadZipFile); delete it to start that "
        f"stage afresh, or restore it from a backup"]
    assert snapshot(run) == before


@pytest.mark.parametrize("name, args", [("train_reward", ()), ("train_policy", ()), ("collect", ("--pairs", "2"))])
def test_a_reward_model_of_another_envs_run(run, name, args):
    """train_reward.py refits a model of other flags afresh, but took one of another env's run for that too and
    wrote over it; every stage that reads the model refuses it."""
    import train_reward
    model = C.build_reward_ensemble(11, inputs="obs")  # Hopper's observation: HalfCheetah's has 17 numbers
    train_reward.save_model(os.path.join(run, C.REWARD_MODEL), model, [1e-2] * 3, [])
    refused(run, name, *args, says="reward_model.pt expects 11 inputs, but HalfCheetah-v5 gives it 17 (obs); it is "
                                   "from another env's run")


def test_a_checkpoint_of_another_kind(run):
    shutil.copy(os.path.join(run, C.POLICY), os.path.join(run, C.REWARD_MODEL))
    refused(run, "train_reward", says="is not a checkpoint this code wrote (it lacks members")


# ------------------------------------------------------------------------------------------ labels

@pytest.mark.parametrize("name", ["train_reward", "teach", "collect"])
def test_a_label_that_names_an_unknown_query(run, name):
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 99, "choice": "left", "labeler": "ann", "time": 1.0})
    number = len(lines(os.path.join(run, C.LABELS))) - 1
    refused(run, name, *(["--pairs", "2"] if name == "collect" else []),
            says=f"labels.jsonl line {number} answers query 99, which is not in queries.jsonl")


def test_collect_refuses_to_number_new_queries_over_the_answers_of_lost_ones(run):
    """With queries.jsonl gone, new queries would be numbered from 0 again, and the old answers to queries
    0, 1, ... would train the reward model as answers to the new pairs."""
    os.rename(os.path.join(run, C.QUERIES), os.path.join(run, "queries.jsonl.lost"))
    refused(run, "collect", "--pairs", "2", says="labels.jsonl line 1 answers query 0, which is not in queries.jsonl")


def test_the_web_labeler_refuses_labels_of_another_runs_queries(run):
    """serve tails labels.jsonl itself, but reads it once through contract at the start as the other stages
    do: a label of a query not in queries.jsonl is refused there, not silently dropped."""
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 99, "choice": "left", "labeler": "ann", "time": 1.0})
    before = snapshot(run)
    import socket
    with socket.socket() as free:  # were it not refused, it would serve here until label_py's timeout
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = label_py(run, "serve", "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "answers query 99, which is not in queries.jsonl" in errors[0], result.stderr
    assert snapshot(run) == before


def test_the_web_labeler_reports_a_malformed_label_line(run, capsys):
    with open(os.path.join(run, C.LABELS), "ab") as f:
        f.write(b'{"query_id": 0, "choice": "maybe", "labeler": "ann", "time": 1.0}\n')
    import label
    label.create_app(run)
    assert "was skipped (choice must be one of" in capsys.readouterr().err


def test_a_malformed_label_line_is_reported_skipped_and_the_rest_kept(run):
    path = os.path.join(run, C.LABELS)
    content = lines(path)
    content.insert(2, b'{"query_id": 3, "choice": "left", oops')
    content.insert(4, b"\xff\xfe not even UTF-8")
    with open(path, "wb") as f:
        f.write(b"\n".join(content))
    before = open(path, "rb").read()
    result = stage("train_reward", run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{path} line 3 is malformed and was skipped" in result.stderr
    assert f"{path} line 5 is malformed and was skipped" in result.stderr
    assert "Traceback" not in result.stderr
    assert C.read_jsonl(os.path.join(run, C.METRICS))[-1]["labels"] == 6  # all six good ones trained on
    assert open(path, "rb").read() == before  # a reader never rewrites


def test_a_malformed_query_line_is_reported_skipped_and_the_rest_kept(run):
    path = os.path.join(run, C.QUERIES)
    content = lines(path)
    content.insert(1, b'{"query_id": 77, "left": "zero"}')
    content.insert(3, b"garbage")
    with open(path, "wb") as f:
        f.write(b"\n".join(content))
    result = stage("teach", run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{path} line 2 was skipped: a query needs integer query_id, left and right" in result.stderr
    assert f"{path} line 4 is malformed and was skipped" in result.stderr
    assert len(C.read_labels(run)) == 10  # the four open queries answered as well


@pytest.mark.parametrize("labels", [None, b"", b'{"query_id": 0, "choice": "skip", "labeler": "a", "time": 1}\n'])
def test_no_labels_when_the_reward_trainer_starts(run, labels):
    os.remove(os.path.join(run, C.LABELS))
    os.remove(os.path.join(run, C.REWARD_MODEL))
    if labels is not None:
        with open(os.path.join(run, C.LABELS), "wb") as f:
            f.write(labels)
    refused(run, "train_reward", says="has no usable labels yet")


# --------------------------------------------------------------------------------- files that vanish

def test_a_segment_file_that_has_disappeared(run):
    first = os.path.join(run, C.SEGMENTS_DIR, "round_0000.npz")
    os.rename(first, first + ".away")  # the labelled queries are of round 0, the open ones of round 1
    refused(run, "train_reward", says="named by queries are missing from segments/")
    os.rename(first + ".away", first)
    os.remove(os.path.join(run, C.SEGMENTS_DIR, "round_0001.npz"))
    refused(run, "teach", says="named by queries are missing from segments/")
    os.remove(os.path.join(run, C.SEGMENTS_DIR, "round_0000.npz"))  # none left
    refused(run, "train_reward", says="has queries but no segment files")
    refused(run, "teach", says="has queries but no segment files")


def test_after_a_segment_file_disappeared_collect_never_reuses_its_ids(run):
    named = {s for q in C.read_queries(run).values() for s in (q["left"], q["right"])}
    os.remove(os.path.join(run, C.SEGMENTS_DIR, "round_0001.npz"))  # the newest one
    assert stage("collect", run, "--pairs", "2").returncode == 0
    new = C.load_segments(run)
    new_ids = set(new["ids"][new["round"] == new["round"].max()].tolist())
    assert new["round"].max() == 2 and not new_ids & named


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("clips") / "run")
    result = subprocess.run([PYTHON, "collect.py", "--run", run, "--env", "HalfCheetah-v5", "--pairs", "2",
                             "--num-envs", "2", "--clip-size", "32"], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    return run


def test_a_clip_that_has_disappeared_is_not_shown_and_nothing_breaks(clip_run, tmp_path):
    import label
    if not callable(getattr(label, "create_app", None)):
        pytest.skip("label.py has no create_app(run_dir, ...) yet")
    run = copy_run(clip_run, tmp_path)
    queries = C.read_queries(run)
    gone = queries[0]["left_clip"]
    os.remove(os.path.join(run, gone))
    client = label.create_app(run).test_client()
    shown = []
    for labeler in ("ann", "bob", "cid"):
        response = client.get(f"/api/next?labeler={labeler}")
        assert response.status_code == 200
        if response.json["pair"]:
            shown.append(response.json["pair"]["query_id"])
    assert shown == [1]  # only the pair whose clips are both there
    assert client.get("/" + gone).status_code == 404
    status = client.get("/api/status?labeler=ann")
    assert status.status_code == 200 and status.json["without_clips"] == 1


# --------------------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("name, args, fault", [
    ("teach", (), "enospc:labels.jsonl"),
    ("train_reward", (), "enospc:reward_model.pt"),
    ("train_policy", ("--total-steps", "256"), "enospc:policy.pt"),
    ("collect", ("--pairs", "2"), "enospc:round_0002.npz"),
])
def test_a_full_disk_while_writing_leaves_the_previous_file_intact(run, name, args, fault):
    """The hook writes half the file and then fails as a full disk does; the temp file is removed, the old
    artifact (or the append-only file as it was) stays, byte for byte."""
    refused(run, name, *args, fault=fault, code=1, says=("the disk is full (writing ", fault.split(":")[1],
                                                         "the files written before are intact"))


def test_a_full_disk_in_process_keeps_the_old_artifact(tmp_path, monkeypatch):
    """The same without the hook: os.write itself fails, as on a full disk."""
    path = str(tmp_path / C.REWARD_MODEL)
    C.write_atomic(path, b"the old checkpoint")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as raised:
        C.write_atomic(path, b"a new checkpoint" * 1000)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
    assert open(path, "rb").read() == b"the old checkpoint" and os.listdir(tmp_path) == [C.REWARD_MODEL]

    def main():
        raise raised.value
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as exit_:
        C.run_main(main)
    assert exit_.value.code == 1
    assert err.getvalue() == (f"error: the disk is full (writing {path}); free some space and run again: "
                              f"the files written before are intact\n")


# ---------------------------------------------------------------------------------- env keyword arguments

def test_env_kwargs_the_env_does_not_accept(tmp_path):
    run = str(tmp_path / "new")
    refused(run, "collect", "--env", "HalfCheetah-v5", "--pairs", "2", "--env-kwargs",
            '{"terminate_when_unhealthy": true}', says="environment 'HalfCheetah-v5' does not accept these arguments")
    assert not os.path.exists(run)


@pytest.mark.parametrize("kwargs, says", [
    ('{"ctrl_cost_weight": "0.1"}',
     'HalfCheetah-v5 with env kwargs {"ctrl_cost_weight": "0.1"} fails on its first step'),
    ('{"frame_skip": 0}', "environment 'HalfCheetah-v5' does not accept these arguments"),
    ('{"xml_file": "nope.xml"}', ("does not accept these arguments (OSError: File ", "nope.xml does not exist); "
                                                                                    "fix --env-kwargs")),
])
def test_env_kwargs_that_gym_make_takes_but_the_env_cannot_use(tmp_path, kwargs, says):
    """A string where a number belongs passes gym.make and fails only when the env steps: refused when the run
    is created, or config.json would hold it and every stage after would fail on it."""
    run = str(tmp_path / "new")
    refused(run, "collect", "--env", "HalfCheetah-v5", "--pairs", "2", "--env-kwargs", kwargs, says=says)
    assert not os.path.exists(run)


@pytest.mark.parametrize("name, args", [("collect", ("--pairs", "2")), ("train_policy", ("--reward", "true"))])
def test_a_run_made_with_other_env_kwargs(run, name, args):
    made_with = json.dumps(C.read_config(run)["env_kwargs"])
    refused(run, name, "--env-kwargs", '{"reset_noise_scale": 0.5}', *args,
            says=f'{run} was created with env kwargs {made_with}, not {{"reset_noise_scale": 0.5}}')


@pytest.mark.parametrize("env_id, weight", [("HalfCheetah-v5", "1.0"), ("Hopper-v5", '"high"')])
def test_a_height_reward_where_there_is_none(tmp_path, env_id, weight):
    run = str(tmp_path / "new")
    refused(run, "collect", "--env", env_id, "--pairs", "2", "--env-kwargs", '{"height_reward_weight": %s}' % weight,
            says=f"height_reward_weight must be a number and is for Hopper and Walker2d only, not {env_id} with")
    assert not os.path.exists(run)


@pytest.mark.parametrize("text", ["{bad json", "[1, 2]", "3"])
def test_env_kwargs_that_are_not_a_json_object(tmp_path, text):
    run = str(tmp_path / "new")
    result = stage("train_policy", run, "--env", "Hopper-v5", "--reward", "true", "--env-kwargs", text)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --env-kwargs" in result.stderr and "is not a JSON object" in result.stderr
    assert not os.path.exists(run)


def test_overlap_with_async_envs(run):
    refused(run, "train_policy", "--reward", "true", "--overlap", "--async-envs",
            says="--overlap and --async-envs do not combine")


def test_reward_state_with_the_true_reward(run):
    refused(run, "train_policy", "--reward", "true", "--reward-state", "after",
            says="--reward-state is about the learned reward")


def test_reward_state_after_with_a_model_that_sees_the_action(run):
    assert C.load_reward_model(run).inputs == "obs"
    path = os.path.join(run, C.REWARD_MODEL)
    checkpoint = C.load_torch(path, "reward model")
    model = C.build_reward_ensemble(23, inputs="obs+act")
    C.save_torch_atomic(path, {**checkpoint, "model": model.state_dict(), "in_dim": 23, "inputs": "obs+act"})
    refused(run, "train_policy", "--total-steps", "256", "--reward-state", "after",
            says="--reward-state after needs a model of the observation alone")


@pytest.mark.parametrize("flags", [("--num-minibatches", "0"), ("--num-minibatches", "5000"),
                                   ("--num-minibatches", "65"), ("--num-steps", "0"),
                                   ("--save-every", "0"), ("--num-envs", "0"), ("--threads", "0"),
                                   ("--lr", "-1"), ("--init-log-std", "nan"), ("--init-log-std", "50"),
                                   ("--snapshot-steps", "0"), ("--lr", "inf"), ("--lr", "1e308"), ("--ent-coef", "inf"),
                                   ("--vf-coef", "inf"), ("--explore-coef", "inf"), ("--target-kl", "inf")])
def test_out_of_range_policy_flags(run, flags):
    """One sentence before anything is written, not a ZeroDivisionError half-way (5000 minibatches of the
    tiny stage's batch of 2 envs x 64 steps = 128 rows would each be empty; 65 would leave minibatches of one
    row, whose advantage std is nan)."""
    flag_refused(run, lambda: stage("train_policy", run, "--total-steps", "256", *flags),
                 f"argument {flags[0]}: value out of range")


def test_a_policy_of_the_learned_reward_does_not_go_on_with_the_true_one(run):
    """The run's policy.pt was trained on the learned reward: going on with --reward true would mix the two
    and label the result as trained on the true reward alone."""
    refused(run, "train_policy", "--reward", "true", "--total-steps", "256",
            says="policy.pt was trained on the learned reward, not the true one; go on with --reward learned")


def test_negative_anneal_steps(run):
    refused(run, "train_policy", "--reward", "true", "--anneal-steps", "-5",
            says="--anneal-steps must be 0 (constant learning rate) or positive, not -5")


@pytest.mark.parametrize("name, flags", [
    ("train_policy", ("--reward", "true", "--seed", "-1")),
    ("train_reward", ("--seed", "-1")),
    ("train_reward", ("--epochs", "inf")),
    ("train_reward", ("--lr", "inf")),
    ("train_reward", ("--lr", "1e308")),
    ("train_reward", ("--l2-range", "0", "inf")),
    ("train_reward", ("--l2", "inf")),
    ("teach", ("--mistake", "2")),
    ("teach", ("--gamma", "nan")),
    ("teach", ("--beta", "-1")),
    ("teach", ("--skip", "-0.5")),
    ("teach", ("--equal", "inf")),
])
def test_out_of_range_flags_of_the_other_stages(run, name, flags):
    """A teacher's flags out of range would write wrong answers into labels.jsonl, which is never rewritten;
    a negative seed would be a traceback from gymnasium or numpy after config.json was written."""
    flag = [f for f in flags if f.startswith("--")][-1]
    flag_refused(run, lambda: stage(name, run, *flags), f"argument {flag}: value out of range")


@pytest.mark.parametrize("function, says", [
    ("return np.full(len(segment['rewards']), np.nan)", "gave 30 scores that are not finite (nan or inf)"),
    ("return float(segment['rewards'].sum())", "must return one score per step of a segment, an array of shape "
                                               "(30,), not of shape ()"),
    ("return segment['rewards'][:-1]", "not of shape (29,)"),
    ("return segment['qvel'][:, 50]", "failed on a segment of HalfCheetah-v5 (IndexError: index 50 is out of"),
])
def test_a_behaviour_that_gives_no_score_per_step(run, tmp_path, monkeypatch, function, says):
    """A user's behaviour that returns nan answered every pair 'right' and wrote a margin of NaN into
    labels.jsonl; one that returns a number, or fails on this env's segments, was a traceback."""
    (tmp_path / "my_behaviours.py").write_text(f"import numpy as np\ndef judge(segment):\n    {function}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    refused(run, "teach", "--behaviour", "my_behaviours:judge", says=("behaviour 'my_behaviours:judge' ", says))


def test_a_built_in_behaviour_of_another_env(run):
    """hopper_backflip reads qvel[2] and qpos[1], which on HalfCheetah are other joints: it taught something no one
    asked for."""
    refused(run, "teach", "--behaviour", "hopper_backflip", says="behaviour 'hopper_backflip' is for Hopper, not "
                                                                 "HalfCheetah-v5")


@pytest.mark.parametrize("behaviour", [":x", ".x:y"])
def test_a_behaviour_that_is_not_a_module_path(run, behaviour):
    refused(run, "teach", "--behaviour", behaviour, says=f"cannot load behaviour {behaviour!r}")


def label_py(run, *args):
    return subprocess.run([PYTHON, "label.py", args[0], "--run", run, *args[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [("wait", "--interval", "-1"), ("wait", "--interval", "nan"),
                                  ("serve", "--port", "70000")])
def test_out_of_range_labeler_flags(run, args):
    flag_refused(run, lambda: label_py(run, *args), f"argument {args[1]}: value out of range")


@pytest.mark.parametrize("flags", [("--decay-steps", "inf"), ("--segment-seconds", "inf"),
                                   ("--clip-seconds", "inf"), ("--clip-fps", "nan")])
def test_collect_flags_that_are_not_finite(run, flags):
    """inf passed "at least" and was a ZeroDivisionError or OverflowError later (for --clip-seconds, after
    the evaluation episodes had run)."""
    flag_refused(run, lambda: stage("collect", run, "--pairs", "2", *flags),
                 f"argument {flags[0]}: must be a finite number")


def test_a_clip_larger_than_mujocos_offscreen_buffer(run):
    """--clip-size 20000 was mujoco's FatalError traceback after the evaluation episodes had run."""
    flag_refused(run, lambda: stage("collect", run, "--evaluate", "1", "--clip-size", "20000"),
                 "argument --clip-size: must be at most 4096, not 20000")


def test_a_hold_that_is_not_a_number(run):
    """A nan hold never expires (nothing is <= nan): a pair shown once would be hidden from everyone else."""
    flag_refused(run, lambda: label_py(run, "serve", "--hold", "nan"), "--hold positive")


def test_serving_on_a_port_in_use(run):
    """One sentence and status 2 as everywhere else, not werkzeug's own lines and status 1."""
    import socket
    before = snapshot(run)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = label_py(run, "serve", "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0], result.stderr
    assert "labeling page" not in result.stdout  # no address is announced that nobody serves
    assert snapshot(run) == before


def test_collect_without_a_label_budget_creates_nothing(tmp_path):
    run = str(tmp_path / "new")
    result = stage("collect", run, "--env", "HalfCheetah-v5")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "give either --pairs N or both --label-budget and --schedule-steps" in result.stderr
    assert not os.path.exists(run)


def test_the_learned_reward_cannot_start_a_run(tmp_path):
    run = str(tmp_path / "new")
    refused(run, "train_policy", "--env", "Hopper-v5", says=f"{run} is not a run directory (no config.json)")
    assert not os.path.exists(run)


# ------------------------------------------------------------------------------------------ loop.sh

@pytest.mark.parametrize("variables, says", [
    ({"TEACHER": "Human"}, "TEACHER must be oracle, synthetic or human, not 'Human'"),
    ({"CLIPS": "2"}, "CLIPS must be auto, 1 or 0, not '2'"),
    ({"TEACHER": "human", "CLIPS": "0"}, "TEACHER=human needs clips to show people"),
    ({"EVAL_EPISODES": "0"}, "EVAL_EPISODES must be a whole number of at least 1, not '0'"),
    ({"TEACHER_FLAGS": "--mistake 1"}, "TEACHER_FLAGS are for TEACHER=synthetic; TEACHER=oracle would ignore"),
    ({"TOTAL_STEPS": "0"}, "TOTAL_STEPS must be a whole number of at least 1, not '0'"),
    ({"TOTAL_STEPS": "1e6"}, "TOTAL_STEPS must be a whole number of at least 1, not '1e6'"),
    ({"STEPS_PER_ROUND": "0"}, "STEPS_PER_ROUND must be a whole number of at least 1, not '0'"),
    ({"LABEL_STEPS": "2.5e5"}, "LABEL_STEPS must be a whole number of at least 1, not '2.5e5'"),
    ({"LABELS": "0"}, "LABELS must be a whole number of at least 1, not '0'"),
    ({"NUM_ENVS": "08"}, "NUM_ENVS must be a whole number of at least 1, not '08'"),
    ({"SEED": "-1"}, "SEED must be a whole number of at least 0, not '-1'"),
    ({"PRETRAIN_FRACTION": "0"}, "PRETRAIN_FRACTION must be a number above 0 and at most 1, not '0'"),
    ({"PRETRAIN_FRACTION": "1.5"}, "PRETRAIN_FRACTION must be a number above 0 and at most 1, not '1.5'"),
    ({"LABELS": "8", "PRETRAIN_FRACTION": "0.05"}, "PRETRAIN_FRACTION=0.05 of LABELS=8 is no pair to fit the first"),
    ({"ENT_ANNEAL": "yes"}, "ENT_ANNEAL must be 1 or 0, not 'yes'"),
])
def test_loop_variables_it_cannot_use(tmp_path, variables, says):
    """Refused before any stage runs: an unknown TEACHER fell through to the oracle, people without clips
    waited forever, EVAL_EPISODES=0 failed in collect.py with a sentence about --pairs, TEACHER_FLAGS were
    dropped without a word under the oracle, a number bash cannot compute with was a bash error after the
    random policy's evaluation (TOTAL_STEPS=0 ran a round -1, then a traceback), and a round 0 that asks no pair
    ended in train_reward.py's advice to run label.py, which the loop had just run."""
    run = str(tmp_path / "new")
    result = subprocess.run(["bash", "loop.sh"], cwd=ROOT, env={**os.environ, "RUN": run, **variables},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {says}"), result.stderr
    assert not os.path.exists(run)


@pytest.mark.slow
def test_loop_finds_a_behaviour_where_it_was_started(tmp_path):
    """label.py teach --behaviour module:function finds the module in the working directory; loop.sh, which runs
    the stages from the repository, found it only there and failed after its first collect."""
    (tmp_path / "my_judge.py").write_text("def backwards(segment):\n    return -segment['qvel'][:, 0]\n")
    variables = {"RUN": "run", "ENV_ID": "HalfCheetah-v5", "LABELS": "4", "TOTAL_STEPS": "128",
                 "STEPS_PER_ROUND": "128", "NUM_ENVS": "1", "EVAL_EPISODES": "1", "REWARD_STEPS": "5", "CLIPS": "0",
                 "TEACHER": "synthetic", "TEACHER_FLAGS": "--behaviour my_judge:backwards", "PYTHON": PYTHON,
                 "POLICY_FLAGS": "--num-steps 64 --num-minibatches 2 --no-plot"}
    result = subprocess.run(["bash", os.path.join(ROOT, "loop.sh")], cwd=tmp_path, env={**os.environ, **variables},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = C.read_labels(str(tmp_path / "run"))
    assert len(labels) == 4 and {x["teacher"]["behaviour"] for x in labels} == {"my_judge:backwards"}


def test_loop_keeps_a_relative_run_directory_where_it_was_started(tmp_path):
    """loop.sh runs the stages from the repository; RUN=rel from elsewhere must still mean ./rel, as it does
    for `label.py serve --run rel` started there."""
    result = subprocess.run(["bash", os.path.join(ROOT, "loop.sh")], cwd=tmp_path,
                            env={**os.environ, "RUN": "rel", "ENV_ID": "Nope-v0"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "unknown or unavailable environment id 'Nope-v0'" in result.stderr
    assert f"--run {tmp_path}/rel " in result.stderr, result.stderr
