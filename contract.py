"""The data contract shared by the four stages: run directory layout, file formats, the environment
factory and the two networks whose weights travel between stages in files.

Every stage imports this module; no stage imports another stage. Everything a stage writes goes through
`write_atomic` (temp file + rename) or `append_jsonl` (whole lines, flushed and fsynced), so a reader never
sees half a file. README.md documents every file and field listed here.
"""
import json
import os
import sys
import tempfile
import time

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
METRICS = "metrics.jsonl"
LEARNING_CURVE = "learning_curve.png"

CHOICES = ("left", "right", "equal", "skip")

# Envs that end an episode when the body falls over. Early termination leaks reward information (an agent
# rewarded for anything learns to stay alive), so RLHF runs use a fixed horizon, as the paper did.
FIXED_HORIZON_KWARGS = {
    "Hopper": {"terminate_when_unhealthy": False},
    "Walker2d": {"terminate_when_unhealthy": False},
    "Ant": {"terminate_when_unhealthy": False},
    "Humanoid": {"terminate_when_unhealthy": False},
}


class UserError(Exception):
    """A mistake the user can fix (bad flag, wrong run directory, malformed file). Stages print its message
    as one sentence and exit with status 2 instead of showing a traceback."""


def run_main(main):
    """Run a stage's main(), turning UserError into one clear sentence and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------- files

def write_atomic(path, data: bytes):
    """Write bytes to path via a temp file in the same directory and a rename: readers see the old file or
    the new one, never half of one. On failure (e.g. a full disk) the old file stays intact."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide artifacts from other users of the run
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch_atomic(path, obj):
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def load_torch(path, what):
    """Load a checkpoint written by save_torch_atomic; a truncated or foreign file is a UserError."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist")
    except Exception as e:
        raise UserError(f"{what} {path} is corrupt or truncated ({type(e).__name__}); delete it to start "
                        f"that stage afresh")


def append_jsonl(path, records):
    """Append whole JSON lines and fsync, so a crash loses at most the line being written (which readers
    skip as torn) and never an earlier one. One write() per call: O_APPEND makes concurrent writers of whole
    lines safe on a local filesystem."""
    if isinstance(records, dict):
        records = [records]
    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A previous crash may have left a torn last line without "\n"; start on a fresh line so this
        # record is not glued onto it.
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path, warn=True):
    """Read a JSON-lines file. Returns a list of dicts. Malformed lines (a torn last line after a crash, a
    hand edit gone wrong) are skipped and reported with their line number; the rest is kept."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if warn:
                print(f"warning: {path} line {number} is malformed and was skipped ({e})", file=sys.stderr)
            continue
        records.append(record)
    return records


def log_metrics(run_dir, stage, **figures):
    """Append one line of figures to metrics.jsonl, tagged with the stage and the wall-clock time."""
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()}
    append_jsonl(os.path.join(run_dir, METRICS), {"stage": stage, "time": round(time.time(), 3), **clean})


# ------------------------------------------------------------------------------------- run and config

def make_env(env_id, env_kwargs=None, render_size=None):
    """The one environment factory: same env, same kwargs, in every stage. render_size gives an offscreen
    renderer of that many pixels square (MUJOCO_GL=egl, shadows off: they cost ~5x and show nothing)."""
    import gymnasium as gym
    kwargs = dict(env_kwargs or {})
    if render_size:
        os.environ.setdefault("MUJOCO_GL", "egl")
        kwargs.update(render_mode="rgb_array", width=render_size, height=render_size)
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise UserError(f"unknown or unavailable environment id {env_id!r} ({e})")
    except TypeError as e:
        raise UserError(f"environment {env_id!r} does not accept these arguments: {e}")


def default_env_kwargs(env_id):
    return dict(FIXED_HORIZON_KWARGS.get(env_id.split("-")[0], {}))


