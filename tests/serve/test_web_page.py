"""The web page at / in a real headless browser (Debian's chromium, driven by Selenium and chromedriver).

Generate an image and see it appear, edit it, drop an image, ask a question and see the answer, and
see a mistake explained in plain words. `.ci/run` installs chromium and chromium-driver with apt-get;
elsewhere the test is skipped, saying what to install.
"""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from serve_helpers import ServerProcess, png_bytes

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (a test dependency) is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow  # a real browser against a real server

WAIT = 180  # seconds; the CI machine is small and may be busy


def _browser_paths() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser here: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does this where apt-get works)")
    return browser, driver


@pytest.fixture(scope="module")
def page_server():
    """The embedded default model (it answers questions in words), with an API key."""
    server = ServerProcess("--model", "default", "--max-side", "256", "--batch-wait-ms", "5")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium session (no network needed: the page is self-contained)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000", "--disable-extensions", "--no-first-run",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # An installed browser that fails to start is a failure, not a skip: CI installs it to be used.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = WAIT):
    """Wait for `condition`; a timeout reports what the page showed (status, error, progress, answer)."""
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        shown = driver.execute_script(
            "const t = (id) => { const e = document.getElementById(id); return e ? e.textContent.trim() : null; };"
            "return {status: t('status'), error: t('error'), progress: t('progress-text'), answer: t('answer'),"
            "        generated: document.querySelectorAll('#gen-results img').length,"
            "        edited: document.querySelectorAll('#edit-results img').length};")
        raise AssertionError(f"the page did not reach the expected state in {timeout} s; it showed {shown}") from None


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def _open_page(driver, server, **settings: str) -> None:
    """Open the page, give it the server's key and the settings (set-<name>: value), wait until ready."""
    driver.get(server.url)
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    _set(driver, "set-key", server.api_key)
    for name, value in settings.items():
        _set(driver, f"set-{name}", value)
    _wait(driver, ec.text_to_be_present_in_element((By.ID, "status"), "ready"))


def _error_text(driver) -> str:
    element = driver.find_element(By.ID, "error")
    return element.text if "shown" in (element.get_attribute("class") or "") else ""


def test_generate_edit_drop_and_ask_in_the_browser(page_server, browser, tmp_path):
    driver = browser
    driver.get(page_server.url)
    assert driver.title == "unipic"
    # Without the key the page says it needs one; with it, the model shows as ready.
    _wait(driver, ec.text_to_be_present_in_element((By.ID, "status"), "API key"))
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    _set(driver, "set-key", page_server.api_key)
    _set(driver, "set-size", "64x64")
    _set(driver, "set-steps", "6")
    _set(driver, "set-seed", "3")
    _wait(driver, ec.text_to_be_present_in_element((By.ID, "status"), "ready"))

    # Watch the progress indication: it must be shown while the model works.
    driver.execute_script("""
        window.progressSeen = false;
        new MutationObserver(() => { if (document.getElementById('progress').classList.contains('shown'))
            window.progressSeen = true; }).observe(document.getElementById('progress'), {attributes: true});""")

    # 1. Generate, and see the image appear with a download link.
    driver.find_element(By.ID, "prompt").send_keys("a red circle left of a blue star")
    driver.find_element(By.ID, "generate-btn").click()
    image = _wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, "#gen-results .card img")))
    _wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    assert driver.execute_script("return window.progressSeen") is True
    link = driver.find_element(By.CSS_SELECTOR, "#gen-results .card a[download]")
    assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download").endswith(".png")
    assert "seed 3" in driver.find_element(By.CSS_SELECTOR, "#gen-results .card .meta").text
    assert _error_text(driver) == ""

    # 2. Edit the generated image.
    driver.find_element(By.XPATH, "//div[@id='gen-results']//button[text()='Edit this']").click()
    _wait(driver, ec.visibility_of_element_located((By.ID, "edit-preview")))
    driver.find_element(By.ID, "edit-instruction").send_keys("Change the color of the circle to green.")
    driver.find_element(By.ID, "edit-btn").click()
    edited = _wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, "#edit-results .card img")))
    _wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", edited))
    assert _error_text(driver) == ""

    # 3. Drop an image onto the edit area (a drop event carrying a PNG file).
    driver.execute_script("""
        const canvas = document.createElement('canvas'); canvas.width = 48; canvas.height = 32;
        const ctx = canvas.getContext('2d'); ctx.fillStyle = '#00f'; ctx.fillRect(0, 0, 48, 32);
        canvas.toBlob((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
          document.getElementById('edit-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer,
                                                                                     bubbles: true}));
        }, 'image/png');""")
    _wait(driver, lambda d: d.execute_script(
        "const i = document.getElementById('edit-preview'); return i && i.complete && i.naturalWidth === 48"))

    # 4. Ask about an uploaded image and see the answer.
    picture = tmp_path / "question.png"
    picture.write_bytes(png_bytes(Image.new("RGB", (128, 128), "white")))
    driver.find_element(By.ID, "tab-ask").click()
    driver.find_element(By.ID, "ask-file").send_keys(str(picture))
    _wait(driver, ec.visibility_of_element_located((By.ID, "ask-preview")))
    driver.find_element(By.ID, "ask-question").send_keys("How many circles are there?")
    driver.find_element(By.ID, "ask-btn").click()
    _wait(driver, lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "true")
    answer = driver.find_element(By.ID, "answer").text.strip()
    assert answer and _error_text(driver) == "", (answer, _error_text(driver))

    # 5. A mistake is explained in plain words.
    driver.find_element(By.ID, "tab-generate").click()
    _set(driver, "set-size", "100x100")
    driver.find_element(By.ID, "generate-btn").click()
    _wait(driver, lambda d: _error_text(d) != "")
    assert "multiples of 16" in _error_text(driver)
    _set(driver, "set-key", "wrong")
    _set(driver, "set-size", "64x64")
    driver.find_element(By.ID, "generate-btn").click()
    _wait(driver, lambda d: "API key" in _error_text(d))


