"""The data contract shared by the four stages: run directory layout, file formats, the environment
factory and the two networks whose weights travel between stages in files (and the Adam both trainers fit them
with).

Every stage imports this module; no stage imports another stage. Everything a stage writes goes through
`write_atomic` (temp file + rename) or `append_jsonl` (whole lines, flushed and fsynced), so a reader never
sees half a file. README.md documents every file and field listed here, and says what survives a crash
("After a crash").
"""
import contextlib
import errno
import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import time
import zipfile

import numpy as np

FORMAT_VERSION = 1

# File names inside data/<run>/ (README.md, "The data contract").
CONFIG = "config.json"
SEGMENTS_DIR = "segments"  # segments/round_RRRR.npz, one file per collect call
CLIPS_DIR = "clips"  # clips/<segment_id>.mp4, and policy_step<N>.mp4 clips of the agent
QUERIES = "queries.jsonl"
LABELS = "labels.jsonl"
REWARD_MODEL = "reward_model.pt"
POLICY = "policy.pt"
SNAPSHOTS_DIR = "snapshots"  # policy_step<N>.pt: policy.pt at step N, kept by train_policy.py --snapshot-steps
METRICS = "metrics.jsonl"
LEARNING_CURVE = "learning_curve.png"

CHOICES = ("left", "right", "equal", "skip")

# The tasks as the paper posed them (its appendix, and rl-teacher's envs.py, the code its experiments ran on).
# - A fixed horizon: early termination leaks reward information (an agent rewarded for anything learns to stay
#   alive when falling over ends the episode), so every episode lasts its 1000 steps.
# - No torque penalty in the reward: torques do not show in a clip, so a person, or a synthetic teacher standing
#   in for one, cannot judge them, and the true reward should not count them either ("humans cannot see torque
#   penalties", rl-teacher).
# - Where the original ended the episode when the body fell, a reward the agent must learn instead: Hopper's
#   reward is its forward velocity plus its torso's height (rl-teacher's NeverDone bonus; gymnasium's healthy
#   reward of 1 per upright step, which a fallen agent forgoes all at once, is off).
# HalfCheetah and Hopper, the paper benchmark's envs, follow the paper this far; the others only get the fixed
# horizon. "height_reward_weight" is ours, not gym.make's: make_env adds that times the torso height qpos[1].
TASK_KWARGS = {
    "HalfCheetah": {"ctrl_cost_weight": 0.0},
    "Hopper": {"terminate_when_unhealthy": False, "healthy_reward": 0.0, "ctrl_cost_weight": 0.0,
               "height_reward_weight": 1.0},
    "Walker2d": {"terminate_when_unhealthy": False},
    "Ant": {"terminate_when_unhealthy": False},
    "Humanoid": {"terminate_when_unhealthy": False},
}
HEIGHT_REWARD_ENVS = ("Hopper", "Walker2d")  # planar bodies whose qpos[1] is the torso's height


class UserError(Exception):
    """A mistake the user can fix (bad flag, wrong run directory, malformed file). Stages print its message
    as one sentence and exit with status 2 instead of showing a traceback."""


def run_main(main):
    """Run a stage's main(): a UserError becomes one sentence and exit status 2, an OSError (a full disk, a
    file that vanished, no permission) one sentence and exit status 1, instead of a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def describe_os_error(e):
    """One sentence for an OSError, naming the file when it is known."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full (writing{where or ' a file'}); free some space and run again: the files "
                f"written before are intact")
    return (f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)).replace("\n", " ")


# ---------------------------------------------------------------------------------------------- files

_fault_counts = {}


def _write_all(fd, data, name):
    """os.write all of data to fd. Returns (bytes written, None) or, when the disk fills up or the write
    fails, (bytes written before that, the OSError): the kernel reports a full disk as a short write.

    Test hook, for tests/test_faults.py and tests/test_bad_input.py only: RLHF_FAULT="kill:NAME[:N]" makes
    the Nth (default first) write of a file whose final name is NAME write half its bytes (never ending just
    after a newline: mid-line) and then SIGKILL this process, as a crash mid-write would; "enospc:NAME[:N]"
    writes as much and then fails as a full disk does."""
    fault = os.environ.get("RLHF_FAULT")
    if fault:
        action, _, target = fault.partition(":")
        target, _, nth = target.partition(":")
        if target == name:
            _fault_counts[name] = _fault_counts.get(name, 0) + 1
            if _fault_counts[name] == int(nth or 1):
                cut = len(data) // 2
                cut += data[cut - 1:cut] == b"\n"
                half = os.write(fd, data[:cut])
                os.fsync(fd)
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                return half, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    view, written = memoryview(data), 0
    while written < len(data):
        try:
            n = os.write(fd, view[written:])
        except OSError as e:
            return written, e
        if n == 0:
            return written, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += n
    return written, None


