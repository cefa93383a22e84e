"""Issue 7: property-based tests (hypothesis) of the two append-only files and of what may be appended to
them. Arbitrary bytes never crash a reader; a crash (a file cut at any byte) or a full disk (a write cut short
at any byte) never corrupts what was there before; anything parse_label accepts survives a round trip; and
no POST body to the web labeler, however odd, crashes it or writes anything but one well-formed label."""
import contextlib
import errno
import io
import json
import os
import shutil
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import contract as C

# database=None: no .hypothesis/ folder in the checkout.
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as json.loads gives them back (no NaN, no tuples, string keys).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)

# Records shaped like labels, with every field sometimes wrong.
label_like = st.fixed_dictionaries(
    {"query_id": st.integers(-3, 12) | json_values,
     "choice": st.sampled_from(C.CHOICES) | st.text(max_size=6) | json_values,
     "labeler": st.sampled_from(["ann", "oracle", ""]) | st.text(max_size=10) | json_values,
     "time": st.floats(allow_nan=True, allow_infinity=True) | st.integers() | json_values},
    optional={"undo": st.booleans() | json_values, "teacher": json_values})

# Well-formed queries and labels, whose other fields may be hostile (a clip path that is no path at all), so
# that the readers and the labeler also meet lines they keep, and labels of queries that are not there.
clip_paths = st.sampled_from(["clips/0.mp4", "../config.json", "clips/\x00.mp4", "clips/\ud800"]) | json_values
good_queries = st.fixed_dictionaries({"query_id": st.integers(-2, 6), "left": st.integers(0, 3),
                                      "right": st.integers(0, 3)},
                                     optional={"left_clip": clip_paths, "right_clip": clip_paths})
good_labels = st.fixed_dictionaries({"query_id": st.integers(-2, 6), "choice": st.sampled_from(C.CHOICES),
                                     "labeler": st.sampled_from(["ann", "bob"]), "time": st.floats(0, 2e9)},
                                    optional={"undo": st.just(True)})

# Bytes that look like a JSON-lines file gone wrong: fragments of good lines, garbage, newlines, bad UTF-8.
fragments = st.lists(
    st.sampled_from([b"\n", b"{", b"}", b'"query_id": 1', b"\xff\xfe", b"\x00", b"[" * 2000, b"\r\n", b"NaN"])
    | st.binary(max_size=20)
    | json_objects.map(lambda o: json.dumps(o).encode())
    | (good_queries | good_labels).map(lambda o: json.dumps(o).encode() + b"\n"),
    max_size=12).map(b"".join)
junk = st.binary(max_size=200) | fragments


