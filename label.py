"""Stage 2 of the loop: answer the open queries in queries.jsonl and append the answers to labels.jsonl.

Synthetic teachers answer from a function of the segments (the env's own reward by default), so the whole
system can learn unattended, be tested and be benchmarked:

    python label.py teach --run data/cheetah                          # the perfect oracle
    python label.py teach --run data/cheetah --mistake 0.1            # B-Pref's imperfect teachers
    python label.py teach --run data/cheetah --behaviour cheetah_backwards   # or mymodule:my_function

People answer in the browser: `serve` shows two clips side by side and records which one is better,
`wait` blocks the loop (TEACHER=human ./loop.sh) until enough of the pairs are answered:

    python label.py serve --run data/cheetah --instructions "make it run backwards"   # http://127.0.0.1:8000
    python label.py wait --run data/cheetah --fraction 0.75

Label lines: README.md, "labels.jsonl".
Reads: config.json, queries.jsonl, labels.jsonl, segments/, clips/, metrics.jsonl (dashboard).
Writes: labels.jsonl, metrics.jsonl.
"""
import argparse
import bisect
import contextlib
import hmac
import importlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np

import contract as C


# --------------------------------------------------------------------------- behaviours a teacher judges
# Each takes a segment (dict of per-step arrays: obs (T, obs_dim), acts (T, act_dim), rewards (T,),
# qpos (T, nq), qvel (T, nv), states before each action) and returns a per-step score (T,): the teacher
# prefers the segment whose (discounted) sum is larger.

def env_reward(segment):
    """The environment's own reward: the oracle of the paper's synthetic experiments."""
    return segment["rewards"]


def reacher_spin_ccw(segment):
    """Reacher-v5: angular velocity of the first joint (qvel[0], rad/s); counter-clockwise is positive."""
    return segment["qvel"][:, 0]


def hopper_backflip(segment):
    """Hopper-v5: backward pitch rate of the torso, -qvel[2] (rad/s; qpos[2] is the torso's pitch, which
    grows as it tips forward), plus its height above the resting height 1.25 m, so that the hopper learns
    to jump and rotate backwards rather than to fall over backwards."""
    return -segment["qvel"][:, 2] + 2.0 * (segment["qpos"][:, 1] - 1.25)


def cheetah_backwards(segment):
    """HalfCheetah-v5: velocity of the torso along -x (m/s), i.e. running backwards."""
    return -segment["qvel"][:, 0]


BEHAVIOURS = {f.__name__: f for f in (env_reward, reacher_spin_ccw, hopper_backflip, cheetah_backwards)}
# The env each built-in behaviour reads the state of (gymnasium's id without its version): on another env the
# same qpos/qvel index is another joint, and the teacher would teach something no one asked for.
BEHAVIOUR_ENVS = {"reacher_spin_ccw": "Reacher", "hopper_backflip": "Hopper", "cheetah_backwards": "HalfCheetah"}


def load_behaviour(name):
    """A built-in behaviour by name, or a user's function given as module:function (module on sys.path, in the
    working directory or, under loop.sh, where the loop was started)."""
    if name in BEHAVIOURS:
        return BEHAVIOURS[name]
    if ":" not in name:
        raise C.UserError(f"unknown behaviour {name!r}; built in: {', '.join(BEHAVIOURS)}, or module:function")
    module_name, function_name = name.split(":", 1)
    # (after numpy and torch are imported, so that a file of the same name there cannot stand in for them)
    for directory in (os.environ.get("LOOP_START_DIR"), os.getcwd()):  # loop.sh runs teach from the repository
        if directory:
            sys.path.insert(0, directory)
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError, TypeError) as e:  # ValueError, TypeError: ":f", ".m:f"
        raise C.UserError(f"cannot load behaviour {name!r}: {e}")


# -------------------------------------------------------------------------------- synthetic teachers

def teacher_returns(score_left, score_right, gamma):
    """Myopic returns: step t of a T-step segment weighs gamma**(T-1-t), so gamma < 1 weighs the end
    more (B-Pref). score_*: (T,) per-step scores. Returns (R_left, R_right)."""
    weights = gamma ** np.arange(len(score_left) - 1, -1, -1, dtype=np.float64)
    return float(np.dot(weights, score_left)), float(np.dot(weights, score_right))


