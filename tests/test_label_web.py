"""Issue 3: the web labeler (label.py serve, label.py wait) through Flask's test client, on tiny run
directories built here (config.json, queries.jsonl and small mp4 clips; no env, no data/)."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import contract as C
import label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_IDS = range(4)


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory):
    """Four tiny H.264 clips (32x32 px, 15 frames), each a colour with a bar moving to the right."""
    import imageio.v2 as imageio
    directory = tmp_path_factory.mktemp("clips")
    for i in CLIP_IDS:
        frames = np.zeros((15, 32, 32, 3), np.uint8)
        for k in range(15):
            frames[k, :, :, i % 3] = 60 + 10 * k
            frames[k, 8:24, 2 * k:2 * k + 4] = 255
        imageio.mimwrite(str(directory / f"{i}.mp4"), frames, fps=10, codec="libx264", macro_block_size=16,
                         ffmpeg_log_level="error")
    return directory


def make_run(path, clip_files, n_queries=3, first=0):
    """A run directory as collect.py leaves it, with n_queries pairs of the four clips."""
    os.makedirs(path / C.CLIPS_DIR, exist_ok=True)
    if not (path / C.CONFIG).exists():
        C.write_json_atomic(str(path / C.CONFIG), {"format_version": C.FORMAT_VERSION, "env_id": "HalfCheetah-v5",
                                                   "env_kwargs": {}, "seed": 0, "dt": 0.05, "segment_steps": 30,
                                                   "obs_shape": [17], "act_shape": [6], "nq": 9, "nv": 9})
        for i in CLIP_IDS:
            shutil.copy(clip_files / f"{i}.mp4", path / C.CLIPS_DIR / f"{i}.mp4")
    add_queries(path, range(first, first + n_queries))
    return str(path)


def add_queries(run, ids, **fields):
    C.append_jsonl(os.path.join(run, C.QUERIES), [
        {"query_id": q, "left": q % 4, "right": (q + 1) % 4, "left_clip": f"clips/{q % 4}.mp4",
         "right_clip": f"clips/{(q + 1) % 4}.mp4", "round": 0, "selection": "random", "policy_step": 0,
         "time": 1.0, **fields} for q in ids])


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def run(tmp_path, clip_files):
    return make_run(tmp_path / "run", clip_files)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def client(run, clock):
    return label.create_app(run, instructions="make it <spin> counter-clockwise", clock=clock).test_client()


def next_pair(client, labeler, holding=""):
    r = client.get(f"/api/next?labeler={labeler}&holding={holding}")
    assert r.status_code == 200, r.json
    return r.json["pair"]


def answer(client, query_id, choice="left", labeler="ann"):
    return client.post("/api/answer", json={"query_id": query_id, "choice": choice, "labeler": labeler})


def labels_file(run):
    path = os.path.join(run, C.LABELS)
    return open(path, "rb").read() if os.path.exists(path) else b""


# ---------------------------------------------------------------------------------------- the pages

def test_labeling_page_shows_instructions_videos_buttons_and_progress(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "make it &lt;spin&gt; counter-clockwise" in page  # escaped, never markup
    for text in ('id="left"', 'id="right"', "Left is better", "Right is better", "About the same",
                 "Can't tell", 'id="speed"', 'value="0.5"', 'value="2"', "Undo", "ArrowLeft", "ArrowDown",
                 "The agent is collecting new clips", "labels/min", "the training loop"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert r.headers["X-Frame-Options"] == "DENY"


def test_dashboard_page_and_its_curves(client, run):
    assert "api/metrics" in client.get("/dashboard").get_data(as_text=True)
    empty = client.get("/api/metrics").json
    assert empty["true_return"] == [] and empty["policy_clip"] is None
    shutil.copy(os.path.join(run, "clips", "0.mp4"), os.path.join(run, "clips", "policy_step4000.mp4"))
    C.append_jsonl(os.path.join(run, C.METRICS),
                   [{"stage": "train_policy", "step": 1000 * i, "true_return": float(i), "learned_return": -i}
                    for i in range(1000)]
                   + [{"stage": "train_reward", "labels": 10, "val_accuracy": 0.7},
                      {"stage": "evaluate", "policy_step": 0, "policy": "random", "true_return_mean": -3.0,
                       "clip": "clips/0.mp4"},
                      {"stage": "evaluate", "policy_step": 4000, "policy": "step4000", "true_return_mean": 5.0,
                       "clip": "clips/policy_step4000.mp4"},
                      {"stage": "evaluate", "policy_step": 5000, "policy": "step5000", "true_return_mean": 6.0,
                       "clip": "../config.json"}])  # a clip outside clips/ is never offered
    answer(client, 0)
    m = client.get("/api/metrics").json
    assert len(m["true_return"]) == 400 and m["true_return"][0][1] == pytest.approx(1.0)  # bins of 2.5 episodes
    assert m["learned_return"][-1][1] < 0 and m["val_accuracy"] == [[10, 0.7]]
    assert m["evaluate"] == [[0, -3.0], [4000, 5.0], [5000, 6.0]]
    assert m["policy_clip"] == {"url": "clips/policy_step4000.mp4", "policy": "step4000", "step": 4000}
    assert len(m["labels"]) == 1 and m["labels"][0][1] == 1
    assert client.get("/" + m["policy_clip"]["url"]).status_code == 200


def test_clips_are_served_with_range_requests(client, run):
    pair = next_pair(client, "ann")
    r = client.get("/" + pair["left"])
    assert r.status_code == 200 and r.mimetype == "video/mp4"
    assert r.data == open(os.path.join(run, pair["left"]), "rb").read()
    part = client.get("/" + pair["left"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.data) == 100


@pytest.mark.parametrize("path", ["/clips/../config.json", "/clips/%2e%2e/config.json", "/clips/..%2fconfig.json",
                                  "/clips//etc/passwd", "/clips/%2fetc%2fpasswd", "/clips/../../../../etc/passwd",
                                  "/clips/outside.mp4", "/clips/missing.mp4", "/clips/", "/config.json",
                                  "/labels.jsonl", "/clips/sub"])
def test_nothing_outside_the_runs_clips_can_be_read(client, run, tmp_path, path):
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"secret")
    os.symlink(secret, os.path.join(run, "clips", "outside.mp4"))  # a symlink out of clips/
    os.makedirs(os.path.join(run, "clips", "sub"))
    r = client.get(path)
    assert r.status_code == 404 and b"secret" not in r.data and b"format_version" not in r.data
    assert "error" in r.json


def test_a_query_naming_a_clip_outside_clips_is_never_shown(run, clock):
    add_queries(run, [3], left_clip="../config.json")
    add_queries(run, [4], right_clip="/etc/passwd")
    add_queries(run, [5], left_clip=None)
    os.symlink(os.path.join(run, "clips", "0.mp4"), os.path.join(run, "clips", "alias.mp4"))
    add_queries(run, [6], left_clip="clips/alias.mp4")  # a symlink inside clips/ to a clip is fine
    client = label.create_app(run, clock=clock).test_client()
    shown = [next_pair(client, f"l{i}")["query_id"] for i in range(4)]
    assert shown == [0, 1, 2, 6]
    assert next_pair(client, "l9") is None
    assert client.get("/api/status").json["without_clips"] == 3


def test_a_query_line_the_other_stages_skip_is_not_offered(run, clock):
    """contract.read_queries skips a query whose left or right is not an integer; were it offered here, its
    answer would be a label of an unknown query, which halts train_reward and the loop."""
    add_queries(run, [3], left="1")
    client = label.create_app(run, clock=clock).test_client()
    assert [next_pair(client, f"l{i}")["query_id"] for i in range(3)] == [0, 1, 2]
    assert next_pair(client, "l9") is None
    assert answer(client, 3).status_code == 404
    assert client.get("/api/status").json["pairs"] == 3


@pytest.mark.parametrize("clip", [r"clips/1.mp4\u0000", r"clips/\ud800.mp4"])  # JSON escapes, as written
def test_a_clip_path_no_file_can_have_loses_nothing(run, clock, clip):
    """A NUL byte or a lone surrogate is valid JSON but no path (os.path.realpath raises): that query counts
    as without clips, and the queries and labels read with it are all taken in."""
    client = label.create_app(run, clock=clock).test_client()
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 0, "choice": "left", "labeler": "bob", "time": 1.0})
    with open(os.path.join(run, C.QUERIES), "a") as f:
        f.write('{"query_id": 3, "left": 1, "right": 2, "left_clip": "%s", "right_clip": "clips/2.mp4"}\n' % clip)
    add_queries(run, [4])
    s = client.get("/api/status").json
    assert (s["pairs"], s["labels"], s["without_clips"]) == (5, 1, 1)
    assert [next_pair(client, f"l{i}")["query_id"] for i in range(3)] == [1, 2, 4]
    assert answer(client, 0, "left", "ann").status_code == 409  # bob's answer was taken in


def test_a_clip_name_with_a_nul_byte_is_a_404(client):
    r = client.get("/clips/a%00b.mp4")
    assert r.status_code == 404 and "error" in r.json


def test_a_clip_that_disappears_while_the_labeler_runs_is_no_longer_offered(run, clock):
    client = label.create_app(run, clock=clock).test_client()
    assert next_pair(client, "ann")["query_id"] == 0
    assert client.get("/api/status").json["without_clips"] == 0
    os.remove(os.path.join(run, "clips", "2.mp4"))  # pair 1 shows clips 1 and 2, pair 2 clips 2 and 3
    s = client.get("/api/status").json  # before anyone is offered them
    assert (s["without_clips"], s["waiting"]) == (2, 1), s  # pair 0, on ann's screen, is still waiting
    assert next_pair(client, "bob") is None
    assert client.get("/api/status").json["without_clips"] == 2
    assert answer(client, 0, "left", "ann").status_code == 200  # the pair on screen can still be answered


# ------------------------------------------------------------------------------- pairs and answers

def test_an_answer_is_one_well_formed_line_naming_the_labeler(client, run, clock):
    pair = next_pair(client, "ann")
    r = answer(client, pair["query_id"], "right", "ann")
    assert r.status_code == 200 and r.json == {"ok": True, "query_id": 0}
    lines = labels_file(run).splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record == {"query_id": 0, "choice": "right", "labeler": "ann", "time": clock.now}
    assert C.parse_label(record, C.read_queries(run)) is None
    assert C.read_labels(run) == [record]
    for choice in ("equal", "skip"):
        q = next_pair(client, "ann")["query_id"]
        assert answer(client, q, choice).status_code == 200
    assert [label["choice"] for label in C.read_labels(run)] == ["right", "equal", "skip"]
    assert next_pair(client, "ann") is None  # all three answered


def test_the_next_pair_is_a_different_one_for_each_labeler_and_for_the_preloaded_one(client):
    assert next_pair(client, "ann")["query_id"] == 0
    assert next_pair(client, "bob")["query_id"] == 1
    assert next_pair(client, "ann", holding="0")["query_id"] == 2  # ann's page preloads her next pair
    assert next_pair(client, "cid") is None  # all three held
    assert next_pair(client, "ann", holding="0,2") is None  # 1 is bob's
    assert next_pair(client, "ann")["query_id"] == 0  # a reloaded page gets its own held pairs back


def test_reservations_expire(client, clock):
    assert next_pair(client, "ann")["query_id"] == 0
    assert next_pair(client, "ann", "0")["query_id"] == 1
    assert next_pair(client, "bob")["query_id"] == 2
    assert next_pair(client, "cid") is None
    clock.now += 60
    assert next_pair(client, "ann", "0,1") is None  # renews ann's two holds
    clock.now += 100  # bob's hold (120 s) has expired, ann's renewed ones not
    assert next_pair(client, "cid")["query_id"] == 2
    assert next_pair(client, "dan") is None
    clock.now += 121
    assert next_pair(client, "dan")["query_id"] == 0


def test_a_pair_is_answered_once_unless_more_opinions_are_asked(run, clock):
    client = label.create_app(run, clock=clock).test_client()
    assert answer(client, 0, "left", "ann").status_code == 200
    before = labels_file(run)
    r = answer(client, 0, "right", "bob")
    assert r.status_code == 409 and "already answered" in r.json["error"]
    r = answer(client, 0, "right", "ann")
    assert r.status_code == 409 and "undo" in r.json["error"]
    assert labels_file(run) == before
    assert [p["query_id"] for p in [next_pair(client, "bob"), next_pair(client, "cid")]] == [1, 2]

    two = label.create_app(run, opinions=2, clock=clock).test_client()
    assert next_pair(two, "bob")["query_id"] == 0  # one answer of two so far; ann may not see it again
    assert next_pair(two, "ann")["query_id"] == 1
    assert answer(two, 0, "right", "bob").status_code == 200
    assert answer(two, 0, "equal", "cid").status_code == 409
    assert answer(two, 1, "skip", "cid").status_code == 200
    assert [(x["query_id"], x["labeler"]) for x in C.read_labels(run)] == [(0, "ann"), (0, "bob"), (1, "cid")]
    assert two.get("/api/status").json["answered"] == 1


def test_undo_withdraws_the_answer_and_gives_the_pair_back(client, run):
    assert answer(client, 0, "left", "ann").status_code == 200
    assert next_pair(client, "bob")["query_id"] == 1
    r = client.post("/api/undo", json={"query_id": 0, "labeler": "ann"})
    assert r.status_code == 200 and r.json == {"ok": True, "query_id": 0}
    last = json.loads(labels_file(run).splitlines()[-1])
    assert last["undo"] is True and last["query_id"] == 0 and last["labeler"] == "ann"
    assert C.read_labels(run) == []
    assert next_pair(client, "cid")["query_id"] == 2  # 0 is held for ann again
    assert answer(client, 0, "right", "ann").status_code == 200
    assert [x["choice"] for x in C.read_labels(run)] == ["right"]
    r = client.post("/api/undo", json={"query_id": 1, "labeler": "ann"})
    assert r.status_code == 409 and "no answer" in r.json["error"]
    assert client.post("/api/undo", json={"query_id": 99, "labeler": "ann"}).status_code == 404


def test_a_withdrawn_answer_leaves_the_rate_and_the_curve(client, clock):
    for _ in range(2):
        assert answer(client, 0, "left", "ann").status_code == 200
        clock.now += 1
        assert client.post("/api/undo", json={"query_id": 0, "labeler": "ann"}).status_code == 200
    assert answer(client, 0, "right", "ann").status_code == 200
    s = client.get("/api/status?labeler=ann").json
    assert (s["labels"], s["labels_per_minute"]) == (1, 1.0)
    assert [n for _, n in client.get("/api/metrics").json["labels"]] == [1]


def test_pairs_a_labeler_already_answered_are_not_waiting_for_them(run, clock):
    """With two opinions per pair, ann's answered pairs still wait for one more labeler, but not for her: her
    page must not say that other labelers are watching them and that they will come back to her."""
    client = label.create_app(run, opinions=2, clock=clock).test_client()
    for q in range(3):
        assert answer(client, q, "left", "ann").status_code == 200
    assert next_pair(client, "ann") is None
    s = client.get("/api/status?labeler=ann").json
    assert (s["waiting"], s["waiting_for_you"]) == (3, 0)
    assert client.get("/api/status?labeler=bob").json["waiting_for_you"] == 3


def teacher_answers(query_ids):
    """Label records as label.answer_open_queries returns them (not yet appended)."""
    return [{"query_id": q, "choice": "left", "labeler": "oracle", "time": 1.0} for q in query_ids]


def test_teach_appends_its_answers_under_the_web_labelers_lock(run, monkeypatch):
    """teach checks which of its pairs are still open and appends their answers under the flock the web labeler
    answers under; otherwise a person's answer between the two would give a pair two answers."""
    held, appended_while_held = threading.Event(), []
    args = label.parse_args(["teach", "--run", run])
    monkeypatch.setattr(label, "answer_open_queries", lambda args: teacher_answers([0, 1, 2]))

    def hold_the_lock():
        with C.labels_locked(run):
            held.set()
            time.sleep(1.0)
            appended_while_held.append(len(C.read_labels(run)))
    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait()
    label.teach(args)
    holder.join()
    assert appended_while_held == [0] and len(C.read_labels(run)) == 3


