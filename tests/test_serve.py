"""avatar serve: the HTTP surface in-process, and the whole page in Debian's headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from avatar.serve.app import App, make_server

from .helpers import SHARED_DATA


@pytest.fixture
def server():
    app = App(max_upload_mb=1.0)
    httpd = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", app
    httpd.shutdown()
    httpd.server_close()
    app.close()
    assert not app.root.exists()  # uploads and outputs go with the server


def call(url: str, data: bytes | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, dict | bytes]:  # fmt: skip
    """A request as the page makes it (POSTs carry its X-Avatar header)."""
    page = {"X-Avatar": "1"} if data is not None else {}
    req = urllib.request.Request(url, data=data, method=method, headers={**page, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, body = res.status, res.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def wait_for(base: str, job_id: str, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = next(j for j in call(base + "/api/jobs")[1] if j["id"] == job_id)
        if job["status"] in ("done", "error"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_page_and_its_files_are_served_locally(server):
    base, _ = server
    status, page = call(base + "/")
    assert status == 200
    html = page.decode()
    for src in ("/static/viewer.js", "/static/app.js", "/static/style.css"):
        assert src in html
        assert call(base + src)[0] == 200
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    viewer = call(base + "/static/viewer.js")[1]
    assert b"AvatarViewer" in viewer and len(viewer) > 100_000
    assert call(base + "/static/THIRD_PARTY_LICENSES.txt")[0] == 200
    for bad in ("/static/../app.py", "/static/%2e%2e%2fapp.py", "/files/0001/../../x", "/nope"):
        assert call(base + bad)[0] == 404, bad


def test_bad_requests_get_clear_messages_and_the_server_lives(server, tmp_path):
    base, app = server
    status, body = call(base + "/api/upload?name=a.png", b"")
    assert status == 400 and body["error"] == "a.png: the file is empty"
    for name in ("avatar.py", "numpy.so", "x.pyc", "notes.txt", "-h"):  # nothing importable
        status, body = call(base + f"/api/upload?name={name}", b"import os")
        assert status == 400 and "upload a photo or a sound file" in body["error"], name
    status, body = call(base + "/api/upload?name=big.wav", b"0" * (2 * 2**20))
    assert status == 413 and "the limit is 1 MB" in body["error"]
    status, body = call(base + "/api/jobs", b"not json", "POST")
    assert status == 400 and "not JSON" in body["error"]
    status, body = call(base + "/api/jobs", json.dumps({"kind": "dance"}).encode(), "POST")
    assert status == 400 and "create, drive or converse" in body["error"]
    status, body = call(base + "/api/jobs", json.dumps({"kind": "drive"}).encode(), "POST")
    assert status == 400 and "create one first" in body["error"]
    status, body = call(base + "/api/jobs", json.dumps({"kind": "create", "photo": "u9"}).encode())
    assert status == 400 and "upload a file first" in body["error"]
    # a file that is not a photo: the job fails with the CLI's own message, naming the file
    uid = call(base + "/api/upload?name=notes.png", b"hello, not an image")[1]["upload"]
    assert len(uid) >= 16  # unguessable
    job = call(base + "/api/jobs", json.dumps({"kind": "create", "photo": uid}).encode())[1]
    job = wait_for(base, job["id"])
    assert job["status"] == "error"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.png").write_bytes(b"hello, not an image")
    cli = subprocess.run([sys.executable, "-m", "avatar", "create", "in/notes.png", "-o",
                          "a.avatar"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert job["error"] == cli.stderr.strip().removeprefix("avatar: error: ")
    assert call(base + "/api/avatars")[1] == []
    assert call(base + "/")[0] == 200  # still serving


def test_only_the_page_of_this_server_is_answered(server):
    base, _ = server
    port = base.rsplit(":", 1)[1]
    # another site's page: a cross-site form or no-cors fetch cannot add the page's header
    status, body = call(base + "/api/upload?name=a.wav", b"RIFF", headers={"X-Avatar": ""})
    assert status == 403 and "X-Avatar" in body["error"]
    # DNS rebinding: the browser sends the attacker's host name
    status, _ = call(base + "/api/avatars", headers={"Host": f"evil.example:{port}"})
    assert status == 403
    assert call(base + "/api/avatars", headers={"Host": f"localhost:{port}"})[0] == 200


def test_a_queued_job_cancelled_never_starts_and_a_running_one_stops(tmp_path):
    """The queue's jobs: cancelling the running one kills its process at once (not after its
    30 s), a cancelled queued one never starts, and the queue goes on with the next."""
    from avatar.serve.jobs import Job, JobQueue, Step

    child = tmp_path / "child.sh"  # stands in for `python -P -m avatar ...`: sleeps its last arg
    child.write_text('#!/bin/bash\nsleep "${@: -1}"\n')
    child.chmod(0o755)
    queue = JobQueue(python=str(child))
    try:
        jobs = [queue.submit(Job(queue.new_id(), "drive", name, [Step(name, [seconds])], tmp_path))
                for name, seconds in (("a", "30"), ("b", "30"), ("c", "0"))]  # fmt: skip
        end = time.time() + 10
        while jobs[0].status != "running" and time.time() < end:
            time.sleep(0.05)
        assert queue.cancel(jobs[1].id).status == "cancelled"
        t0 = time.time()
        assert queue.cancel(jobs[0].id).status == "cancelled"
        while jobs[2].status != "done" and time.time() < end + 10:
            time.sleep(0.05)
        assert jobs[2].status == "done" and time.time() - t0 < 10
        assert [j.status for j in jobs] == ["cancelled", "cancelled", "done"]
        assert jobs[1].started == 0 and not jobs[0].error  # never ran; stopped, not failed
        assert queue.cancel("nope") is None and queue.cancel(jobs[2].id).status == "done"
    finally:
        queue.close()


def test_cancel_over_http(server):
    base, _ = server
    status, body = call(base + "/api/jobs/0123456789ab/cancel", b"")
    assert status == 404 and body["error"] == "no such job"


def test_serve_listens_on_ipv6_loopback():
    app = App()
    try:
        httpd = make_server("::1", 0, app)
    except OSError as exc:
        app.close()
        pytest.skip(f"this machine has no IPv6 loopback ({exc})")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://[::1]:{httpd.server_address[1]}"
        assert call(base + "/api/avatars") == (200, [])
        port = httpd.server_address[1]
        assert call(base + "/api/avatars", headers={"Host": f"evil.example:{port}"})[0] == 403
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.close()


def test_serve_warns_when_open_to_the_network_and_cleans_up():
    proc = subprocess.Popen([sys.executable, "-m", "avatar", "serve", "--host", "0.0.0.0",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("avatar serve: http://0.0.0.0:")
        root = Path(proc.stdout.readline().split(" in ")[1].split(" (")[0])
        assert root.is_dir()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "warning: listening on 0.0.0.0" in err
    assert proc.returncode == 0 and not root.exists()


def chromium():
    """Debian's headless Chromium through its chromedriver (nothing downloads a browser)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (test extra)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.mark.slow
