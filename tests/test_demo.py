"""``pure-lite demo``: the page driven by a real browser (Debian's chromium through Selenium) and through
Gradio's API, against one server started as a user starts it, with the shipped PURE-tiny.

Budget: one server and one browser for the module; on the server, the example at scale 2 (two tiles in one
batch), a 32x32 crop (one tile) twice and once cancelled after a few steps; the crop once in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite.cli import main
from pure_lite.prompt import parse_degradation_levels

EXAMPLE = Path(__file__).parents[1] / "examples" / "images" / "photo.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
START_TIMEOUT_S = 300  # importing Gradio and loading PURE-tiny on a busy 2-core machine
RESTORE_TIMEOUT_S = 600


def test_import_pure_lite_and_the_cli_do_not_import_gradio():
    code = ("import sys, pure_lite, pure_lite.cli; pure_lite.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_without_gradio_is_one_error_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "pure_lite.demo_page", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", "unset")  # serve() points it at its own folder; put it back after
    started = time.perf_counter()
    rc = main(["demo", "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert 'pip install -e ".[demo]"' in err and "Traceback" not in err
    assert time.perf_counter() - started < 5  # said before the model is loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, tmpdir: Path):
        self.url, self.process, self.log, self.tmpdir = url, process, log, tmpdir

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``pure-lite demo`` on a free localhost port, its temporary files under a folder of its own (TMPDIR)."""
    pytest.importorskip("gradio", reason="pure-lite demo needs the [demo] extra")
    root = tmp_path_factory.mktemp("demo_server")
    tmpdir, log = root / "tmp", root / "server.log"
    tmpdir.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "pure_lite.cli", "demo", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}/", process, log, tmpdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"pure-lite demo exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"pure-lite demo did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
        time.sleep(1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's chromium, headless, with a fresh profile; downloads go to ``browser.downloads``."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium ([demo] extra)")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    root = tmp_path_factory.mktemp("browser")
    downloads = root / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={root / 'profile'}",
                "--window-size=1280,1300"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _open_page(driver, server):
    from selenium.webdriver.common.by import By

    driver.get(server.url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), 120, "the page")


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _upload(driver, path: Path) -> str:
    """Put ``path`` into the photo field; returns the status line the page answers with."""
    from selenium.webdriver.common.by import By

    if not driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"):  # a photo is there: clear it first
        driver.find_element(By.CSS_SELECTOR, '#photo button[aria-label="Clear"]').click()
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), 30, "the cleared photo field")
    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))
    return _wait(lambda: (t := _text(driver, "status")) and path.name in t and t, 60, f"the page to check {path.name}")


def _page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def _restore(driver, output_name: str) -> set[str]:
    """Press Restore and wait for the download link of ``output_name``; returns the progress lines seen meanwhile."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "restore").click()
    seen: set[str] = set()

    def done():
        seen.update(line for line in _page_text(driver).splitlines() if line.startswith("tile "))
        return [a for a in driver.find_elements(By.CSS_SELECTOR, "#download a[download]")
                if a.get_attribute("download") == output_name]

    _wait(done, RESTORE_TIMEOUT_S, f"{output_name} to be offered")
    return seen


def _download(driver, output_name: str) -> Image.Image:
    """Click the page's download link and read the file the browser saved."""
    from selenium.webdriver.common.by import By

    target = driver.downloads / output_name
    if target.exists():
        target.unlink()
    driver.find_element(By.CSS_SELECTOR, f'#download a[download="{output_name}"]').click()
    _wait(lambda: target.is_file() and not list(driver.downloads.glob("*.crdownload")), 60, f"the download of {output_name}")
    with Image.open(target) as image:
        image.load()
        return image


def _crop(tmp_path: Path) -> Path:
    """A 32x32 corner of the example: one PURE-tiny tile at scale 4, the cheapest restoration."""
    path = tmp_path / "corner.png"
    with Image.open(EXAMPLE) as image:
        image.crop((0, 0, 32, 32)).save(path)
    return path