def write_atomic(path, data: bytes):
    """Write bytes to path via a temp file in the same directory and a rename: readers see the old file or
    the new one, never half of one. On failure (e.g. a full disk) the old file stays intact and the temp file
    is removed; a SIGKILL leaves a .tmp-* file, which no reader looks at (open_run removes old ones)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide artifacts from other users of the run
        _, error = _write_all(fd, data, os.path.basename(path))
        if error is None:
            os.fsync(fd)
        os.close(fd)
        fd = None
        if error is not None:
            raise OSError(error.errno, error.strerror, path)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Make a rename durable across a power cut (a SIGKILL needs no fsync at all); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def exclusive(run_dir):
    """Hold an flock on the run directory itself (so no lock file is left behind) while writing what only one
    process at a time may write: two collect.py at once would give their rounds, segments and queries the same
    numbers, two teachers would answer the same queries twice. The kernel drops the lock when its process
    dies, so a SIGKILL never leaves the run locked. Not blocking: the second process is refused."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing queries or labels to {run_dir} right now (collect.py or "
                            f"label.py teach, perhaps left running by a killed loop.sh); wait for it to finish")
        except OSError:
            pass  # a filesystem without flock (some network ones): go on unlocked, as before
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def labels_locked(run_dir):
    """Hold a (blocking) flock on labels.jsonl: whoever decides which pairs still need an answer and then
    appends answers (the web labeler, label.py teach) does both under it, so that no pair gets an answer
    from each while neither saw the other's."""
    fd = os.open(os.path.join(run_dir, LABELS), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def write_json_atomic(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch_atomic(path, obj):
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


# Keys each checkpoint of the contract must have (README.md): a file that lacks them is not ours.
CHECKPOINT_KEYS = {
    "reward_model.pt": ("model", "members", "hidden", "layers", "in_dim", "l2", "format_version"),
    "policy.pt": ("model", "optimizer", "obs_rms", "return_rms", "global_step", "hidden", "torch_rng",
                  "format_version"),
}


def load_torch(path, what, kind=None):
    """Load a checkpoint written by save_torch_atomic. A missing, truncated, corrupt (bad CRC: torch itself
    does not check it) or foreign file, or one of another format version, is a UserError. kind: the contract's
    name of the file (POLICY, REWARD_MODEL) whose keys it must have, where its own name differs (a snapshot)."""
    import torch
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    advice = "delete it to start that stage afresh, or restore it from a backup"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # the CRC of every member: catches flipped bytes torch.load would take
        if bad is not None:
            raise ValueError(f"bad checksum in {bad}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{what} {path} disappeared while it was being read")
    except Exception as e:
        raise UserError(f"{what} {path} is corrupt or truncated ({type(e).__name__}); {advice}")
    keys = CHECKPOINT_KEYS.get(kind or os.path.basename(path), ())
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{what} {path} is not a checkpoint this code wrote (it lacks {', '.join(missing)}); "
                        f"{advice}")
    if keys and checkpoint["format_version"] != FORMAT_VERSION:
        raise UserError(f"{what} {path} has data format version {checkpoint['format_version']}, this code reads "
                        f"version {FORMAT_VERSION}; start a new run directory")
    return checkpoint


def append_jsonl(path, records):
    """Append whole JSON lines and fsync, so a crash loses at most the line being written (which readers
    skip as torn) and never an earlier one. One write() per call: O_APPEND makes concurrent writers of whole
    lines safe on a local filesystem. On a full disk the part written is cut off again, the file is as it
    was, and the OSError (ENOSPC) propagates."""
    if isinstance(records, dict):
        records = [records]
    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A previous crash may have left a torn last line without "\n"; start on a fresh line so this
        # record is not glued onto it.
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written, error = _write_all(fd, data, os.path.basename(path))
        if error is not None:
            end = os.lseek(fd, 0, os.SEEK_CUR)  # with O_APPEND: just after the bytes we wrote
            if written and os.fstat(fd).st_size == end:  # nobody appended after us: take our part back
                os.ftruncate(fd, end - written)
            raise OSError(error.errno, error.strerror, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path, warn=True):
    """Read a JSON-lines file. Returns a list of dicts. Malformed lines (a torn last line after a crash, a
    hand edit gone wrong) are skipped and reported with their line number; the rest is kept."""
    return [record for _, record in read_jsonl_numbered(path, warn)]


def read_jsonl_numbered(path, warn=True):
    """As read_jsonl, but a list of (line number, record): so that later checks can name the line."""
    records = []
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return records
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nesting
            if warn:
                torn = (" (the last line, cut short: a crash or a write in progress)" if number == len(lines)
                        else "")
                print(f"warning: {path} line {number} is malformed{torn} and was skipped ({str(e)[:100]})",
                      file=sys.stderr)
            continue
        records.append((number, record))
    return records


def log_metrics(run_dir, stage, **figures):
    """Append one line of figures to metrics.jsonl, tagged with the stage and the wall-clock time."""
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()}
    append_jsonl(os.path.join(run_dir, METRICS), {"stage": stage, "time": round(time.time(), 3), **clean})


# ------------------------------------------------------------------------------------- run and config