def test_the_page_creates_shows_and_drives_an_avatar_in_chromium(tmp_path):
    photo = SHARED_DATA / "person_hat_fullbody.png"
    if not photo.exists():
        pytest.skip(f"needs {photo} (../shared/data)")
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from avatar.media import write_wav

    from .test_deformer import speechlike

    speech = tmp_path / "speech.wav"  # 2 s: the drive is the page's job, not its length
    write_wav(speech, speechlike(2.0).numpy(), 16000)
    browser = chromium()
    proc = subprocess.Popen([sys.executable, "-m", "avatar", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = proc.stdout.readline().split()[2].replace("localhost", "127.0.0.1")
        browser.get(url)
        wait = WebDriverWait(browser, 300, poll_frequency=0.5)
        browser.find_element(By.ID, "photo").send_keys(str(photo))
        Select(browser.find_element(By.ID, "quality")).select_by_value("fast")
        browser.find_element(By.ID, "create").click()
        canvas = wait.until(
            lambda b: b.find_element(By.CSS_SELECTOR, ".viewer canvas[data-ready='1']")
        )
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"))
        differs = (np.abs(shot.astype(int) - 255).max(-1) > 24).mean()
        assert differs > 0.01, f"the 3D viewer is blank ({differs:.2%} of pixels off white)"
        names = [a.text for a in browser.find_elements(By.CSS_SELECTOR, ".downloads a")]
        assert names == ["avatar .zip", ".splat", "PLY", "GLB (mesh + skeleton)"]

        browser.find_element(By.ID, "audio").send_keys(str(speech))
        Select(browser.find_element(By.ID, "size")).select_by_visible_text("256")
        browser.find_element(By.ID, "drive").click()
        video = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#videos video"))
        ready = "const v = arguments[0]; return v.readyState >= 2 && v.duration > 0 && !v.error;"
        wait.until(lambda b: b.execute_script(ready, video))
        duration = browser.execute_script("return arguments[0].duration", video)
        assert duration > 1
        src = video.get_attribute("src")
        with urllib.request.urlopen(src) as res:
            data = res.read()
        import imageio.v3 as iio

        frames = iio.imread(data, extension=".mp4", index=None)
        assert frames.shape[1:] == (256, 256, 3) and len(frames) > 25

        # a bad photo: the page says what the CLI says, and the server goes on
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"hello, not an image")
        browser.find_element(By.ID, "photo").send_keys(str(bad))
        browser.find_element(By.ID, "create").click()
        error = wait.until(
            lambda b: b.find_element(By.CSS_SELECTOR, "#jobs li[data-status='error'] .error")
        )
        assert "notes.png: not an image file" in error.text

        # a job started by mistake: its cancel button stops it
        from selenium.common.exceptions import StaleElementReferenceException

        def click_cancel(b) -> bool:  # the list is drawn anew every second: retry a stale one
            try:
                b.find_element(By.CSS_SELECTOR, "#jobs li button.cancel").click()
                return True
            except StaleElementReferenceException:
                return False

        browser.find_element(By.ID, "drive").click()
        wait.until(click_cancel)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#jobs li[data-status='cancelled']"))
        assert not browser.find_elements(By.CSS_SELECTOR, "#jobs li button.cancel")
    finally:
        browser.quit()
        proc.terminate()
        proc.communicate(timeout=30)