def test_the_page_composes_several_images_with_a_unipic3_model(browser, tmp_path):
    """Choose a first image and two more, edit: the page sends three image[] parts and shows the result;
    a seventh image is refused on the page itself."""
    server = ServerProcess("--model", "unipic3-tiny-random", "--variant", "dmd", "--batch-wait-ms", "5")
    try:
        files = []
        for index, size in enumerate([(96, 64), (64, 64), (48, 80)]):
            files.append(tmp_path / f"in{index}.png")
            Image.new("RGB", size, (40 * index, 90, 200)).save(files[-1])
        driver = browser
        _open_page(driver, server, steps="2")
        driver.find_element(By.ID, "tab-edit").click()
        driver.find_element(By.ID, "edit-file").send_keys(str(files[0]))
        _wait(driver, ec.visibility_of_element_located((By.ID, "edit-preview")))
        driver.find_element(By.ID, "extra-file").send_keys("\n".join(str(f) for f in files[1:]))
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#extra-thumbs img")) == 2)
        # The request the page sends: three image[] parts, the chosen order kept.
        driver.execute_script("""
            window.sentParts = null; const original = window.fetch;
            window.fetch = (url, init) => { if (init && init.body instanceof FormData)
                window.sentParts = [...init.body.entries()].filter(([k]) => k.startsWith('image')).map(([k, v]) => k + ':' + v.name);
              return original(url, init); };""")
        driver.find_element(By.ID, "edit-instruction").send_keys("Put the other pictures into the first.")
        driver.find_element(By.ID, "edit-btn").click()
        edited = _wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, "#edit-results .card img")))
        _wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", edited))
        assert driver.execute_script("return window.sentParts") == [
            "image[]:image-1.png", "image[]:image-2.png", "image[]:image-3.png"]
        assert _error_text(driver) == ""
        driver.find_element(By.ID, "extra-file").send_keys("\n".join([str(files[1])] * 4))
        _wait(driver, lambda d: "At most 6" in _error_text(d))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#extra-thumbs img")) == 5
    finally:
        server.stop()


def test_page_keeps_the_key_for_the_tab_orders_by_seed_and_tells_cancel_from_error(browser, tmp_path):
    """Issue 41, item 8 and the key of item 1: the API key is kept in sessionStorage (not forever), a
    request's images read in seed order, "Cancelled." is a notice rather than an error, and an error
    is cleared when the user moves to another tab."""
    server = ServerProcess("--model", "shapes-oracle", "--batch-wait-ms", "5")
    try:
        driver = browser
        _open_page(driver, server, n="3", seed="7", size="128x128")
        stored = driver.execute_script("return [localStorage.getItem('unipic.set-key'), "
                                       "sessionStorage.getItem('unipic.set-key')]")
        assert stored == [None, server.api_key]
        driver.find_element(By.ID, "tab-generate").click()
        driver.find_element(By.ID, "prompt").send_keys("a photo of two stars")
        driver.find_element(By.ID, "generate-btn").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gen-results .card")) == 3)
        metas = [m.text for m in driver.find_elements(By.CSS_SELECTOR, "#gen-results .card .meta")]
        assert [m.rsplit("seed ", 1)[1] for m in metas] == ["7", "8", "9"], metas
        # Cancel at once: a notice, not an error.
        driver.execute_script("document.getElementById('generate-btn').click();"
                              "document.getElementById('cancel-btn').click();")
        _wait(driver, lambda d: d.find_element(By.ID, "notice").text == "Cancelled.")
        assert _error_text(driver) == ""
        # A mistake shows an error; moving to another tab clears it.
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "generate-btn").click()
        _wait(driver, lambda d: _error_text(d) != "")
        driver.find_element(By.ID, "tab-edit").click()
        assert _error_text(driver) == ""
    finally:
        server.stop()