def plot_learning_curve(run_dir):
    """Redraw learning_curve.png from metrics.jsonl: true and learned episode returns against env steps, and the
    evaluations (train_policy.py draws it after training, collect.py --evaluate redraws one that is there)."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = read_jsonl(os.path.join(run_dir, METRICS), warn=False)
    rows = [m for m in metrics if m.get("stage") == "train_policy" and "true_return" in m]
    if not rows:
        return None
    steps = np.array([m["step"] for m in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, colour in (("true_return", "tab:blue"), ("learned_return", "tab:orange")):
        values = np.array([np.nan if m.get(key) is None else m[key] for m in rows], float)
        if np.all(np.isnan(values)):
            continue
        ax.plot(steps, values, ".", color=colour, alpha=0.25, markersize=3)
        window = max(1, len(values) // 20)
        smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=colour, label=key.replace("_", " "))
    evals = [m for m in metrics if m.get("stage") == "evaluate"]
    if evals:
        ax.plot([m["policy_step"] for m in evals], [m["true_return_mean"] for m in evals], "k^",
                label="evaluation (true)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, LEARNING_CURVE)
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def make_env(env_id, env_kwargs=None, render_size=None):
    """The one environment factory: same env, same kwargs, in every stage. render_size gives an offscreen
    renderer of that many pixels square (MUJOCO_GL=egl, shadows off: they cost ~5x and show nothing).
    env_kwargs go to gym.make, except "height_reward_weight" (see TASK_KWARGS)."""
    import gymnasium as gym
    kwargs = dict(env_kwargs or {})
    height_weight = kwargs.pop("height_reward_weight", None)
    if height_weight is not None and (env_id.split("-")[0] not in HEIGHT_REWARD_ENVS
                                      or not isinstance(height_weight, (int, float)) or isinstance(height_weight, bool)):
        raise UserError(f"height_reward_weight must be a number and is for {' and '.join(HEIGHT_REWARD_ENVS)} "
                        f"only, not {env_id} with {height_weight!r}")
    if render_size:
        os.environ.setdefault("MUJOCO_GL", "egl")
        kwargs.update(render_mode="rgb_array", width=render_size, height=render_size)
    try:
        env = gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as e:  # ImportError: an id of the form module:Name-v0
        reason = " ".join(str(e).split()).rstrip(".").replace(". ", "; ")
        raise UserError(f"unknown or unavailable environment id {env_id!r} ({reason})")
    except (TypeError, ValueError, ArithmeticError, OSError) as e:  # {"frame_skip": 0}, {"xml_file": "nope"}
        raise UserError(f"environment {env_id!r} does not accept these arguments ({type(e).__name__}: {e}); fix "
                        f"--env-kwargs")
    return _height_reward(env, height_weight) if height_weight else env


def _height_reward(env, weight):
    """env with weight * torso height (qpos[1] after the step, as rl-teacher's bonus) added to its reward, and
    reported as info["reward_height"] beside the env's own reward terms."""
    import gymnasium as gym

    class HeightReward(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            height = weight * float(self.env.unwrapped.data.qpos[1])
            return obs, reward + height, terminated, truncated, {**info, "reward_height": height}

    return HeightReward(env)


def default_env_kwargs(env_id):
    return dict(TASK_KWARGS.get(env_id.split("-")[0], {}))


# How much of the agent one segment shows, in seconds of simulated time. The paper's clips were 1.5 s of video
# at a frame rate of its own per env (rl-teacher's envs.py), one env step per frame: HalfCheetah's 20 frames/s
# is real time (30 steps), but Hopper's 40 frames/s showed 60 steps of 8 ms, i.e. 0.48 s of motion slowed down
# about 3x. With 1.5 s of Hopper motion (188 steps) the agents climbed at half the rate of PPO on the true
# reward in the first 200k steps; with the paper's 60 steps most seeds keep up, and a run takes half the time
# (BENCHMARKS.md, "Hopper with the paper's 60-step segments"). collect.py slows short segments down the same
# way when it renders them for people.
DEFAULT_SEGMENT_SECONDS = 1.5
SEGMENT_SECONDS = {"Hopper": 0.48}


def default_segment_seconds(env_id):
    return SEGMENT_SECONDS.get(env_id.split("-")[0], DEFAULT_SEGMENT_SECONDS)


def env_kwargs_flag(text):
    """argparse type of --env-kwargs: a JSON object of keyword arguments for gym.make, e.g.
    '{"terminate_when_unhealthy": true}' to train on the original, terminating Hopper."""
    import argparse
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"key\": value}}'")
    return value


# The fields of config.json every stage relies on, with their types (others are checked where they are used;
# test fixtures write only these).
CONFIG_FIELDS = {"format_version": int, "env_id": str, "env_kwargs": dict, "seed": int, "dt": (int, float),
                 "segment_steps": int, "obs_shape": list, "act_shape": list, "nq": int, "nv": int}
STALE_TEMP_SECONDS = 3600


def read_config(run_dir):
    """The run's config.json, checked; None if there is none. Refuses, in one sentence, a file that is not
    JSON, not ours, or of another format version."""
    path = os.path.join(run_dir, CONFIG)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is a file, not a run directory; pick another --run")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:100]}); restore it or start a new run directory")
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object; restore it or start a new run directory")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{run_dir} was made with data format version {config.get('format_version')}, "
                        f"this code reads version {FORMAT_VERSION}; start a new run directory")
    for key, kind in CONFIG_FIELDS.items():
        value = config.get(key)
        if (not isinstance(value, kind) or isinstance(value, bool)
                or key in ("obs_shape", "act_shape") and not (len(value) == 1 and type(value[0]) is int
                                                              and value[0] >= 1)
                or key in ("dt", "segment_steps", "nq", "nv") and not value > 0 or key == "seed" and value < 0):
            raise UserError(f"{path} lacks a valid {key!r}, so it was not written by this code or was edited; "
                            f"restore it or start a new run directory")
    return config


def remove_stale_temp_files(run_dir):
    """A process killed mid-write leaves its .tmp-* file behind. No reader ever looks at one, so they are
    harmless; those older than an hour are removed (a younger one may belong to a stage writing right now)."""
    now = time.time()
    for directory in (run_dir, *(os.path.join(run_dir, d) for d in (SEGMENTS_DIR, CLIPS_DIR, SNAPSHOTS_DIR))):
        try:
            names = [n for n in os.listdir(directory) if n.startswith(".tmp-")]
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                if now - os.lstat(path).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(path)
            except OSError:
                pass