@contextlib.contextmanager
def run_dir():
    directory = tempfile.mkdtemp(prefix="props-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def quiet():
    """Readers report bad lines on stderr; hypothesis runs them hundreds of times."""
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        yield sys.stderr
    finally:
        sys.stderr = saved


# ------------------------------------------------------------------------------------------ readers

@SETTINGS
@given(junk)
def test_arbitrary_bytes_never_crash_the_readers_nor_change_the_file(data):
    with run_dir() as run, quiet():
        for name in (C.QUERIES, C.LABELS, C.METRICS):
            write(os.path.join(run, name), data)
        records = C.read_jsonl(os.path.join(run, C.METRICS))
        assert all(isinstance(r, dict) for r in records)
        queries = C.read_queries(run)
        assert all(type(q) is int and type(r["left"]) is int and type(r["right"]) is int
                   for q, r in queries.items())
        labels = C.read_labels(run)
        assert all(C.parse_label(label) is None for label in labels)
        try:
            known = C.read_labels(run, queries)
            assert all(label["query_id"] in queries for label in known)
        except C.UserError as e:  # a label of a query that is not in queries.jsonl: one sentence
            assert "not in queries.jsonl" in str(e) and "\n" not in str(e)
        for name in (C.QUERIES, C.LABELS, C.METRICS):
            assert read(os.path.join(run, name)) == data  # readers never write


@SETTINGS
@given(junk)
def test_every_bad_line_is_reported_with_its_number_and_the_good_ones_are_kept(data):
    with run_dir() as run, quiet() as err:
        path = os.path.join(run, C.LABELS)
        write(path, data)
        records = C.read_jsonl(path)
        lines = data.split(b"\n")
        good, bad = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                record = None
            (good if isinstance(record, dict) else bad).append((number, record))
        assert records == [r for _, r in good]
        for number, _ in bad:
            assert f"line {number} is malformed" in err.getvalue()


good_records = st.lists(json_objects, min_size=1, max_size=6)


@SETTINGS
@given(good_records, good_records, st.data())
def test_a_file_cut_at_any_byte_keeps_every_whole_line_and_takes_new_appends(old, new, data):
    """What a SIGKILL mid-append leaves: any prefix of the file. Readers get the whole lines of it, at most
    the cut one is reported, and the next append is read back whole after them."""
    with run_dir() as run, quiet() as err:
        path = os.path.join(run, C.QUERIES)
        C.append_jsonl(path, old)
        whole = read(path)
        cut = data.draw(st.integers(0, len(whole)), label="cut")
        write(path, whole[:cut])
        complete = whole[:cut].count(b"\n")
        got = C.read_jsonl(path)
        assert got[:complete] == old[:complete] and len(got) - complete in (0, 1)  # 1: cut just before "\n"
        assert err.getvalue().count("warning") <= 1
        C.append_jsonl(path, new)
        assert C.read_jsonl(path)[-len(new):] == new
        assert C.read_jsonl(path)[:complete] == old[:complete]


@SETTINGS
@given(junk, good_records)
def test_appending_after_any_garbage_reads_back_every_new_record(prefix, new):
    with run_dir() as run, quiet():
        path = os.path.join(run, C.LABELS)
        write(path, prefix)
        C.append_jsonl(path, new)
        assert read(path).startswith(prefix)  # nothing before is ever rewritten
        assert C.read_jsonl(path)[-len(new):] == new


# ------------------------------------------------------------------------------------------- labels

@SETTINGS
@given(label_like | json_values)
def test_parse_label_never_crashes_and_what_it_accepts_survives_a_round_trip(record):
    error = C.parse_label(record)
    assert error is None or (isinstance(error, str) and error)
    if error is not None or not isinstance(record, dict):
        return
    if record.get("undo") is True:
        return  # an undo record withdraws a label rather than being one
    with run_dir() as run, quiet():
        C.append_jsonl(os.path.join(run, C.LABELS), record)
        assert C.read_labels(run) == [record]
        queries = {record["query_id"]: {}}
        assert C.parse_label(record, queries) is None
        assert C.read_labels(run, queries) == [record]


@SETTINGS
@given(st.lists(label_like, max_size=8))
def test_read_labels_keeps_exactly_the_records_parse_label_accepts(records):
    with run_dir() as run, quiet():
        C.append_jsonl(os.path.join(run, C.LABELS), records)
        expected = []
        for r in records:
            if r.get("undo") is True and type(r.get("query_id")) is int:
                for i in range(len(expected) - 1, -1, -1):
                    if expected[i]["query_id"] == r["query_id"] and expected[i]["labeler"] == r.get("labeler"):
                        del expected[i]
                        break
            elif C.parse_label(r) is None:
                expected.append(r)
        assert C.read_labels(run) == expected


@SETTINGS
@given(good_records, good_records, st.data())
def test_a_full_disk_at_any_byte_leaves_the_file_as_it_was(old, new, data):
    """The kernel reports a full disk as a short write; append_jsonl takes its part back and raises."""
    with run_dir() as run, quiet():
        path = os.path.join(run, C.LABELS)
        C.append_jsonl(path, old)
        before = read(path)
        size = len("".join(json.dumps(r, sort_keys=True) + "\n" for r in new).encode())
        stop = data.draw(st.integers(0, size - 1), label="bytes written before the disk is full")
        real_write = os.write

        def full_disk(fd, buffer):
            n = min(len(buffer), stop - full_disk.written)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            full_disk.written += n
            return real_write(fd, bytes(buffer[:n]))
        full_disk.written = 0
        os.write = full_disk
        try:
            with pytest.raises(OSError) as raised:
                C.append_jsonl(path, new)
        finally:
            os.write = real_write
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
        assert read(path) == before
        assert "disk is full" in C.describe_os_error(raised.value)


# ---------------------------------------------------------------------------------- the web labeler

def create_app():
    """label.create_app(run_dir, ...), or None while label.py has no web labeler yet."""
    import label
    return getattr(label, "create_app", None)


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    if not callable(create_app()):
        pytest.skip("label.py has no create_app(run_dir, ...) yet")
    run = str(tmp_path_factory.mktemp("web") / "run")
    os.makedirs(os.path.join(run, C.CLIPS_DIR))
    C.write_json_atomic(os.path.join(run, C.CONFIG), {"format_version": C.FORMAT_VERSION,
                                                       "env_id": "HalfCheetah-v5", "env_kwargs": {}, "seed": 0,
                                                       "dt": 0.05, "segment_steps": 30, "obs_shape": [17],
                                                       "act_shape": [6], "nq": 9, "nv": 9})
    C.append_jsonl(os.path.join(run, C.QUERIES), [
        {"query_id": q, "left": 2 * q, "right": 2 * q + 1, "left_clip": None, "right_clip": None, "round": 0,
         "selection": "random", "policy_step": 0, "time": 1.0} for q in range(4)])
    return run


post_bodies = (st.binary(max_size=300)
               | json_values.map(lambda v: json.dumps(v).encode())
               | good_labels.map(lambda r: json.dumps({k: v for k, v in r.items() if k != "time"}).encode())
               | label_like.map(lambda r: json.dumps({k: v for k, v in r.items() if k != "time"}).encode())
               | st.just(b"[" * 900)
               | st.just(b"x" * 5000))


@SETTINGS
@given(st.sampled_from(["/api/answer", "/api/undo"]), post_bodies,
       st.sampled_from(["application/json", "text/plain", None]))
def test_no_post_body_crashes_the_labeler_or_writes_anything_but_one_good_label(web_run, url, body, mimetype):
    client = create_app()(web_run).test_client()
    path = os.path.join(web_run, C.LABELS)
    before = read(path) if os.path.exists(path) else b""
    with quiet():
        response = client.post(url, data=body, content_type=mimetype)
    assert response.status_code < 500, (response.status_code, response.get_data()[:200])
    assert response.is_json and isinstance(response.json, dict)
    after = read(path) if os.path.exists(path) else b""
    assert after.startswith(before)
    added = after[len(before):]
    if response.status_code >= 400 or not added:
        assert added == b""
        return
    assert added.count(b"\n") == 1 and added.endswith(b"\n")
    record = json.loads(added)
    queries = C.read_queries(web_run)
    if record.get("undo") is True:
        assert record["query_id"] in queries
    else:
        assert C.parse_label(record, queries) is None


def test_a_deeply_nested_body_is_a_400_not_a_500(web_run):
    client = create_app()(web_run).test_client()
    for url in ("/api/answer", "/api/undo"):
        response = client.post(url, data=b"[" * 3000, content_type="application/json")
        assert response.status_code == 400 and response.is_json


def web_pages_answer(run, labels_bytes, queries_bytes):
    """Write these bytes as labels.jsonl and queries.jsonl of run, open the labeler on it, return the status
    codes of its read-only API calls."""
    write(os.path.join(run, C.LABELS), labels_bytes)
    write(os.path.join(run, C.QUERIES), queries_bytes)
    with quiet():
        try:
            client = create_app()(run).test_client()
        except C.UserError as e:  # labels of queries that are not there: refused in one sentence, as elsewhere
            assert "not in queries.jsonl" in str(e) and "\n" not in str(e)
            return []
        return [client.get(url).status_code for url in ("/api/next?labeler=ann", "/api/status?labeler=ann",
                                                        "/api/metrics", "/")]


shallow_junk = junk.filter(lambda b: b.count(b"[") + b.count(b"{") < 500)  # deep nesting: its own test below


@SETTINGS
@given(shallow_junk, shallow_junk)
def test_no_file_content_crashes_the_labelers_pages(web_run, labels_bytes, queries_bytes):
    with run_dir() as run:
        shutil.copy(os.path.join(web_run, C.CONFIG), os.path.join(run, C.CONFIG))
        assert all(code < 500 for code in web_pages_answer(run, labels_bytes, queries_bytes))


def test_a_deeply_nested_line_does_not_crash_the_labelers_pages(web_run):
    with run_dir() as run:
        shutil.copy(os.path.join(web_run, C.CONFIG), os.path.join(run, C.CONFIG))
        assert all(code < 500 for code in web_pages_answer(run, b"[" * 3000 + b"\n", b"{" * 3000 + b"\n"))
