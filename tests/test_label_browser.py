"""Issue 3 end to end in a real browser: Debian's headless Chromium (installed by `make test`), driven by
selenium through Debian's chromedriver (no browser download), opens the labeling page served on 127.0.0.1,
waits for both clips to play, presses the left arrow, and the label appears in labels.jsonl."""
import json
import os
import threading
import time

import numpy as np
import pytest

import contract as C
import label
from test_label_web import add_queries, clip_files, make_run  # noqa: F401 (clip_files is a fixture)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver (make browser installs them)")


@pytest.fixture
def server(tmp_path, clip_files):  # noqa: F811
    from werkzeug.serving import make_server
    run = make_run(tmp_path / "run", clip_files, n_queries=2)
    httpd = make_server("127.0.0.1", 0, label.create_app(run, instructions="make the bar run right"), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield run, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    thread.join(5)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def until(condition, timeout=15.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


PLAYING = """return ["left", "right"].map(id => { const v = document.getElementById(id);
    return {time: v.currentTime, paused: v.paused, ready: v.readyState, error: v.error && v.error.code,
            visible: v.offsetWidth > 0, width: v.offsetWidth}; });"""


def both_playing(driver):
    videos = driver.execute_script(PLAYING)
    assert not any(v["error"] for v in videos), videos
    return all(v["visible"] and not v["paused"] and v["ready"] >= 2 and v["time"] > 0 for v in videos) and videos


def label_lines(run):
    return [json.loads(line) for line in open(os.path.join(run, C.LABELS))] if os.path.exists(
        os.path.join(run, C.LABELS)) else []


def test_a_person_labels_a_pair_with_the_left_arrow(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    run, url = server
    browser.get(url)
    assert "make the bar run right" in browser.find_element("id", "instructions").text
    videos = until(lambda: both_playing(browser), what="both clips to play")
    assert videos[0]["width"] == videos[1]["width"] > 100  # side by side at the same size
    assert abs(videos[0]["time"] - videos[1]["time"]) < 0.2  # started together
    until(lambda: browser.execute_script("return queue.length === 2 && !!queue[1].urls"),
          what="the next pair to be preloaded")
    labeler = browser.find_element("id", "labeler").get_attribute("value")

    browser.execute_script("const s = document.getElementById('speed'); s.value = '2';"
                           "s.dispatchEvent(new Event('change'));")
    assert browser.execute_script("return [left.playbackRate, right.playbackRate]") == [2, 2]

    ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()
    lines = until(lambda: label_lines(run), what="the label in labels.jsonl")
    assert lines == [{"query_id": 0, "choice": "left", "labeler": labeler, "time": lines[0]["time"]}]
    assert C.parse_label(lines[0], C.read_queries(run)) is None
    until(lambda: browser.execute_script("return current && current.query_id === 1") and both_playing(browser),
          what="the preloaded pair to play")

    ActionChains(browser).send_keys("u").perform()  # undo: pair 0 comes back
    until(lambda: len(label_lines(run)) == 2 and browser.execute_script("return current && current.query_id === 0"),
          what="the undo")
    assert label_lines(run)[1]["undo"] is True and C.read_labels(run) == []
    ActionChains(browser).send_keys(Keys.ARROW_UP).perform()
    until(lambda: browser.execute_script("return current && current.query_id === 1"), what="pair 1 again")
    ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()  # can't tell; now no pair is left
    until(lambda: len(label_lines(run)) == 4, what="the last label")
    assert [(x["query_id"], x["choice"]) for x in C.read_labels(run)] == [(0, "equal"), (1, "skip")]
    waiting = until(lambda: browser.find_element("id", "waiting").is_displayed()
                    and browser.find_element("id", "waiting"), what="the 'collecting new clips' state")
    assert "collecting new clips" in waiting.text
    assert not browser.find_element("id", "pair").is_displayed()  # never a blank video

    add_queries(run, [2])  # collect.py appends a pair: the page shows it by itself
    until(lambda: not browser.find_element("id", "waiting").is_displayed() and both_playing(browser),
          what="the new pair to appear")
    until(lambda: "2 answered" in browser.find_element("id", "progress").text.replace("\n", " "),
          what="the progress line")


def test_a_clicked_button_answers_once_and_undo_withdraws_it_after_a_change_of_name(server, browser):
    """A button left focused after a click would answer the next pair too when Space is pressed; and an undo
    must withdraw the answer under the name it was given with, not the name typed since."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    run, url = server
    browser.get(url)
    until(lambda: both_playing(browser), what="both clips to play")
    until(lambda: browser.execute_script("return queue.length === 2 && !!queue[1].urls"),
          what="the next pair to be preloaded")
    labeler = browser.find_element("id", "labeler").get_attribute("value")
    browser.find_element("css selector", "#buttons button[data-choice=right]").click()
    until(lambda: label_lines(run), what="the label in labels.jsonl")
    until(lambda: browser.execute_script("return current && current.query_id === 1"), what="pair 1")
    ActionChains(browser).send_keys(Keys.SPACE).send_keys(Keys.ENTER).perform()
    time.sleep(1.0)
    assert [(x["query_id"], x["choice"]) for x in label_lines(run)] == [(0, "right")]

    browser.execute_script("const n = document.getElementById('labeler'); n.value = 'alice';"
                           "n.dispatchEvent(new Event('change'));")
    ActionChains(browser).send_keys("U").perform()  # the undo key, with caps lock or shift
    until(lambda: len(label_lines(run)) == 2, what="the undo")
    assert label_lines(run)[1]["undo"] is True and label_lines(run)[1]["labeler"] == labeler
    assert C.read_labels(run) == []


def test_the_dashboard_labels_its_axes_with_round_numbers(server, browser):
    """The curves' axes are labelled at round steps (1, 2 or 5 times a power of ten), the value axis widened to
    the ticks around the data: 3.6, 560, 1117 told a person less than 0, 500, 1000."""
    run, url = server
    steps = np.linspace(0, 501760, 50).round()
    C.append_jsonl(os.path.join(run, C.METRICS), [
        {"stage": "train_policy", "time": 1.0, "step": int(s), "true_return": float(-120 + 1519 * s / steps[-1]),
         "learned_return": None} for s in steps])
    C.append_jsonl(os.path.join(run, C.METRICS), [
        {"stage": "train_reward", "time": 1.0, "labels": n, "val_accuracy": a}
        for n, a in [(125, 0.926), (212, 0.875), (500, 0.963)]])
    browser.get(url + "dashboard")

    def labels(chart, axis):
        return browser.execute_script(
            f"return [...document.querySelectorAll('#{chart} .{axis}')].map(t => t.textContent)")
    until(lambda: labels("returns", "ytick"), what="the returns chart")
    assert labels("returns", "ytick") == ["-500", "0", "500", "1000", "1500"]
    assert labels("returns", "xtick") == ["0", "200k", "400k"]  # within the steps trained
    assert labels("accuracy", "ytick") == ["0.85", "0.90", "0.95", "1.00"]
    assert labels("accuracy", "xtick") == ["200", "300", "400", "500"]