def open_run(run_dir, env_id=None, seed=0, segment_seconds=1.5, create=True):
    """Return the run's config, creating data/<run>/ and config.json on first use.

    A stage that names an env (--env) must match the run's; a run of another format version is refused."""
    path = os.path.join(run_dir, CONFIG)
    if os.path.exists(path):
        try:
            with open(path) as f:
                config = json.load(f)
        except (ValueError, OSError) as e:
            raise UserError(f"{path} is not valid JSON ({e})")
        if config.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{run_dir} was made with data format version {config.get('format_version')}, "
                            f"this code reads version {FORMAT_VERSION}; start a new run directory")
        if env_id is not None and env_id != config["env_id"]:
            raise UserError(f"{run_dir} is a run of {config['env_id']}, not {env_id}; pick another --run")
        return config
    if not create:
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG}); run collect.py first")
    if env_id is None:
        raise UserError(f"{run_dir} has no {CONFIG} yet; name the environment with --env")
    env_kwargs = default_env_kwargs(env_id)
    env = make_env(env_id, env_kwargs)
    dt = float(env.unwrapped.dt)
    segment_steps = max(2, int(round(segment_seconds / dt)))
    horizon = env.spec.max_episode_steps
    if horizon is not None and segment_steps > horizon:
        raise UserError(f"a {segment_seconds} s segment is {segment_steps} steps, longer than {env_id}'s "
                        f"{horizon}-step episodes; pass a shorter --segment-seconds")
    config = {
        "format_version": FORMAT_VERSION,
        "env_id": env_id,
        "env_kwargs": env_kwargs,
        "seed": int(seed),
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


def seconds_to_steps(seconds, dt):
    return max(2, int(round(seconds / dt)))


# ------------------------------------------------------------------------------------------- segments

SEGMENT_FIELDS = ("ids", "obs", "acts", "rewards", "qpos", "qvel", "policy_step")


def save_segments(run_dir, round_index, segments):
    """Write one collect call's segments to segments/round_RRRR.npz.

    segments: dict with ids (N,) int64, obs (N, T, obs_dim) float32, acts (N, T, act_dim) float32,
    rewards (N, T) float32 true env rewards, qpos (N, T, nq) and qvel (N, T, nv) float64 physics states to
    re-render from, policy_step (N,) int64 the policy checkpoint's env steps when collected."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **{k: segments[k] for k in SEGMENT_FIELDS})
    write_atomic(os.path.join(run_dir, SEGMENTS_DIR, f"round_{round_index:04d}.npz"), buf.getvalue())


def segment_files(run_dir):
    directory = os.path.join(run_dir, SEGMENTS_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith("round_") and f.endswith(".npz"))


def load_segments(run_dir):
    """All segments of the run, concatenated in id order: dict of the SEGMENT_FIELDS arrays plus
    `round` (N,), the collect call each came from. A truncated or corrupt file is a UserError."""
    parts = []
    for path in segment_files(run_dir):
        try:
            with np.load(path) as npz:
                part = {k: npz[k] for k in SEGMENT_FIELDS}
        except Exception as e:
            raise UserError(f"segment file {path} is corrupt or truncated ({type(e).__name__}); delete it "
                            f"and the queries that name its segments, or restore it from a backup")
        part["round"] = np.full(len(part["ids"]), int(os.path.basename(path)[6:10]), np.int64)
        parts.append(part)
    if not parts:
        return None
    segments = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(segments["ids"], kind="stable")
    return {k: v[order] for k, v in segments.items()}


def next_round_and_segment_id(run_dir):
    """Round index and first free segment id after everything already on disk (so ids are never reused,
    also after a crash: a segment file is either wholly there or not at all)."""
    files = segment_files(run_dir)
    if not files:
        return 0, 0
    last_round = int(os.path.basename(files[-1])[6:10])
    max_id = -1
    for path in files:
        try:
            with np.load(path) as npz:
                ids = npz["ids"]
        except Exception as e:
            raise UserError(f"segment file {path} is corrupt or truncated ({type(e).__name__})")
        if len(ids):
            max_id = max(max_id, int(ids.max()))
    return last_round + 1, max_id + 1


# ----------------------------------------------------------------------------------- queries, labels

def read_queries(run_dir):
    """queries.jsonl as a dict query_id -> record; malformed lines are skipped with a warning."""
    queries = {}
    for q in read_jsonl(os.path.join(run_dir, QUERIES)):
        if isinstance(q.get("query_id"), int) and isinstance(q.get("left"), int) and isinstance(q.get("right"), int):
            queries[q["query_id"]] = q
        else:
            print(f"warning: skipped a query without integer query_id/left/right: {q}", file=sys.stderr)
    return queries


def parse_label(record, known_queries=None):
    """Check one labels.jsonl record; returns an error sentence or None if it is well-formed."""
    if not isinstance(record, dict):
        return "a label must be a JSON object"
    if not isinstance(record.get("query_id"), int) or isinstance(record.get("query_id"), bool):
        return "query_id must be an integer"
    if record.get("choice") not in CHOICES:
        return f"choice must be one of {', '.join(CHOICES)}"
    if not isinstance(record.get("labeler"), str) or not record["labeler"]:
        return "labeler must be a non-empty string"
    if not isinstance(record.get("time"), (int, float)) or isinstance(record.get("time"), bool):
        return "time must be a number (seconds since the epoch)"
    if known_queries is not None and record["query_id"] not in known_queries:
        return f"query {record['query_id']} is not in {QUERIES}"
    return None


def read_labels(run_dir, known_queries=None):
    """labels.jsonl as a list of well-formed records; bad ones are reported with their line's reason and
    skipped. When a query was answered more than once, every answer is kept (several opinions per pair);
    an `undo` record withdraws the previous answer of the same labeler to that query."""
    labels = []
    for record in read_jsonl(os.path.join(run_dir, LABELS)):
        if record.get("undo") is True and isinstance(record.get("query_id"), int):
            for i in range(len(labels) - 1, -1, -1):
                if labels[i]["query_id"] == record["query_id"] and labels[i]["labeler"] == record.get("labeler"):
                    del labels[i]
                    break
            continue
        error = parse_label(record, known_queries)
        if error:
            print(f"warning: skipped label {json.dumps(record)[:200]}: {error}", file=sys.stderr)
            continue
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


class PolicyForRollout:
    """The latest policy checkpoint, for stages that only act with it (collect.py). act(obs (n, obs_dim))
    -> actions (n, act_dim) sampled from the Gaussian policy and clipped to the action bounds."""

    def __init__(self, checkpoint, obs_dim, act_dim, low, high, seed=0):
        torch = _torch()
        self.net = build_actor_critic(obs_dim, act_dim, checkpoint["hidden"])
        self.net.load_state_dict(checkpoint["model"])
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.obs_rms.load_state_dict(checkpoint["obs_rms"])
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs, deterministic=False):
        torch = _torch()
        with torch.no_grad():
            x = torch.as_tensor(normalize_obs(obs, self.obs_rms))
            mean = self.net.actor_mean(x)
            if deterministic:
                action = mean
            else:
                std = self.net.actor_logstd.expand_as(mean).exp()
                action = mean + std * torch.randn(mean.shape, generator=self.generator)
        return np.clip(action.numpy(), self.low, self.high)


def build_reward_ensemble(in_dim, members=3, hidden=64, layers=2):
    """An ensemble of reward predictors r_k(obs, act) evaluated in one batched pass.

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

        def forward(self, x):
            x = (x - self.in_mean) / self.in_std
            if x.dim() == 2:
                x = x.unsqueeze(0).expand(self.members, -1, -1)
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                x = torch.baddbmm(b, x, w)
                if i < len(self.weights) - 1:
                    x = torch.nn.functional.leaky_relu(x, 0.01)
            return x.squeeze(-1)

        def normalized_reward(self, x):
            """x (B, in_dim) -> (B,): the members' outputs, each normalised, averaged."""
            return ((self.forward(x) - self.out_mean[:, None]) / self.out_std[:, None]).mean(0)

    return RewardEnsemble()


def reward_input(obs, acts):
    """The reward model's input: observation and (clipped) action concatenated along the last axis."""
    return np.concatenate([obs, acts], axis=-1).astype(np.float32)


def load_reward_model(run_dir):
    """The run's saved reward ensemble, or None if train_reward.py has not run yet."""
    path = os.path.join(run_dir, REWARD_MODEL)
    if not os.path.exists(path):
        return None
    checkpoint = load_torch(path, "reward model")
    model = build_reward_ensemble(checkpoint["in_dim"], checkpoint["members"], checkpoint["hidden"],
                                  checkpoint["layers"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model


def policy_step(run_dir):
    """Environment steps the run's saved policy has trained for (0 when there is none yet)."""
    path = os.path.join(run_dir, POLICY)
    return int(load_torch(path, "policy checkpoint")["global_step"]) if os.path.exists(path) else 0