def open_run(run_dir, env_id=None, seed=None, segment_seconds=None, create=True, env_kwargs=None):
    """Return the run's config, creating data/<run>/ and config.json on first use.

    A stage that names an env (--env) must match the run's; a run of another format version is refused.
    env_kwargs (None: TASK_KWARGS), seed (None: 0) and segment_seconds (None: default_segment_seconds) are
    fixed when the run is created; other ones given later are refused, not ignored.
    Nothing is written before the env id has been checked, so a mistyped one leaves no directory behind."""
    path = os.path.join(run_dir, CONFIG)
    config = read_config(run_dir)
    if config is not None:
        if env_id is not None and env_id != config["env_id"]:
            raise UserError(f"{run_dir} is a run of {config['env_id']}, not {env_id}; pick another --run")
        if env_kwargs is not None and env_kwargs != config["env_kwargs"]:
            raise UserError(f"{run_dir} was created with env kwargs {json.dumps(config['env_kwargs'])}, not "
                            f"{json.dumps(env_kwargs)}; pick another --run")
        if seed is not None and seed != config["seed"]:
            raise UserError(f"{run_dir} was created with seed {config['seed']}, not {seed}; pick another --run, "
                            f"or leave the seed out to go on with this one")
        steps = None if segment_seconds is None else seconds_to_steps(segment_seconds, config["dt"])
        if steps is not None and steps != config["segment_steps"]:
            raise UserError(f"{run_dir} cuts segments of {config['segment_steps']} steps, not the {steps} of "
                            f"{segment_seconds:g} s; pick another --run, or leave the segment length out to go on "
                            f"with this one")
        remove_stale_temp_files(run_dir)
        return config
    if not create:
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG}); run collect.py first")
    if env_id is None:
        raise UserError(f"{run_dir} has no {CONFIG} yet; name the environment with --env")
    env_kwargs = default_env_kwargs(env_id) if env_kwargs is None else dict(env_kwargs)
    env = make_env(env_id, env_kwargs)
    try:
        check_env(env, env_id)
        # kwargs of the wrong type pass gym.make and fail on the first step; the run would be stuck with them
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except UserError:
        env.close()
        raise
    except Exception as e:
        env.close()
        raise UserError(f"{env_id} with env kwargs {json.dumps(env_kwargs)} fails on its first step "
                        f"({type(e).__name__}: {e}); fix --env-kwargs")
    dt = float(env.unwrapped.dt)
    if segment_seconds is None:
        segment_seconds = default_segment_seconds(env_id)
    segment_steps = seconds_to_steps(segment_seconds, dt)
    horizon = env.spec.max_episode_steps
    if horizon is not None and segment_steps > horizon:
        raise UserError(f"a {segment_seconds} s segment is {segment_steps} steps, longer than {env_id}'s "
                        f"{horizon}-step episodes; pass a shorter --segment-seconds")
    config = {
        "format_version": FORMAT_VERSION,
        "env_id": env_id,
        "env_kwargs": env_kwargs,
        "seed": 0 if seed is None else int(seed),
        "dt": dt,
        "segment_seconds": float(segment_seconds),
        "segment_steps": segment_steps,
        "obs_shape": list(env.observation_space.shape),
        "act_shape": list(env.action_space.shape),
        "nq": int(env.unwrapped.model.nq),
        "nv": int(env.unwrapped.model.nv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env.close()
    os.makedirs(os.path.join(run_dir, SEGMENTS_DIR), exist_ok=True)
    os.makedirs(os.path.join(run_dir, CLIPS_DIR), exist_ok=True)
    write_json_atomic(path, config)
    return config


def check_env(env, env_id):
    """Refuse an env this code cannot teach: it needs flat observations, continuous actions and MuJoCo's
    physics state (qpos/qvel) to re-render clips from."""
    import gymnasium as gym
    obs, act = env.observation_space, env.action_space
    if not (isinstance(act, gym.spaces.Box) and len(act.shape) == 1 and isinstance(obs, gym.spaces.Box)
            and len(obs.shape) == 1 and hasattr(env.unwrapped, "model") and hasattr(env.unwrapped, "set_state")):
        raise UserError(f"{env_id} is not a MuJoCo environment with flat observations and continuous actions, "
                        f"which this code needs (HalfCheetah-v5 or Hopper-v5, say)")


def seconds_to_steps(seconds, dt):
    return max(2, int(round(seconds / dt)))


# ------------------------------------------------------------------------------------------- segments

SEGMENT_FIELDS = ("ids", "obs", "acts", "rewards", "qpos", "qvel", "policy_step")
# Fields a segment file has when it was written after they were added: next_obs (2026-12-02) is needed only by
# a reward model of a step's two states (REWARD_INPUTS "obs+next").
OPTIONAL_SEGMENT_FIELDS = ("next_obs",)


def save_segments(run_dir, round_index, segments):
    """Write one collect call's segments to segments/round_RRRR.npz.

    segments: dict with ids (N,) int64, obs (N, T, obs_dim) float32, acts (N, T, act_dim) float32,
    rewards (N, T) float32 true env rewards, qpos (N, T, nq) and qvel (N, T, nv) float64 physics states to
    re-render from, policy_step (N,) int64 the policy checkpoint's env steps when collected; and, where
    given, next_obs (N, T, obs_dim) float32, the observation each step led to."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **{k: segments[k] for k in SEGMENT_FIELDS + OPTIONAL_SEGMENT_FIELDS if k in segments})
    write_atomic(os.path.join(run_dir, SEGMENTS_DIR, f"round_{round_index:04d}.npz"), buf.getvalue())


def segment_files(run_dir):
    """Paths of segments/round_RRRR.npz in round order (never the .tmp-* files of an interrupted write)."""
    directory = os.path.join(run_dir, SEGMENTS_DIR)
    if not os.path.isdir(directory):
        return []
    names = [f for f in os.listdir(directory) if f.startswith("round_") and f.endswith(".npz") and f[6:-4].isdigit()]
    return [os.path.join(directory, f) for f in sorted(names, key=lambda f: int(f[6:-4]))]


def segment_round(path):
    """The round (collect call) of segments/round_RRRR.npz."""
    return int(os.path.basename(path)[6:-4])


def _segment_shapes(config, n):
    """The shape each field of a segment file of n segments must have; None where config.json does not say
    (the dimensions of the first file are then those of the others)."""
    t = config["segment_steps"]
    obs, act = (config.get("obs_shape") or [None])[0], (config.get("act_shape") or [None])[0]
    return {"ids": (n,), "obs": (n, t, obs), "acts": (n, t, act), "rewards": (n, t),
            "qpos": (n, t, config.get("nq")), "qvel": (n, t, config.get("nv")), "policy_step": (n,),
            "next_obs": (n, t, obs)}


def load_segments(run_dir):
    """All segments of the run, concatenated in id order: dict of the SEGMENT_FIELDS arrays plus
    `round` (N,), the collect call each came from, and each OPTIONAL_SEGMENT_FIELDS array that every file
    has. A truncated, corrupt or foreign file, one whose arrays do not have the run's shapes, or a segment id
    in two files, is a UserError naming the file."""
    config = read_config(run_dir)
    parts, seen = [], {}
    for path in segment_files(run_dir):
        try:
            with np.load(path, allow_pickle=False) as npz:
                part = {k: npz[k] for k in SEGMENT_FIELDS}
                part.update({k: npz[k] for k in OPTIONAL_SEGMENT_FIELDS if k in npz.files})
        except FileNotFoundError:
            raise UserError(f"segment file {path} disappeared while it was being read; run the stage again")
        except Exception as e:
            raise UserError(f"segment file {path} is corrupt or truncated ({type(e).__name__}); restore it "
                            f"from a backup (the pairs that name its segments cannot be used without it)")
        if config is not None:
            for key, shape in _segment_shapes(config, len(part["ids"])).items():
                if key not in part:
                    continue
                got = part[key].shape
                if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                    raise UserError(f"segment file {path} does not fit this run ({key} has shape {got}, "
                                    f"expected {tuple('?' if s is None else s for s in shape)}); it belongs "
                                    f"to another run")
        for segment_id in part["ids"].tolist():
            if segment_id in seen:
                raise UserError(f"segment id {segment_id} is in both {seen[segment_id]} and {path}; one of "
                                f"them was copied from elsewhere")
            seen[segment_id] = path
        part["round"] = np.full(len(part["ids"]), segment_round(path), np.int64)
        parts.append(part)
    if not parts:
        return None
    try:
        segments = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}
    except ValueError as e:  # no config.json to check against, and the files disagree
        raise UserError(f"the segment files of {run_dir} have different shapes ({e})")
    order = np.argsort(segments["ids"], kind="stable")
    return {k: v[order] for k, v in segments.items()}


def load_queried_segments(run_dir, queries):
    """load_segments, checked to hold both sides of every query given (an iterable of query records), and the
    row of each segment id: (segments, {segment id: row}). No segment files, or a side missing from them, is
    a UserError: the pairs cannot be answered or learned from without the segments they show."""
    segments = load_segments(run_dir)
    if segments is None:
        raise UserError(f"{run_dir} has queries but no segment files in {SEGMENTS_DIR}/; they were deleted or "
                        f"never written (collect.py writes them)")
    index = {int(s): i for i, s in enumerate(segments["ids"])}
    missing = {s for q in queries for s in (q["left"], q["right"]) if s not in index}
    if missing:
        raise UserError(f"{len(missing)} segments named by queries are missing from {SEGMENTS_DIR}/ (one is "
                        f"{min(missing)}); restore their segment file from a backup")
    return segments, index


def next_round_and_segment_id(run_dir, queries=None):
    """Round index and first free segment id after everything already on disk or named by a query, so ids
    are never reused: not after a crash (a segment file is either wholly there or not at all) and not after
    someone deleted the last segment file (its ids live on in queries.jsonl and labels.jsonl)."""
    if queries is None:
        queries = read_queries(run_dir)
    last_round, max_id = -1, -1
    for q in queries.values():
        last_round = max(last_round, q["round"] if isinstance(q.get("round"), int) else -1)
        max_id = max(max_id, q["left"], q["right"])
    for path in segment_files(run_dir):
        last_round = max(last_round, segment_round(path))
        try:
            with np.load(path, allow_pickle=False) as npz:
                ids = npz["ids"]
        except Exception as e:
            raise UserError(f"segment file {path} is corrupt or truncated ({type(e).__name__}); restore it "
                            f"from a backup (the pairs that name its segments cannot be used without it)")
        if len(ids):
            max_id = max(max_id, int(ids.max()))
    return last_round + 1, max_id + 1


# ----------------------------------------------------------------------------------- queries, labels

def _is_finite(number):
    """math.isfinite, and False for an int too large for a float (JSON's integers have no bound)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_query(record):
    """Whether a queries.jsonl record names a pair: integer query_id, left and right."""
    return all(_is_int(record.get(k)) for k in ("query_id", "left", "right"))


def read_queries(run_dir, warn=True):
    """queries.jsonl as a dict query_id -> record. A line without integer query_id/left/right, or repeating
    an earlier query_id, is skipped with a warning naming its line (the first one of an id counts)."""
    path = os.path.join(run_dir, QUERIES)
    queries = {}
    for number, q in read_jsonl_numbered(path, warn):
        if not is_query(q):
            problem = "a query needs integer query_id, left and right"
        elif q["query_id"] in queries:
            problem = f"query {q['query_id']} was already asked on an earlier line"
        else:
            queries[q["query_id"]] = q
            continue
        if warn:
            print(f"warning: {path} line {number} was skipped: {problem}", file=sys.stderr)
    return queries


def parse_label(record, known_queries=None):
    """Check one labels.jsonl record; returns an error sentence or None if it is well-formed."""
    if not isinstance(record, dict):
        return "a label must be a JSON object"
    if not _is_int(record.get("query_id")):
        return "query_id must be an integer"
    if not isinstance(record.get("choice"), str) or record["choice"] not in CHOICES:
        return f"choice must be one of {', '.join(CHOICES)}"
    if not isinstance(record.get("labeler"), str) or not record["labeler"]:
        return "labeler must be a non-empty string"
    if not isinstance(record.get("time"), (int, float)) or isinstance(record.get("time"), bool) \
            or not _is_finite(record["time"]):
        return "time must be a number (seconds since the epoch)"
    if known_queries is not None and record["query_id"] not in known_queries:
        return f"query {record['query_id']} is not in {QUERIES}"
    return None


def read_labels(run_dir, known_queries=None, warn=True):
    """labels.jsonl as a list of well-formed records; bad ones are reported with their line and reason and
    skipped. When a query was answered more than once, every answer is kept (several opinions per pair);
    an `undo` record withdraws the previous answer of the same labeler to that query.

    Given known_queries (read_queries' dict), a label that answers a query that is not in queries.jsonl is
    a UserError rather than a warning: the two files do not belong together, and training on the rest would
    pair answers with the wrong segments. (A query appended since known_queries was read is no error: that
    label is left for the next read.) warn=False: skip bad lines without a word (a second read of the file)."""
    path = os.path.join(run_dir, LABELS)
    labels, fresh = [], None
    for number, record in read_jsonl_numbered(path, warn):
        if record.get("undo") is True and _is_int(record.get("query_id")):
            for i in range(len(labels) - 1, -1, -1):
                if labels[i]["query_id"] == record["query_id"] and labels[i]["labeler"] == record.get("labeler"):
                    del labels[i]
                    break
            continue
        error = parse_label(record)
        if error:
            if warn:
                print(f"warning: {path} line {number} was skipped ({error}): {json.dumps(record)[:200]}",
                      file=sys.stderr)
            continue
        if known_queries is not None and record["query_id"] not in known_queries:
            fresh = read_queries(run_dir, warn=False) if fresh is None else fresh
            if record["query_id"] in fresh:
                continue
            raise UserError(f"{path} line {number} answers query {record['query_id']}, which is not in "
                            f"{QUERIES}, so these labels do not belong to this run's queries; restore "
                            f"{QUERIES} or remove that line")
        labels.append(record)
    return labels


def preference_target(choice):
    """Probability that the left segment is preferred, as trained on; None for `skip` (not trained on)."""
    return {"left": 1.0, "right": 0.0, "equal": 0.5}.get(choice)


# ------------------------------------------------------------------------------------------- networks

def _torch():
    import torch
    return torch


class RunningMeanStd:
    """Running mean and variance (parallel algorithm of Chan et al.), used for observation and return
    normalisation. Arrays of shape `shape`."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x):
        """x: (batch, *shape)."""
        batch_mean, batch_var, batch_count = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta ** 2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d):
        self.mean, self.var, self.count = np.asarray(d["mean"]), np.asarray(d["var"]), float(d["count"])


def normalize_obs(obs, obs_rms, clip=10.0):
    """obs (..., obs_dim) -> float32 normalised and clipped, as the policy sees it."""
    return np.clip((obs - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -clip, clip).astype(np.float32)


def build_actor_critic(obs_dim, act_dim, hidden=64):
    """PPO's networks, CleanRL's continuous-action layout: separate 2x`hidden` tanh MLPs for the action mean
    and the value, a state-independent log std, orthogonal init. Returns an nn.Module with actor_mean,
    critic and actor_logstd."""
    torch = _torch()
    nn = torch.nn

    def layer(i, o, std=np.sqrt(2)):
        lin = nn.Linear(i, o)
        nn.init.orthogonal_(lin.weight, std)
        nn.init.constant_(lin.bias, 0.0)
        return lin

    module = nn.Module()
    module.critic = nn.Sequential(layer(obs_dim, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(),
                                  layer(hidden, 1, 1.0))
    module.actor_mean = nn.Sequential(layer(obs_dim, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(),
                                      layer(hidden, act_dim, 0.01))
    module.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))
    return module


class FlatAdam:
    """Adam over all of a module's parameters as one tensor, for both trainers (PPO's networks, the reward
    ensemble): torch.optim.Adam's arithmetic, operation for operation (eps added after the square root,
    bias-corrected), so its steps are torch.optim.Adam's to the last bit; plus optional clipping of the
    gradients' global norm. The parameters and their gradients become views into two flat tensors (backward()
    adds into the views in place), so zeroing, clipping and the step are a few operations on one tensor
    instead of a Python loop over many small ones. Why not torch.optim: on these tiny networks its per-call
    overhead and per-tensor operations were a fifth of PPO's update time, and its first call imports
    torch._dynamo, 3-5 s of every trainer's start on a slow 2-core machine."""

    def __init__(self, module, lr, eps, betas=(0.9, 0.999)):
        torch = _torch()
        parameters = list(module.parameters())
        self.flat = torch.cat([p.detach().reshape(-1) for p in parameters])
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in parameters:
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            p.grad = self.grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg, self.exp_avg_sq, self.steps = torch.zeros_like(self.flat), torch.zeros_like(self.flat), 0

    def zero_grad(self):
        self.grad.zero_()

    def step(self, max_grad_norm=None):
        """One Adam step; with max_grad_norm, first scale the gradients down to a global norm of at most it."""
        torch = _torch()
        if max_grad_norm is not None:
            self.grad.mul_(torch.clamp(max_grad_norm / (torch.linalg.vector_norm(self.grad) + 1e-6), max=1.0))
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2 ** self.steps) ** 0.5).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - beta1 ** self.steps))

    def state_dict(self):
        return {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        torch = _torch()
        if "param_groups" in state:  # torch.optim.Adam's, of checkpoints from before FlatAdam: one entry per tensor
            per_tensor = [state["state"][i] for i in sorted(state["state"])]
            state = {"steps": int(per_tensor[0]["step"]) if per_tensor else 0,
                     **{k: torch.cat([s[k].reshape(-1) for s in per_tensor]) if per_tensor
                        else torch.zeros_like(self.flat) for k in ("exp_avg", "exp_avg_sq")}}
        if state["exp_avg"].shape != self.flat.shape or state["exp_avg_sq"].shape != self.flat.shape:
            raise ValueError(f"optimizer state of {state['exp_avg'].numel()} parameters, not {self.flat.numel()}")
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps = int(state["steps"])


class PolicyForRollout:
    """The latest policy checkpoint, for stages that only act with it (collect.py). act(obs (n, obs_dim))
    -> actions (n, act_dim) sampled from the Gaussian policy and clipped to the action bounds."""

    def __init__(self, checkpoint, obs_dim, act_dim, low, high, seed=0):
        torch = _torch()
        try:
            self.net = build_actor_critic(obs_dim, act_dim, checkpoint["hidden"])
            self.net.load_state_dict(checkpoint["model"])
            self.obs_rms = RunningMeanStd((obs_dim,))
            self.obs_rms.load_state_dict(checkpoint["obs_rms"])
            if self.obs_rms.mean.shape != (obs_dim,):
                raise ValueError("observation statistics of another size")
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"the policy checkpoint does not fit this run's {obs_dim} observations and {act_dim} "
                            f"actions ({type(e).__name__}); it belongs to another run")
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs, deterministic=False, mean_rows=None):
        """mean_rows: optional bool array (n,); those rows act with the mean action, the others sample (the
        same random numbers are drawn either way, so the sampled rows do not depend on it)."""
        torch = _torch()
        with torch.no_grad():
            x = torch.as_tensor(normalize_obs(obs, self.obs_rms))
            mean = self.net.actor_mean(x)
            if deterministic:
                action = mean
            else:
                std = self.net.actor_logstd.expand_as(mean).exp()
                noise = std * torch.randn(mean.shape, generator=self.generator)
                if mean_rows is not None:
                    noise[torch.as_tensor(np.asarray(mean_rows, bool))] = 0.0
                action = mean + noise
        return np.clip(action.numpy(), self.low, self.high)