def test_a_person_answers_while_teach_works_out_its_answers(run, client, monkeypatch, capsys):
    """Scoring every segment takes teach seconds at the paper's sizes: it does that without the labels lock, so
    a person's answer goes through meanwhile, and that pair keeps the person's answer alone."""
    args = label.parse_args(["teach", "--run", run])

    def answers_while_a_person_answers(args):
        fd = os.open(os.path.join(run, C.LABELS), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: teach holds the labeler's lock
        finally:
            os.close(fd)
        assert answer(client, 1, "right", "ann").status_code == 200
        return teacher_answers([0, 1, 2])
    monkeypatch.setattr(label, "answer_open_queries", answers_while_a_person_answers)
    label.teach(args)
    labels = C.read_labels(run)
    assert sorted((x["query_id"], x["labeler"], x["choice"]) for x in labels) == [
        (0, "oracle", "left"), (1, "ann", "right"), (2, "oracle", "left")]
    out = capsys.readouterr().out
    assert "oracle answered 2 queries" in out and "3 labels in all" in out
    assert "1 were answered by someone else meanwhile, and keep that answer" in out
    logged = [m for m in C.read_jsonl(os.path.join(run, C.METRICS)) if m["stage"] == "label"]
    assert [(m["labels"], m["labels_total"]) for m in logged] == [(2, 3)]


def test_pairs_collect_appends_appear_without_a_restart(tmp_path, clip_files, clock):
    run = make_run(tmp_path / "run", clip_files, n_queries=0)
    client = label.create_app(run, clock=clock).test_client()
    r = client.get("/api/next?labeler=ann")
    assert r.status_code == 200 and r.json == {"pair": None}  # the page shows "collecting new clips"
    assert client.get("/api/status").json["pairs"] == 0
    add_queries(run, [0, 1])
    assert next_pair(client, "ann")["query_id"] == 0
    with open(os.path.join(run, C.QUERIES), "a") as f:
        f.write('{"query_id": 2, "left": 2, "ri')  # collect.py is half way through a line
    assert next_pair(client, "ann", "0")["query_id"] == 1
    with open(os.path.join(run, C.QUERIES), "a") as f:
        f.write('ght": 3, "left_clip": "clips/2.mp4", "right_clip": "clips/3.mp4"}\n')
    assert next_pair(client, "ann", "0,1")["query_id"] == 2


def test_labels_other_processes_append_are_taken_in(client, run):
    assert next_pair(client, "ann")["query_id"] == 0
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 1, "choice": "left", "labeler": "oracle", "time": 1.0})
    assert next_pair(client, "bob")["query_id"] == 2
    assert answer(client, 1, "left", "bob").status_code == 409
    # labels.jsonl replaced by a shorter file (a restored backup): everything is read again
    C.write_atomic(os.path.join(run, C.LABELS), b"")
    assert next_pair(client, "bob", "2")["query_id"] == 1