def test_browser_restores_the_example_and_shows_what_the_model_wrote(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open_page(browser, server)
    assert "PURE-tiny" in _text(browser, "model") and "demonstration" in _text(browser, "model")
    assert "96×64 pixels" in _upload(browser, EXAMPLE)
    scale = browser.find_element(By.CSS_SELECTOR, "#scale input[type=number]")
    scale.clear()
    scale.send_keys("2", Keys.TAB)  # 192x128: two tiles, decoded in one batch
    progress = _restore(browser, "photo_restored.png")

    restored = _download(browser, "photo_restored.png")
    assert restored.size == (2 * 96, 2 * 64)
    assert "Restored photo.png to 192×128 in 2 tile(s)" in _text(browser, "status")
    wrote = _text(browser, "model-text")
    assert "Degradation:" in wrote
    # PURE-tiny answers in its training template: every degradation type gets a level
    assert set(parse_degradation_levels(wrote)) == {"noise", "blur", "jpeg"}, wrote
    assert "image codes per second" in _text(browser, "timings")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#comparison img")) == 2  # before and after
    assert browser.find_elements(By.CSS_SELECTOR, "#entropy img")
    # the bar counted the tiles and estimated the time left before they were done
    assert any(line.startswith("tile ") and " of 2, about " in line and " left" in line for line in progress), progress
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert Image.open(tmp_path / "demo.png").size[0] > 0


def test_browser_reports_a_non_image_and_after_it_and_a_cancel_the_next_restoration_works(server, browser, tmp_path):
    _open_page(browser, server)
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file with an image's name\n")
    status = _upload(browser, fake)
    assert status.startswith("error:") and "notes.png: not a readable image" in status, status

    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "restore").click()  # restoring it anyway: the same message, as an error box
    _wait(lambda: any("notes.png: not a readable image" in t.text
                      for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")),
          60, "the error box")

    crop = _crop(tmp_path)
    assert "32×32 pixels" in _upload(browser, crop)
    browser.find_element(By.ID, "restore").click()  # cancelled once its tile is being decoded
    _wait(lambda: "tile 1 of 1" in _page_text(browser), RESTORE_TIMEOUT_S, "the progress bar")
    browser.find_element(By.ID, "cancel").click()
    _wait(lambda: _text(browser, "status") == "Cancelled.", 60, "the cancellation")
    assert not browser.find_elements(By.CSS_SELECTOR, "#download a[download]")

    _restore(browser, "corner_restored.png")
    assert _download(browser, "corner_restored.png").size == (128, 128)


def test_api_restores_the_same_pixels_as_restorer(server, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from pure_lite import Restorer

    crop = _crop(tmp_path)
    client = gradio_client.Client(server.url, download_files=str(tmp_path / "api"), verbose=False)
    comparison, png, entropy, wrote, timings, status = client.predict(
        photo=gradio_client.handle_file(str(crop)), seed=0, api_name="/restore")
    local = Restorer.from_pretrained().restore(crop, seed=0)
    with Image.open(png) as served:
        assert served.size == (128, 128)
        np.testing.assert_array_equal(np.asarray(served.convert("RGB")), np.asarray(local.image))
    assert local.degradation in wrote
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(Exception, match="notes.png: not a readable image"):
        client.predict(photo=gradio_client.handle_file(str(fake)), api_name="/restore")


def test_stopping_the_server_removes_its_temporary_files(server):
    """Run last: it stops the module's server. Uploads and outputs lived in one folder under TMPDIR, now gone
    (ONNX Runtime leaves a '.ses' file of its own in TMPDIR, as it does for any program that imports it)."""
    folders = list(server.tmpdir.glob("pure-lite-demo-*"))
    assert len(folders) == 1 and any(p.is_file() for p in folders[0].rglob("*")), folders
    assert server.stop() == 0
    assert sorted(p.name for p in server.tmpdir.iterdir() if p.name != ".ses") == []
    log = server.log.read_text()  # Gradio prints a traceback for each error box; nothing else may raise
    assert log.count("Traceback") == log.count("gradio.exceptions.Error: "), log