def synthetic_choice(r_left, r_right, rng, beta=np.inf, mistake=0.0, skip_threshold=-np.inf,
                     equal_threshold=0.0):
    """One answer of B-Pref's simulated teacher (Lee et al. 2021), in its order: skip when both returns are
    below skip_threshold; `equal` when they differ by less than equal_threshold; otherwise the better one
    (beta = inf) or a Bradley-Terry sample P(left) = sigmoid(beta (R_left - R_right)); finally the answer is
    flipped with probability `mistake`."""
    if max(r_left, r_right) < skip_threshold:
        return "skip"
    if abs(r_left - r_right) < equal_threshold:
        return "equal"
    if np.isinf(beta):
        if r_left == r_right:
            return "equal"
        left = r_left > r_right
    else:
        z = np.clip(beta * (r_left - r_right), -50, 50)
        left = rng.random() < 1.0 / (1.0 + np.exp(-z))
    if rng.random() < mistake:
        left = not left
    return "left" if left else "right"


def teach(args):
    """Answer every open query. One teacher at a time: two at once would answer the same queries twice. The
    answers are worked out without the web labeler's lock on labels.jsonl (scoring every segment takes seconds
    at the paper's sizes, and a person's answer would wait that long); under it, only the answers to pairs
    still unanswered are appended, so a pair that a person answered meanwhile keeps that one answer."""
    C.open_run(args.run, create=False)
    with C.exclusive(args.run):
        records = answer_open_queries(args)
        if not records:
            return
        labeler = records[0]["labeler"]
        with C.labels_locked(args.run):
            labels = C.read_labels(args.run, C.read_queries(args.run, warn=False), warn=False)
            answered = {label["query_id"] for label in labels}
            late = sum(r["query_id"] in answered for r in records)
            records = [r for r in records if r["query_id"] not in answered]
            C.append_jsonl(os.path.join(args.run, C.LABELS), records)
    counts = {c: sum(r["choice"] == c for r in records) for c in C.CHOICES}
    C.log_metrics(args.run, "label", labeler=labeler, labels=len(records), labels_total=len(labels) + len(records),
                  **{f"choice_{c}": n for c, n in counts.items()})
    print(f"label: {labeler} answered {len(records)} queries ({counts}); {len(labels) + len(records)} labels in all"
          + (f"; {late} were answered by someone else meanwhile, and keep that answer" if late else ""))