def test_progress_counts_answers_rate_and_what_the_loop_waits_for(run, clock):
    add_queries(run, range(3, 8))  # 8 pairs; the loop waits for 75% = 6
    client = label.create_app(run, fraction=0.75, clock=clock).test_client()
    s = client.get("/api/status?labeler=ann").json
    assert (s["pairs"], s["answered"], s["waiting"], s["yours"], s["loop_needs"]) == (8, 0, 8, 0, 6)
    for q in range(4):
        clock.now += 30
        assert answer(client, q, "left", "ann" if q < 3 else "bob").status_code == 200
    s = client.get("/api/status?labeler=ann").json
    assert (s["answered"], s["waiting"], s["yours"], s["labels"], s["loop_needs"]) == (4, 4, 3, 4, 2)
    assert s["labels_per_minute"] == pytest.approx(4 / 1.5, abs=0.05)  # 4 answers within the last 1.5 minutes
    clock.now += 600
    assert client.get("/api/status").json["labels_per_minute"] == 0


@pytest.mark.parametrize("n_queries,labelled,fraction,needed", [
    (0, 0, 0.75, 0), (4, 0, 0.75, 3), (4, 3, 0.75, 0), (10, 0, 0.7, 7), (10, 6, 0.7, 1), (3, 5, 1.0, 0),
    (1, 0, 0.01, 1)])