def build_reward_ensemble(in_dim, members=3, hidden=64, layers=2, inputs="obs", reward_state="before"):
    """An ensemble of reward predictors r_k(obs) (or r_k(obs, act), see REWARD_INPUTS) evaluated in one
    batched pass.

    Weights are stacked along a leading member axis, so forward(x (B, in_dim) or (K, B, in_dim))
    -> (K, B) costs one einsum per layer for all members. Leaky-ReLU MLPs, as in the paper. Buffers
    in_mean/in_std normalise the input (set from training data); out_mean/out_std normalise each member's
    output (zero mean, unit std over recent states) for `normalized_reward`."""
    torch = _torch()
    nn = torch.nn

    class RewardEnsemble(nn.Module):
        def __init__(self):
            super().__init__()
            sizes = [in_dim] + [hidden] * layers + [1]
            self.weights = nn.ParameterList()
            self.biases = nn.ParameterList()
            for i, o in zip(sizes[:-1], sizes[1:]):
                w = torch.empty(members, i, o)
                for k in range(members):
                    nn.init.kaiming_uniform_(w[k].T, a=0.01)  # leaky-relu gain, per member
                self.weights.append(nn.Parameter(w))
                self.biases.append(nn.Parameter(torch.zeros(members, 1, o)))
            self.register_buffer("in_mean", torch.zeros(in_dim))
            self.register_buffer("in_std", torch.ones(in_dim))
            self.register_buffer("out_mean", torch.zeros(members))
            self.register_buffer("out_std", torch.ones(members))
            self.members, self.in_dim, self.hidden, self.layers = members, in_dim, hidden, layers
            self.inputs = inputs  # what reward_input feeds it: one of REWARD_INPUTS
            self.reward_state = reward_state  # which of a step's states it rewards: see REWARD_STATES

        def forward(self, x, dropout=0.0):
            """dropout: the share of hidden units zeroed (and the rest scaled up) on each call, train_reward.py's
            --dropout while it fits; 0, the rewards every other use of the model sees."""
            x = (x - self.in_mean) / self.in_std
            if x.dim() == 2:
                x = x.unsqueeze(0).expand(self.members, -1, -1)
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                x = torch.baddbmm(b, x, w)
                if i < len(self.weights) - 1:
                    x = torch.nn.functional.leaky_relu_(x, 0.01)  # in place: allocating costs ~8x the op
                    if dropout:
                        x = torch.nn.functional.dropout(x, dropout, training=True)
            return x.squeeze(-1)

        def member_rewards(self, x):
            """x (B, in_dim) -> (K, B): each member's output, normalised."""
            return (self.forward(x) - self.out_mean[:, None]) / self.out_std[:, None]

        def normalized_reward(self, x):
            """x (B, in_dim) -> (B,): the members' outputs, each normalised, averaged."""
            return self.member_rewards(x).mean(0)

    return RewardEnsemble()


