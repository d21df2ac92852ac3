"""The web chat page in headless Chromium (Debian `chromium` + `chromium-driver`, installed by .ci/run):
a streamed answer, the thinking panel (open while thinking, folded when the answer starts), multi-turn,
model text shown as text (never HTML), and the stop button. Skipped when no browser is installed."""

import shutil
import socket
import threading
import time

import pytest
import torch
import uvicorn

from toy import CONVERSATIONS
from nanoseek.serve import ServerConfig, build_app

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="needs chromium and chromedriver (Debian: apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")

# Records, at every change of the page, (reasoning length, answer length, thinking panel open).
OBSERVE = """
window.__trace = [];
new MutationObserver(() => {
  const box = [...document.querySelectorAll('.msg.assistant')].pop();
  if (!box) return;
  window.__trace.push([box.querySelector('.reasoning').textContent.length,
                       box.querySelector('.answer').textContent.length,
                       box.querySelector('details.thinking').open]);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(toy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app, scheduler = build_app(toy, config=ServerConfig(model_name="toy"))
    engine = scheduler.engine
    step = engine.step

    def slow_step():  # ~20 ms per token, so the browser sees the stream and can stop it
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", scheduler
    server.should_exit = True
    thread.join(10)
    scheduler.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    except Exception as e:  # an environment problem (a browser that cannot start), not the page's
        pytest.skip(f"chromium did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    yield driver
    driver.quit()


def send(driver, text):
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_reply(driver):
    return driver.execute_script("""
        const box = [...document.querySelectorAll('.msg.assistant')].pop();
        return {answer: box.querySelector('.answer').textContent,
                reasoning: box.querySelector('.reasoning').textContent,
                open: box.querySelector('details.thinking').open,
                hidden: box.querySelector('details.thinking').hidden,
                finish: box.querySelector('.finish').textContent,
                elements: box.querySelector('.answer').children.length};""")


def wait_idle(driver, timeout=60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "send").is_enabled())


def test_streamed_answer_with_a_thinking_panel(browser, server):
    url, _ = server
    browser.get(url)
    browser.execute_script(OBSERVE)
    send(browser, "hi")
    wait_idle(browser)
    _, thought, answer = CONVERSATIONS[0]
    reply = last_reply(browser)
    assert (reply["answer"], reply["reasoning"]) == (answer, thought), reply
    assert not reply["hidden"] and not reply["open"]  # folded once the answer started
    trace = browser.execute_script("return window.__trace")
    assert any(r > 0 and a == 0 and is_open for r, a, is_open in trace)  # open while thinking
    assert len({a for _, a, _ in trace if 0 < a < len(answer)}) > 1  # the answer arrived in pieces
    user = browser.execute_script("return document.querySelector('.msg.user').textContent")
    assert user == "hi"


def test_multi_turn_text_is_never_html(browser, server):
    from selenium.webdriver.common.by import By
    browser.find_element(By.ID, "reset").click()
    browser.execute_script("""
        window.__bodies = [];
        const fetch0 = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body) window.__bodies.push(JSON.parse(init.body));
          return fetch0(url, init);
        };""")
    send(browser, "html?")
    wait_idle(browser)
    reply = last_reply(browser)
    assert reply["answer"] == CONVERSATIONS[3][2] and reply["elements"] == 0  # <i>, <script> stay text
    browser.execute_script("document.getElementById('max-tokens').value = '8'")
    send(browser, "<b>more</b>")
    wait_idle(browser)
    assert browser.execute_script("return [...document.querySelectorAll('.msg.user')].pop().children.length") == 0
    bodies = browser.execute_script("return window.__bodies")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "html?"},
                                      {"role": "assistant", "content": CONVERSATIONS[3][2]},
                                      {"role": "user", "content": "<b>more</b>"}]
    assert bodies[-1]["stream"] is True


def test_stop_button_cancels_the_generation(browser, server):
    from selenium.webdriver.common.by import By
    url, scheduler = server
    browser.find_element(By.ID, "reset").click()
    browser.execute_script("""
        document.getElementById('max-tokens').value = '400';
        const fetch1 = window.fetch;  // a reply that runs on (the toy model would stop early)
        window.fetch = (url, init) => {
          if (init && init.body) init = {...init, body: JSON.stringify({...JSON.parse(init.body), ignore_eos: true})};
          return fetch1(url, init);
        };""")
    send(browser, "the sea the sea")
    time.sleep(0.5)
    browser.find_element(By.ID, "stop").click()
    wait_idle(browser)
    assert last_reply(browser)["finish"] == "stopped"
    deadline = time.time() + 10
    while scheduler.in_flight and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.in_flight == 0  # the server cancelled the request when the page hung up
