"""The web page in headless Chromium: upload an image, ask, get an answer; generate and see it in the gallery."""

import shutil
import tempfile

import pytest

from conftest import OFFICIAL_TINY

selenium = pytest.importorskip("selenium")
pytest.importorskip("uvicorn")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:  # .ci/run installs both (apt: chromium chromium-driver)
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import Server, janus  # noqa: E402,F401  (the module-scoped tiny model fixture)
from januskit.serve.app import Settings  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_page_chat_and_gallery(janus, browser):  # noqa: F811
    server = Server(janus, Settings(model_name="tiny"))
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "chat-image").send_keys(str(OFFICIAL_TINY / "image_0.png"))
        browser.find_element(By.ID, "chat-text").send_keys("How many shapes are there?")
        browser.find_element(By.ID, "chat-send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        assert answer.startswith("janus:") and "[error]" not in answer
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the uploaded image is shown
        browser.find_element(By.ID, "gen-prompt").send_keys("a red circle")
        browser.find_element(By.ID, "gen-go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.generated")) == 2)
        src = browser.find_element(By.CSS_SELECTOR, "#gallery img.generated").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        w = browser.execute_script("return document.querySelector('#gallery img.generated').naturalWidth")
        assert w == 64
    finally:
        server.stop()