# What the reward model sees. "obs" by default: a person judges a clip by what it shows, the states, not the
# torques; and a model that also sees the actions offers the policy, which sets its actions directly, a
# shortcut through whatever action features the model picked up by chance (measured in BENCHMARKS.md, "What
# the reward model sees": once much worse than obs, once a tie). "obs+act" is the paper's r(o, a).
# "obs+next" sees the two states of a step, the one it started from and the one it led to, r(o_t, o_t+1): what a
# person sees happen in a step of a clip, motion included (a speed is in the observation, but on HalfCheetah's
# 0.05 s steps the speed a step starts with tells its distance run poorly: BENCHMARKS.md, "A reward of a step's
# two states").
REWARD_INPUTS = ("obs", "obs+act", "obs+next")


def reward_input(obs, acts, inputs, led_to=None):
    """The reward model's input (..., in_dim) from obs (..., obs_dim), (clipped) acts (..., act_dim) and, for
    "obs+next", led_to (..., obs_dim), the observation each step led to: the observation alone for
    inputs="obs", observation and action concatenated for "obs+act", the two observations for "obs+next"."""
    if inputs == "obs":
        return np.asarray(obs, np.float32)
    if inputs == "obs+next":
        return np.concatenate([obs, led_to], axis=-1).astype(np.float32)
    return np.concatenate([obs, acts], axis=-1).astype(np.float32)