def answer_open_queries(args):
    """The teacher's answers to the queries that have no answer yet: label records, not yet appended."""
    config = C.open_run(args.run, create=False)
    behaviour = load_behaviour(args.behaviour)
    meant_for = BEHAVIOUR_ENVS.get(args.behaviour)
    if meant_for and config["env_id"].split("-v")[0] != meant_for:
        raise C.UserError(f"behaviour {args.behaviour!r} is for {meant_for}, not {config['env_id']}; write one for "
                          f"this env as module:function")
    queries = C.read_queries(args.run)
    labels = C.read_labels(args.run, queries)
    answered = {label["query_id"] for label in labels}
    open_queries = [q for qid, q in sorted(queries.items()) if qid not in answered]
    if not open_queries:
        print(f"label: all {len(queries)} queries already answered")
        return []
    segments, index = C.load_queried_segments(args.run, open_queries)

    def segment(row):  # what a behaviour sees of one segment
        return {k: segments[k][row] for k in ("obs", "acts", "rewards", "qpos", "qvel")}

    def score(row):  # the behaviour's (T,) per-step scores of one segment; a user's function may be of another env
        try:
            scores = np.asarray(behaviour(segment(row)))
            np.isfinite(scores.astype(np.float64))  # (numbers at all)
        except Exception as e:
            raise C.UserError(f"behaviour {args.behaviour!r} failed on a segment of {config['env_id']} "
                              f"({type(e).__name__}: {str(e)[:120]}); is it meant for this env?")
        if scores.shape != (config["segment_steps"],):
            raise C.UserError(f"behaviour {args.behaviour!r} must return one score per step of a segment, an "
                              f"array of shape ({config['segment_steps']},), not of shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise C.UserError(f"behaviour {args.behaviour!r} gave {np.size(scores) - np.isfinite(scores).sum()} "
                              f"scores that are not finite (nan or inf) to a segment of {config['env_id']}")
        return scores

    # Every segment is scored once: B-Pref scales the skip and equal thresholds by the typical size of a
    # segment's return, and each query's two sides are looked up here.
    all_scores = [score(row) for row in range(len(segments["ids"]))]
    margin = float(np.mean([abs(np.sum(s)) for s in all_scores])) if all_scores else 1.0
    skip_threshold = args.skip * margin if args.skip > 0 else -np.inf
    equal_threshold = args.equal * margin
    teacher = {"behaviour": args.behaviour, "beta": None if np.isinf(args.beta) else args.beta,
               "gamma": args.gamma, "mistake": args.mistake, "skip": args.skip, "equal": args.equal,
               "margin": round(margin, 6)}
    is_oracle = (args.behaviour == "env_reward" and np.isinf(args.beta) and args.gamma == 1.0 and args.mistake == 0
                 and args.skip == 0 and args.equal == 0)
    labeler = args.labeler or ("oracle" if is_oracle else "synthetic")
    records, now = [], time.time()
    for q in open_queries:
        rng = np.random.default_rng([config["seed"], q["query_id"]])  # same answers on every re-run
        r_left, r_right = teacher_returns(np.asarray(all_scores[index[q["left"]]], np.float64),
                                          np.asarray(all_scores[index[q["right"]]], np.float64), args.gamma)
        choice = synthetic_choice(r_left, r_right, rng, args.beta, args.mistake, skip_threshold,
                                  equal_threshold)
        records.append({"query_id": q["query_id"], "choice": choice, "labeler": labeler,
                        "time": round(now, 3), "teacher": teacher})
    return records


# ------------------------------------------------------------------------------------ people: `wait`

def still_needed(n_queries, n_labelled, fraction):
    """How many more pairs need an answer before `fraction` of all n_queries pairs have at least one."""
    return max(0, math.ceil(fraction * n_queries - 1e-9) - n_labelled)


def wait(args):
    """Block until `fraction` of all pairs asked so far have a label (TEACHER=human ./loop.sh), saying how
    many are still needed when that changes and at least every 30 s."""
    if not 0 < args.fraction <= 1:
        raise C.UserError(f"--fraction must be more than 0 and at most 1, not {args.fraction}")
    C.open_run(args.run, create=False)
    started, said, last, pairs = time.time(), 0.0, None, Pairs(args.run)
    while True:
        queries = C.read_queries(args.run)
        labels = C.read_labels(args.run, queries)
        answered = {label["query_id"] for label in labels}
        labelled = len(answered)
        needed = still_needed(len(queries), labelled, args.fraction)
        if needed == 0:
            break
        # People see only pairs with both clips on disk (Pairs.clip_file's rule): if too few are left, say so.
        playable = sum(qid not in answered and all(pairs.clip_file(args.run, q.get(side)) for side in
                                                   ("left_clip", "right_clip")) for qid, q in queries.items())
        if playable < needed:
            raise C.UserError(f"{needed} more pairs need an answer, but only {playable} of the unanswered ones have "
                              f"both clips to show people (the others were asked without clips, for a synthetic "
                              f"teacher, or lost them); answer those with `label.py teach --run {args.run}`, or "
                              f"lower --fraction")
        if needed != last or time.time() - said >= 30:
            print(f"label: waiting for people: {needed} more pairs need an answer ({labelled} of {len(queries)} "
                  f"answered, {args.fraction:.0%} wanted); answer them in `make label RUN={args.run}`", flush=True)
            said, last = time.time(), needed
        time.sleep(args.interval)
    C.log_metrics(args.run, "label", labeler="people", labels_total=len(labels), queries_labelled=labelled,
                  waited_seconds=round(time.time() - started, 1))
    print(f"label: people answered {labelled} of {len(queries)} pairs ({len(labels)} labels); going on")


# ---------------------------------------------------------------------------- people: the web labeler