def test_still_needed(n_queries, labelled, fraction, needed):
    assert label.still_needed(n_queries, labelled, fraction) == needed


# ------------------------------------------------------------------------------------- bad requests

BAD_ANSWERS = [
    ("text/plain", '{"query_id": 0, "choice": "left", "labeler": "ann"}', 415, "Content-Type"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": "ann"', 400, "not a JSON object"),
    ("application/json", '[0, "left", "ann"]', 400, "not a JSON object"),
    ("application/json", "", 400, "not a JSON object"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": "ann", "x": 1}', 400, "exactly the fields"),
    ("application/json", '{"query_id": 0, "choice": "left"}', 400, "exactly the fields"),
    ("application/json", '{"query_id": "0", "choice": "left", "labeler": "ann"}', 400, "integer"),
    ("application/json", '{"query_id": true, "choice": "left", "labeler": "ann"}', 400, "integer"),
    ("application/json", '{"query_id": 0.0, "choice": "left", "labeler": "ann"}', 400, "integer"),
    ("application/json", '{"query_id": 0, "choice": "better", "labeler": "ann"}', 400, "choice must be"),
    ("application/json", '{"query_id": 0, "choice": null, "labeler": "ann"}', 400, "choice must be"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": ""}', 400, "labeler must be"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": 7}', 400, "labeler must be"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": "a\\nb"}', 400, "labeler must be"),
    ("application/json", '{"query_id": 0, "choice": "left", "labeler": "<script>"}', 400, "labeler must be"),
    ("application/json", json.dumps({"query_id": 0, "choice": "left", "labeler": "a" * 65}), 400, "labeler must be"),
    ("application/json", json.dumps({"query_id": 0, "choice": "left", "labeler": "a" * 5000}), 413, "larger than"),
    ("application/json", '{"query_id": 99, "choice": "left", "labeler": "ann"}', 404, "not in queries.jsonl"),
    ("application/json", '{"query_id": -1, "choice": "left", "labeler": "ann"}', 404, "not in queries.jsonl"),
]


@pytest.mark.parametrize("content_type,body,status,message", BAD_ANSWERS)
def test_a_bad_answer_gets_a_clear_4xx_and_changes_nothing(client, run, content_type, body, status, message):
    assert answer(client, 1).status_code == 200
    before = labels_file(run)
    r = client.post("/api/answer", data=body, content_type=content_type)
    assert r.status_code == status and message in r.json["error"]
    r = client.post("/api/undo", data=body.replace('"choice": "left", ', ""), content_type=content_type)
    assert 400 <= r.status_code < 500 and r.json["error"]
    assert labels_file(run) == before
    assert next_pair(client, "zed")["query_id"] == 0  # the state is untouched too


@pytest.mark.parametrize("query", ["", "labeler=", "labeler=a%0Ab", "labeler=ann&holding=x", "labeler=ann&holding=1;2"])
def test_a_bad_next_pair_request_gets_a_400(client, query):
    r = client.get("/api/next?" + query)
    assert r.status_code == 400 and r.json["error"]


def test_wrong_methods_and_unknown_routes_get_a_4xx(client):
    assert client.get("/api/answer").status_code == 405
    assert client.post("/api/next").status_code == 405
    assert client.get("/nowhere").status_code == 404


# -------------------------------------------------------------------------------------------- access

def test_without_a_token_only_loopback_host_names_are_answered(client):
    assert client.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8000"}).status_code == 200
    r = client.get("/api/next?labeler=ann", headers={"Host": "evil.example:8000"})  # DNS rebinding
    assert r.status_code == 403 and "127.0.0.1" in r.json["error"]


def test_a_token_is_checked_on_every_request(run, clock):
    client = label.create_app(run, token="s3cret", clock=clock).test_client()
    for path in ["/", "/dashboard", "/api/next?labeler=ann", "/api/status", "/api/metrics", "/clips/0.mp4"]:
        r = client.get(path, headers={"Host": "10.0.0.5:8000"})
        assert r.status_code == 403 and "token" in r.json["error"], path
        assert client.get(path + ("&" if "?" in path else "?") + "token=wrong").status_code == 403
    before = labels_file(run)
    assert answer(client, 0).status_code == 403
    assert labels_file(run) == before
    r = client.get("/?token=s3cret")
    assert r.status_code == 200 and "token=s3cret" in r.headers["Set-Cookie"]
    assert client.get("/clips/0.mp4").status_code == 200  # the page's requests carry the cookie
    assert answer(client, 0).status_code == 200
    assert client.get("/?token=s3cret", headers={"Host": "10.0.0.5:8000"}).status_code == 200
    other = label.create_app(run, token="s3cret", clock=clock).test_client()
    assert other.get("/api/status", headers={"X-Token": "s3cret"}).status_code == 200


def test_serve_refuses_another_interface_without_a_token(run):
    r = subprocess.run([sys.executable, "label.py", "serve", "--run", run, "--host", "0.0.0.0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "LABEL_TOKEN": ""})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "without --token" in r.stderr, r.stderr
    assert label.is_loopback("127.0.0.1") and label.is_loopback("localhost:8000") and label.is_loopback("[::1]:80")
    for host in ("0.0.0.0", "192.168.1.2", "example.com", "[::]:80", "127.0.0.1.example.com"):
        assert not label.is_loopback(host), host


def test_serve_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(C.UserError, match="not a run directory"):
        label.create_app(str(tmp_path))


# ----------------------------------------------------------------------------------------- concurrency

def test_concurrent_answers_from_8_labelers_give_exactly_2000_whole_lines(tmp_path, clip_files):
    run = make_run(tmp_path / "run", clip_files, n_queries=2000)
    app = label.create_app(run)
    errors = []

    def labeler(k):
        client, holding = app.test_client(), []
        for _ in range(250):
            pair = next_pair(client, f"labeler{k}", ",".join(map(str, holding)))
            r = answer(client, pair["query_id"], "left right equal skip".split()[k % 4], f"labeler{k}")
            if r.status_code != 200:
                errors.append(r.json)

    threads = [threading.Thread(target=labeler, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    raw = labels_file(run)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2000
    records = [json.loads(line) for line in raw.splitlines()]
    queries = C.read_queries(run)
    assert all(C.parse_label(r, queries) is None for r in records)
    assert sorted(r["query_id"] for r in records) == list(range(2000))  # every pair once, none twice
    for k in range(8):
        assert sum(r["labeler"] == f"labeler{k}" for r in records) == 250
    assert len(C.read_labels(run, queries)) == 2000


# ------------------------------------------------------------------------------------------------ wait

def test_wait_blocks_until_enough_pairs_are_answered(run):
    add_queries(run, [3])  # 4 pairs: 0.5 of them is 2
    wait = subprocess.Popen([sys.executable, "label.py", "wait", "--run", run, "--fraction", "0.5",
                             "--interval", "0.2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait.stdout.readline()
        assert "2 more pairs need an answer" in first and "0 of 4" in first
        C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 0, "choice": "left", "labeler": "ann", "time": 1.0})
        assert "1 more pairs" in wait.stdout.readline()
        time.sleep(0.5)
        assert wait.poll() is None  # still waiting
        C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 2, "choice": "skip", "labeler": "bob", "time": 2.0})
        out, err = wait.communicate(timeout=30)
    finally:
        wait.kill()
    assert wait.returncode == 0, err
    assert "answered 2 of 4 pairs" in out
    assert C.read_jsonl(os.path.join(run, C.METRICS))[-1]["queries_labelled"] == 2


def test_wait_returns_at_once_when_enough_are_answered_and_refuses_a_bad_fraction(run):
    C.append_jsonl(os.path.join(run, C.LABELS), [{"query_id": q, "choice": "left", "labeler": "ann", "time": 1.0}
                                                 for q in range(3)])
    label.wait(label.parse_args(["wait", "--run", run, "--fraction", "1"]))
    with pytest.raises(C.UserError, match="--fraction"):
        label.wait(label.parse_args(["wait", "--run", run, "--fraction", "1.5"]))


def test_wait_refuses_to_wait_for_pairs_people_cannot_see(run):
    """A run asked for a synthetic teacher has pairs without clips, which the labeler never shows: a human loop
    resumed on it waited for their answers forever. So did one whose clips were deleted."""
    add_queries(run, [3, 4], left_clip=None, right_clip=None)  # 5 pairs, 3 with clips
    with pytest.raises(C.UserError, match=r"5 more pairs need an answer, but only 3 of the unanswered ones have both "
                                          r"clips to show people .*answer those with `label.py teach --run "):
        label.wait(label.parse_args(["wait", "--run", run, "--fraction", "1"]))
    os.remove(os.path.join(run, C.CLIPS_DIR, "1.mp4"))  # pairs 0 and 1 show clip 1
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 3, "choice": "left", "labeler": "ann", "time": 1.0})
    with pytest.raises(C.UserError, match="2 more pairs need an answer, but only 1 of the unanswered ones"):
        label.wait(label.parse_args(["wait", "--run", run, "--fraction", "0.6"]))
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 4, "choice": "left", "labeler": "ann", "time": 1.0})
    label.wait(label.parse_args(["wait", "--run", run, "--fraction", "0.4"]))  # answered: nothing to wait for