def reward_in_dim(inputs, obs_dim, act_dim):
    """The width of reward_input's rows for an env of these observation and action widths."""
    return {"obs": obs_dim, "obs+act": obs_dim + act_dim, "obs+next": 2 * obs_dim}[inputs]


# Which state a model of the observation alone rewards a step for: the one the step started from ("before",
# the default), or the one its action led to ("after", as the env's own reward is; not adopted, BENCHMARKS.md
# "Which state a step's reward is of, again"). A model that also sees the action, or both states ("obs+next"),
# is always "before". Fitted to one, a model is used with the same: reward_model.pt records it.
REWARD_STATES = ("before", "after")


def rewards_led_to_state(inputs, reward_state):
    """Whether a model of these inputs, used with this REWARD_STATES entry, rewards each step for the state its
    action led to rather than the one it started from (only a model of the observation alone can)."""
    return inputs == "obs" and reward_state == "after"


def segment_reward_input(obs, acts, inputs, reward_state, next_obs=None):
    """The reward model's input for whole segments, obs (S, T, obs_dim), acts (S, T, act_dim) and next_obs
    (S, T, obs_dim), the observation each step led to (the segment file's, needed for "obs+next" only): the
    (S, T, in_dim) reward_input, or (S, T-1, in_dim) for a model of the observation that rewards the state a
    step led to (kept as it was fitted before segments stored next_obs: its segment's last reward is missed)."""
    if inputs == "obs+next" and next_obs is None:
        raise UserError("a reward model of a step's two states (--inputs obs+next) needs the observation each "
                        "step led to, which segment files written before 2026-12-02 do not store; start a new "
                        "run for it")
    x = reward_input(obs, acts, inputs, next_obs)
    return x[:, 1:] if rewards_led_to_state(inputs, reward_state) else x