DEFAULT_INSTRUCTIONS = "Which clip shows more of what you want the agent to learn?"
HOLD_SECONDS = 120.0  # a pair shown to one labeler is hidden from the others this long (rl-teacher's hold)
MAX_BODY = 4096  # bytes in a POST; an answer takes about 70
LABELER = re.compile(r"[\w.@+-][\w .@+-]{0,63}")


class Rejected(Exception):
    """A request the page (or a script) got wrong: answered with this HTTP status and sentence."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Pairs:
    """The web labeler's view of the run, shared by all requests under one lock: the queries (lines that
    collect.py appends to queries.jsonl are picked up on the next request), the answers (lines appended to
    labels.jsonl by anyone) and the pairs reserved for each labeler. Answers are appended under the lock and
    an flock on labels.jsonl, so concurrent answers, from this process or others, never tear or get lost."""

    def __init__(self, run_dir, opinions=1, hold=HOLD_SECONDS, clock=time.time):
        self.run, self.opinions, self.hold, self.clock = run_dir, opinions, hold, clock
        self.clips = os.path.realpath(os.path.join(run_dir, C.CLIPS_DIR))
        self.lock = threading.Lock()
        self.reserved = {}  # query_id -> {labeler: time the hold expires}
        self._reset()

    def _reset(self):
        self.queries = {}  # query_id -> {"left": clip url, "right": clip url}, or None if a clip is missing
        self.answers = {}  # query_id -> labelers who answered it, in order (only queries with answers)
        self.open = []  # sorted ids of playable queries with fewer than `opinions` answers
        self.times = []  # sorted times of the answers not withdrawn: labels per minute, dashboard
        self.answer_times = {}  # (query_id, labeler) -> times of their answers to it, oldest first
        self.seen = {C.QUERIES: (None, 0), C.LABELS: (None, 0)}  # file -> (inode, bytes taken in)
        self.clips_changed = None  # clips/'s modification time when the open pairs' clips were last checked

    def clip_file(self, base, name):
        """The real path of the file `name` (relative to `base`) names, or None unless it is a file inside the
        run's clips/: after resolving "..", absolute paths and symlinks, so no name reaches beyond it."""
        if not isinstance(name, str):
            return None
        try:
            path = os.path.realpath(os.path.join(base, name))
        except ValueError:  # a NUL byte or a lone surrogate: valid JSON or URL, no file
            return None
        return path if path.startswith(self.clips + os.sep) and os.path.isfile(path) else None

    def clip_url(self, relative):
        """The URL of a clip a query names (relative to the run), or None unless it is a file in clips/."""
        path = self.clip_file(self.run, relative)
        return None if path is None else "clips/" + urllib.parse.quote(os.path.relpath(path, self.clips))

    def _new_lines(self, name):
        """Records of the whole lines appended to `name` since the last call; None if it was replaced or
        truncated (then everything is taken in again). A torn last line waits until it is complete."""
        inode, offset = self.seen[name]
        try:
            with open(os.path.join(self.run, name), "rb") as f:
                stat = os.fstat(f.fileno())
                if inode not in (None, stat.st_ino) or stat.st_size < offset:
                    return None
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [] if offset == 0 else None
        end = data.rfind(b"\n") + 1
        self.seen[name] = (stat.st_ino, offset + end)
        records = []
        for line in data[:end].split(b"\n"):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # blank or malformed; contract.read_jsonl reports those
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def sync(self):
        """Take in the lines appended to labels.jsonl and queries.jsonl since the last call. Labels are read
        first: every query they name was on disk before them, so it is in the queries read after."""
        labels, queries = self._new_lines(C.LABELS), self._new_lines(C.QUERIES)
        if labels is None or queries is None:
            self._reset()
            return self.sync()
        for q in queries:
            qid = q.get("query_id")
            if C.is_query(q) and qid not in self.queries:  # as contract.read_queries: others are skipped
                left, right = self.clip_url(q.get("left_clip")), self.clip_url(q.get("right_clip"))
                self.queries[qid] = {"left": left, "right": right} if left and right else None
                if self.queries[qid]:
                    bisect.insort(self.open, qid)
        for record in labels:  # as contract.read_labels: an undo withdraws the labeler's last answer
            qid, labeler = record.get("query_id"), record.get("labeler")
            if record.get("undo") is True and type(qid) is int and labeler in self.answers.get(qid, ()):
                answers = self.answers[qid]
                del answers[len(answers) - 1 - answers[::-1].index(labeler)]
                del self.times[bisect.bisect_left(self.times, self.answer_times[qid, labeler].pop())]
                if not answers:
                    del self.answers[qid]
                if self.queries.get(qid) and len(answers) < self.opinions and not self._is_open(qid):
                    bisect.insort(self.open, qid)
            elif C.parse_label(record, self.queries) is None:
                self.answers.setdefault(qid, []).append(labeler)
                bisect.insort(self.times, record["time"])
                self.answer_times.setdefault((qid, labeler), []).append(record["time"])
                self.reserved.get(qid, {}).pop(labeler, None)
                if len(self.answers[qid]) >= self.opinions and self._is_open(qid):
                    self.open.pop(bisect.bisect_left(self.open, qid))

    def _is_open(self, qid):
        i = bisect.bisect_left(self.open, qid)
        return i < len(self.open) and self.open[i] == qid

    def _may_see(self, qid, labeler, now):
        """Whether pair qid may be shown to labeler: it still needs an answer, not theirs, and the others'
        unexpired holds leave room for one more."""
        answers = self.answers.get(qid, ())
        if not self.queries.get(qid) or labeler in answers or len(answers) >= self.opinions:
            return False
        holders = self.reserved.setdefault(qid, {})
        for name in [name for name, expiry in holders.items() if expiry <= now]:
            del holders[name]
        return labeler in holders or len(answers) + len(holders) < self.opinions

    def next_pair(self, labeler, holding=()):
        """Reserve for labeler the oldest pair that needs an answer and that nobody else holds. The pairs its
        page still holds (`holding`: on screen or preloaded) are not given again, and their holds renewed."""
        with self.lock:
            self.sync()
            now = self.clock()
            for qid in holding:
                if self._may_see(qid, labeler, now):
                    self.reserved[qid][labeler] = now + self.hold
            for qid in list(self.open):
                if qid not in holding and self._may_see(qid, labeler, now) and self._clips_still_there(qid):
                    self.reserved[qid][labeler] = now + self.hold
                    return {"query_id": qid, **self.queries[qid]}
            return None

    def _check_clips_if_changed(self):
        """Count the open pairs that lost a clip as without clips now, not only once someone is offered one:
        all of them checked, but only when clips/ changed (one stat a request otherwise)."""
        try:
            changed = os.stat(self.clips).st_mtime_ns
        except OSError:
            changed = None
        if changed != self.clips_changed:
            self.clips_changed = changed
            for qid in list(self.open):
                self._clips_still_there(qid)

    def _clips_still_there(self, qid):
        """Whether both clips of open pair qid are still on disk; a pair that lost one while the server ran
        is counted as without clips from then on, as it would have been had it been missing at the start."""
        urls = self.queries[qid].values()
        if all(os.path.isfile(os.path.join(self.clips, urllib.parse.unquote(url[len("clips/"):]))) for url in urls):
            return True
        self.queries[qid] = None
        self.open.pop(bisect.bisect_left(self.open, qid))
        return False

    @contextlib.contextmanager
    def _labels_locked(self):
        """This process's lock, and the flock on labels.jsonl against other processes that append to it."""
        with self.lock, C.labels_locked(self.run):
            self.sync()
            yield
            self.sync()  # take in the line just written, as every other reader will

    def answer(self, labeler, qid, choice):
        with self._labels_locked():
            if qid not in self.queries:
                raise Rejected(404, f"pair {qid} is not in {C.QUERIES}")
            if labeler in self.answers.get(qid, ()):
                raise Rejected(409, f"{labeler} already answered pair {qid}; undo that answer to change it")
            if len(self.answers.get(qid, ())) >= self.opinions:
                raise Rejected(409, f"pair {qid} was already answered by someone else")
            C.append_jsonl(os.path.join(self.run, C.LABELS),
                           {"query_id": qid, "choice": choice, "labeler": labeler, "time": round(self.clock(), 3)})

    def undo(self, labeler, qid):
        """Withdraw labeler's answer to qid; the pair is held for them again, to be answered anew."""
        with self._labels_locked():
            if qid not in self.queries:
                raise Rejected(404, f"pair {qid} is not in {C.QUERIES}")
            if labeler not in self.answers.get(qid, ()):
                raise Rejected(409, f"{labeler} has no answer to pair {qid} to undo")
            C.append_jsonl(os.path.join(self.run, C.LABELS),
                           {"undo": True, "query_id": qid, "labeler": labeler, "time": round(self.clock(), 3)})
            self.reserved.setdefault(qid, {})[labeler] = self.clock() + self.hold

    def progress(self, labeler, fraction):
        """The figures the page shows: pairs answered and waiting, labels per minute over the last 5
        minutes, this labeler's answers and how many more answers the training loop waits for."""
        with self.lock:
            self.sync()
            self._check_clips_if_changed()
            now = self.clock()
            recent = self.times[bisect.bisect_left(self.times, now - 300):]
            minutes = max(1.0, (now - recent[0]) / 60) if recent else 1.0
            return {"pairs": len(self.queries), "waiting": len(self.open),
                    "waiting_for_you": sum(labeler not in self.answers.get(qid, ()) for qid in self.open),
                    "answered": sum(len(a) >= self.opinions for a in self.answers.values()),
                    "without_clips": sum(q is None for q in self.queries.values()),
                    "labels": sum(len(a) for a in self.answers.values()),
                    "yours": sum(labeler in a for a in self.answers.values()),
                    "labels_per_minute": round(len(recent) / minutes, 1), "opinions": self.opinions,
                    "loop_needs": still_needed(len(self.queries), len(self.answers), fraction)}

    def label_curve(self):
        with self.lock:
            self.sync()
            return thin([[t, i + 1] for i, t in enumerate(self.times)])