@pytest.mark.parametrize("token", ["a+b", "x&y=1", "abc#1", "with space", "s3cret"])
def test_the_address_serve_prints_carries_the_whole_token(run, clock, token):
    url = label.labeling_url("127.0.0.1", 8000, token)
    client = label.create_app(run, token=token, clock=clock).test_client()
    assert client.get(url[len("http://127.0.0.1:8000"):]).status_code == 200, url
    assert label.labeling_url("::1", 80) == "http://[::1]:80/"


def test_a_label_time_too_large_for_a_float_is_a_malformed_line(run, clock, capsys):
    """JSON's integers have no bound: one too large for a float was an OverflowError in every reader."""
    with open(os.path.join(run, C.LABELS), "a") as f:
        f.write('{"query_id": 0, "choice": "left", "labeler": "ann", "time": 1' + "0" * 400 + '}\n')
    C.append_jsonl(os.path.join(run, C.LABELS), {"query_id": 1, "choice": "left", "labeler": "ann", "time": 1.0})
    assert [x["query_id"] for x in C.read_labels(run)] == [1]
    assert "line 1 was skipped (time must be a number" in capsys.readouterr().err
    client = label.create_app(run, clock=clock).test_client()
    assert client.get("/api/status?labeler=ann").json["labels"] == 1


def test_the_labeler_benchmark_runs():
    """make bench-labeler builds its own run directory: one that read_config refused (it lacked 'dt') stopped
    the benchmark before its first request, unnoticed until it was run again."""
    result = subprocess.run([sys.executable, "bench/bench_labeler.py", "--clients", "2", "--answers", "5",
                             "--labels", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "10 answers in" in result.stdout and "labels.jsonl now has 30 lines" in result.stdout, result.stdout