def load_reward_model(run_dir, config=None):
    """The run's saved reward ensemble, or None if train_reward.py has not run yet. Given the run's config,
    a model whose input does not fit the run's env (a file copied from another run) is refused."""
    path = os.path.join(run_dir, REWARD_MODEL)
    if not os.path.exists(path):
        return None
    model = reward_model_from_checkpoint(load_torch(path, "reward model"), path)
    model.eval()
    if config is not None:
        check_reward_model_env(model, config, path)
    return model


def check_reward_model_env(model, config, path):
    """A UserError unless the model's input width is what the run's env gives a model of its inputs."""
    expected = reward_in_dim(model.inputs, config["obs_shape"][0], config["act_shape"][0])
    if model.in_dim != expected:
        raise UserError(f"{path} expects {model.in_dim} inputs, but {config['env_id']} gives it {expected} "
                        f"({model.inputs}); it is from another env's run")


def reward_model_from_checkpoint(checkpoint, path):
    """The ensemble a loaded reward_model.pt (from `path`) describes, with its weights."""
    try:
        # Files written before the inputs were a choice saw the actions.
        model = build_reward_ensemble(checkpoint["in_dim"], checkpoint["members"], checkpoint["hidden"],
                                      checkpoint["layers"], checkpoint.get("inputs", "obs+act"),
                                      checkpoint.get("reward_state", "before"))
        if model.inputs not in REWARD_INPUTS:
            raise ValueError(f"inputs {model.inputs!r}")
        if model.reward_state not in REWARD_STATES:
            raise ValueError(f"reward_state {model.reward_state!r}")
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"reward model {path} does not match its own description ({type(e).__name__}); "
                        f"delete it to train a new one")
    return model


def policy_step(run_dir):
    """Environment steps the run's saved policy has trained for (0 when there is none yet)."""
    path = os.path.join(run_dir, POLICY)
    return int(load_torch(path, "policy checkpoint")["global_step"]) if os.path.exists(path) else 0