def thin(points, most=400):
    """At most `most` [x, y] points with numeric values: means of consecutive runs when there are more."""
    points = [p for p in points if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)]
    if len(points) <= most:
        return points
    return [g.mean(0).tolist() for g in np.array_split(np.asarray(points, np.float64), most)]


def curves(metrics, clip_url):
    """The dashboard's figures from metrics.jsonl records: episode returns against policy steps, evaluations,
    reward-model validation accuracy against labels, and the latest clip of the policy."""
    episodes = [m for m in metrics if m.get("stage") == "train_policy"]
    evaluations = [m for m in metrics if m.get("stage") == "evaluate"]
    latest = next((m for m in reversed(evaluations) if clip_url(m.get("clip"))), None)
    return {"true_return": thin([[m.get("step"), m.get("true_return")] for m in episodes]),
            "learned_return": thin([[m.get("step"), m.get("learned_return")] for m in episodes]),
            "evaluate": thin([[m.get("policy_step"), m.get("true_return_mean")] for m in evaluations]),
            "val_accuracy": thin([[m.get("labels"), m.get("val_accuracy")]
                                  for m in metrics if m.get("stage") == "train_reward"]),
            "policy_clip": latest and {"url": clip_url(latest["clip"]), "policy": latest.get("policy"),
                                       "step": latest.get("policy_step")}}


def is_loopback(host):
    """Whether a host name or address (IPv6 maybe in brackets, maybe with :port) is this machine only."""
    host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_labeler(name):
    if not isinstance(name, str) or not LABELER.fullmatch(name):
        raise Rejected(400, "labeler must be a name of 1 to 64 letters, digits, spaces or . @ + - _")
    return name


def json_body(request, fields):
    """The POST's JSON object, which must have exactly these fields, a valid labeler and an integer
    query_id; anything else is rejected before it can change anything."""
    if not request.is_json:
        raise Rejected(415, "send a JSON object with the header Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # "[[[[...": nested deeper than json can parse
        body = None
    if not isinstance(body, dict):
        raise Rejected(400, "the body is not a JSON object")
    if set(body) != set(fields):
        raise Rejected(400, f"expected exactly the fields {', '.join(fields)}; got {', '.join(map(str, body))}")
    if type(body["query_id"]) is not int:
        raise Rejected(400, "query_id must be an integer")
    check_labeler(body["labeler"])
    return body


def create_app(run_dir, instructions=DEFAULT_INSTRUCTIONS, token=None, opinions=1, hold=HOLD_SECONDS,
               fraction=0.75, clock=time.time):
    """The web labeler as a WSGI app: `serve` runs it on Flask's server, any WSGI server can (README.md)."""
    import flask
    from werkzeug.exceptions import HTTPException
    C.open_run(run_dir, create=False)
    if opinions < 1 or not 0 < hold < math.inf or not 0 < fraction <= 1:  # also refuses nan
        raise C.UserError("--opinions must be at least 1, --hold positive and --fraction in (0, 1]")
    # Once through contract's readers, as every other stage reads them: malformed lines are reported, and labels
    # of another run's queries refused. Pairs then tails both files itself and skips what these reported.
    C.read_labels(run_dir, C.read_queries(run_dir))
    pairs = Pairs(run_dir, opinions, hold, clock)
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.url_map.merge_slashes = False  # /clips//etc/passwd names an absolute path: refused below, not redirected
    request, metrics_cache = flask.request, {}
    run_name = os.path.basename(os.path.abspath(run_dir))

    @app.before_request
    def check_access():
        if token:  # on every request: the page, its API calls and the clips
            given = request.args.get("token") or request.headers.get("X-Token") or request.cookies.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise Rejected(403, "this labeler needs its access token: open the address you were given, "
                                    "which ends in ?token=...")
        elif not is_loopback(request.host):  # a web page's script must not reach us by DNS rebinding
            raise Rejected(403, f"this labeler answers only to 127.0.0.1 or localhost, not {request.host}")

    @app.after_request
    def headers(response):
        response.headers.update({"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                                 "Referrer-Policy": "no-referrer"})
        if token and request.args.get("token") == token:  # the page's later requests carry the cookie
            response.set_cookie("token", token, httponly=True, samesite="Strict")
        return response

    @app.errorhandler(Rejected)
    def rejected(e):
        return flask.jsonify(error=str(e)), e.status

    @app.errorhandler(HTTPException)
    def http_error(e):
        message = f"the request body is larger than {MAX_BODY} bytes" if e.code == 413 else e.description
        return flask.jsonify(error=message), e.code

    @app.get("/")
    def label_page():
        return flask.render_template("label.html", instructions=instructions, run=run_name)

    @app.get("/dashboard")
    def dashboard_page():
        return flask.render_template("dashboard.html", instructions=instructions, run=run_name)

    @app.get("/api/next")
    def next_pair():
        try:
            holding = [int(i) for i in request.args.get("holding", "").split(",") if i][:20]
        except ValueError:
            raise Rejected(400, "holding must be query ids separated by commas, e.g. holding=3,4")
        return flask.jsonify(pair=pairs.next_pair(check_labeler(request.args.get("labeler")), holding))

    @app.get("/api/status")
    def status():
        return flask.jsonify(pairs.progress(request.args.get("labeler"), fraction))

    @app.post("/api/answer")
    def answer():
        body = json_body(request, ("query_id", "choice", "labeler"))
        if body["choice"] not in C.CHOICES:
            raise Rejected(400, f"choice must be one of {', '.join(C.CHOICES)}")
        pairs.answer(body["labeler"], body["query_id"], body["choice"])
        return flask.jsonify(ok=True, query_id=body["query_id"])

    @app.post("/api/undo")
    def undo():
        body = json_body(request, ("query_id", "labeler"))
        pairs.undo(body["labeler"], body["query_id"])
        return flask.jsonify(ok=True, query_id=body["query_id"])

    @app.get("/api/metrics")
    def metrics():
        path = os.path.join(run_dir, C.METRICS)
        key = (os.stat(path).st_mtime_ns, os.stat(path).st_size) if os.path.exists(path) else None
        if metrics_cache.get("key", ()) != key:
            metrics_cache.update(key=key, data=curves(C.read_jsonl(path, warn=False), pairs.clip_url))
        return flask.jsonify(labels=pairs.label_curve(), **metrics_cache["data"])

    @app.get("/clips/<path:name>")
    def clip(name):
        path = pairs.clip_file(pairs.clips, name)
        if path is None:
            raise Rejected(404, f"there is no clip {name!r} in this run")
        return flask.send_file(path, conditional=True, max_age=3600)

    return app


def labeling_url(host, port, token=None):
    """The address to give people: the token percent-quoted, so that one with + & # or spaces reads back whole."""
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/" + (f"?token={urllib.parse.quote(token, safe='')}" if token else "")


def serve(args):
    args.token = args.token or os.environ.get("LABEL_TOKEN") or None
    if not args.token and not is_loopback(args.host):
        raise C.UserError(f"refusing to serve on {args.host} without --token, since anyone who can reach it "
                          f"could watch the clips and write labels")
    app = create_app(args.run, args.instructions, args.token, args.opinions, args.hold, args.fraction)
    try:  # a port in use would otherwise be werkzeug's own two lines and exit status 1, after our first line
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug's server does
            probe.bind((args.host, args.port))
    except OSError as e:
        raise C.UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port")
    print(f"label: labeling page {labeling_url(args.host, args.port, args.token)} (dashboard: /dashboard), "
          f"run {args.run}; Ctrl-C stops", flush=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app.run(host=args.host, port=args.port, threaded=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teach", help="answer every open query with a synthetic teacher",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--run", required=True, help="run directory")
    t.add_argument("--behaviour", default="env_reward",
                   help=f"what the teacher wants: one of {', '.join(BEHAVIOURS)}, or module:function")
    t.add_argument("--beta", type=float, default=np.inf, help="stochastic teacher's rationality (inf: perfect)")
    t.add_argument("--gamma", type=float, default=1.0, help="myopic teacher's discount (<1 weighs the end more)")
    t.add_argument("--mistake", type=float, default=0.0, help="probability of flipping the answer")
    t.add_argument("--skip", type=float, default=0.0,
                   help="answer 'skip' when both returns are below this times the mean |segment return|")
    t.add_argument("--equal", type=float, default=0.0,
                   help="answer 'equal' when returns differ by less than this times the mean |segment return|")
    t.add_argument("--labeler", default=None, help="labeler id written into each label (default: oracle/synthetic)")
    s = sub.add_parser("serve", help="the web labeler: people answer the open queries in a browser",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; another than loopback needs --token")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--token", default=None, help="access token every request must carry (or set $LABEL_TOKEN)")
    s.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS, help="what the labelers should teach, shown on top")
    s.add_argument("--opinions", type=int, default=1, help="answers wanted per pair, from different labelers")
    s.add_argument("--hold", type=float, default=HOLD_SECONDS,
                   help="seconds a pair shown to one labeler is hidden from the others")
    s.add_argument("--fraction", type=float, default=0.75,
                   help="share of pairs the training loop waits for (loop.sh's HUMAN_FRACTION), for the progress line")
    w = sub.add_parser("wait", help="block until enough of the pairs asked so far have an answer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w.add_argument("--run", required=True, help="run directory")
    w.add_argument("--fraction", type=float, default=0.75, help="share of all pairs that must have an answer")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between two looks at labels.jsonl")
    args = p.parse_args(argv)
    # A mistyped flag is one sentence now, not a traceback later or, for a teacher, wrong answers on disk.
    rules = {}
    if args.command == "teach":
        rules = {"--beta": args.beta >= 0, "--gamma": 0 <= args.gamma <= 1, "--mistake": 0 <= args.mistake <= 1,
                 "--skip": 0 <= args.skip < np.inf, "--equal": 0 <= args.equal < np.inf}
    elif args.command == "serve":
        rules = {"--port": 1 <= args.port <= 65535}
    elif args.command == "wait":
        rules = {"--interval": 0 < args.interval < np.inf}
    for flag, ok in rules.items():
        if not ok:
            p.error(f"argument {flag}: value out of range (see {args.command} --help)")
    return args


def main():
    args = parse_args()
    {"teach": teach, "serve": serve, "wait": wait}[args.command](args)


if __name__ == "__main__":
    C.run_main(main)
