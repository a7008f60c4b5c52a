"""The web console in a real headless Chromium against the embedded stack.

Debian's Chromium and chromedriver are driven by selenium with the driver's
path given, so Selenium Manager never tries to download one. The browser is a
subprocess pytest-socket cannot guard: its flags switch off every networking
feature beyond what the page asks for, and its resolver maps every host name
but 127.0.0.1 to nothing. The screenshots in docs/local.md are made here (`make screenshots`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeks.console.app import serve_local
from sdeks.console.server import ConsoleServer
from tests.e2e.test_pipeline import envelope, new_id, run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Where the screenshots go: `make screenshots` sets docs/img (the ones docs/local.md
#: shows); a plain test run writes them to a temporary folder, leaving the checkout as is.
SHOTS = Path(os.environ.get("SDEKS_SCREENSHOTS_DIR") or tempfile.mkdtemp(prefix="console-shots-"))
WAIT_S = 120

#: No proxy, no background traffic, no updates, sync, metrics, translation or safe
#: browsing lookups; every host name except 127.0.0.1 resolves to nothing.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
    "--no-proxy-server",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--safebrowsing-disable-auto-update",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"CI must run the browser tests, but {missing} are missing (.ci/run installs them)"
        )
    pytest.skip(
        f"{' and '.join(missing)} not installed: apt-get install -y chromium chromium-driver"
    )


@pytest.fixture(scope="module")
def console(local) -> Iterator[ConsoleServer]:
    server = serve_local(local, port=0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[object]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, predicate, timeout_s: float = WAIT_S, what: str = "condition"):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def guarded(d):
        try:
            return predicate(d)
        except StaleElementReferenceException:  # the page re-renders every poll
            return False

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(guarded, message=what)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def row_status(driver, task_id: str) -> str | None:
    rows = all_css(driver, f'#tasks-table tr[data-id="{task_id}"]')
    return rows[0].get_attribute("data-status") if rows else None


def image_loaded(driver, selector: str) -> bool:
    images = all_css(driver, selector)
    return bool(images) and all(
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
        for i in images
    )


def test_console_task_list_loads(console, browser, client):
    task_id = new_id("listed")
    assert run(client, [envelope(task_id)])[task_id].status == "succeeded"
    browser.get(console.url + "#/tasks")
    wait(browser, lambda d: row_status(d, task_id) == "succeeded", what="the task in the list")
    row = css(browser, f'#tasks-table tr[data-id="{task_id}"]')
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[0] == task_id
    assert cells[4] == "sdruntime" and cells[5] == "tiny-sd15"
    assert cells[9] == "1"  # one image
    # the status filter hides it, the runtime filter keeps it
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#filter-status")).select_by_value("failed")
    wait(browser, lambda d: row_status(d, task_id) is None, what="filtered out")
    Select(css(browser, "#filter-status")).select_by_value("")
    Select(css(browser, "#filter-runtime")).select_by_value("sdruntime")
    wait(browser, lambda d: row_status(d, task_id) == "succeeded", what="filtered in")
    Select(css(browser, "#filter-runtime")).select_by_value("")


def test_console_fleet_shows_queues_and_the_models_a_pod_holds(console, browser, local):
    browser.get(console.url + "#/fleet")
    # The view re-renders on every poll: each element is read inside `wait`, which
    # retries when a re-render replaced it between finding and reading.
    queue_row = '#fleet-queues tr[data-runtime="sdruntime"]'
    dlq = wait(browser, lambda d: css(d, queue_row).find_element("css selector", ".dlq").text)
    assert dlq == "0"
    assert all_css(browser, '#fleet-queues tr[data-runtime="(catch-all)"]')
    card = wait(
        browser,
        lambda d: next((e.text for e in all_css(d, '.pod[data-runtime="sdruntime"]')), None),
        what="pod card",
    )
    assert local.pods["sdruntime"][0].url in card
    assert "tiny-sd15" in card  # the default model, warm in RAM


def test_console_submit_shows_progress_then_image(console, browser, local):
    from selenium.webdriver.support.ui import Select

    browser.get(console.url + "#/submit")
    wait(browser, lambda d: len(all_css(d, "#form-model option")) > 1, what="models listed")
    Select(css(browser, "#form-runtime")).select_by_value("sdruntime")
    Select(css(browser, "#form-model")).select_by_value("tiny-sd15")
    css(browser, "#form-prompt").send_keys("a lighthouse at dusk <b>not bold</b>")
    for field, value in {"width": "128", "height": "128", "steps": "40", "seed": "42"}.items():
        box = css(browser, f"#form-{field}")
        box.clear()
        box.send_keys(value)
    css(browser, "#submit-button").click()

    wait(browser, lambda d: d.current_url.split("#/task/")[-1].startswith("console-"), what="task")
    task_id = browser.current_url.split("#/task/")[-1]
    # progress first: the bar and "step i of n" while it runs
    wait(
        browser,
        lambda d: (
            css(d, "#task-progress").is_displayed()
            and "step" in css(d, "#task-progress .label").text
            and not css(d, "#task-progress .label").text.startswith("step 0 ")
        ),
        what="progress while running",
    )
    label = css(browser, "#task-progress .label").text
    done, total = (int(x) for x in label.split()[1:4:2])
    assert 0 < done <= total == 40
    assert "ETA" in label
    # then its image, through a presigned S3 URL the browser loads itself
    wait(browser, lambda d: css(d, "#task-status").text == "succeeded", what="succeeded")
    wait(browser, lambda d: image_loaded(d, "#task-images img.thumb"), what="thumbnail loaded")
    thumb = css(browser, "#task-images img.thumb")
    assert "X-Amz-Signature=" in thumb.get_attribute("src")
    assert f"{task_id}-1.png" in thumb.get_attribute("src")
    infotext = css(browser, "#task-infotext").text
    assert "a lighthouse at dusk <b>not bold</b>" in infotext  # shown as text, never HTML
    assert "Steps: 40" in infotext and "Seed: 42" in infotext
    assert all_css(browser, "#task-infotext b") == []
    assert css(browser, "#task-error").is_displayed() is False
    browser.set_window_size(1280, 1000)
    browser.save_screenshot(str(SHOTS / "console-task.png"))
    browser.set_window_size(1280, 860)

    thumb.click()
    wait(browser, lambda d: image_loaded(d, "#lightbox img"), what="full size")
    width = browser.execute_script("return document.querySelector('#lightbox img').naturalWidth")
    assert width == 128
    css(browser, "#lightbox").click()

    browser.get(console.url + "#/tasks")
    wait(browser, lambda d: row_status(d, task_id) == "succeeded", what="listed")


def test_console_form_refuses_a_bad_field_before_publishing(console, browser):
    browser.get(console.url + "#/submit")
    wait(browser, lambda d: len(all_css(d, "#form-runtime option")) > 0, what="form ready")
    box = css(browser, "#form-width")
    box.clear()
    box.send_keys("100")
    css(browser, "#submit-button").click()
    wait(browser, lambda d: "invalid_form" in css(d, "#submit-result").text, what="form error")
    assert "`width` must be a multiple of 8" in css(browser, "#submit-result").text
    assert "invalid" in css(browser, "#form-width").get_attribute("class")
    assert "#/submit" in browser.current_url


def test_console_failed_task_shows_its_error_code(console, browser, client):
    task_id = new_id("broken")
    body = envelope(task_id, alwayson_scripts={"sd_model_checkpoint": "no-such-model"})
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    browser.get(console.url + "#/tasks")
    wait(browser, lambda d: row_status(d, task_id) == "failed", what="failed in the list")
    code = css(browser, f'#tasks-table tr[data-id="{task_id}"] .error-code')
    assert code.text == callback.error.code == "model_not_found"

    browser.get(console.url + f"#/task/{task_id}")
    wait(browser, lambda d: css(d, "#task-error-code").text == "model_not_found", what="error")
    assert "no-such-model" in css(browser, "#task-error-message").text
    assert '"status": "failed"' in browser.execute_script(
        "return document.querySelector('#task-callback').textContent"
    )
    assert css(browser, "#cancel-button").is_displayed() is False


def test_console_cancel_stops_a_queued_and_a_running_task(console, browser, client):
    running_id, queued_id = new_id("stopme"), new_id("waiting")
    body = envelope(running_id, width=256, height=256, steps=150, batch_size=2, n_iter=4)
    with client.listen([running_id, queued_id]) as listener:
        client.publish(body, runtime="sdruntime")
        browser.get(console.url + f"#/task/{running_id}")
        wait(browser, lambda d: css(d, "#task-status").text == "running", what="running")
        # n_iter 4: the pod tells which image of the batch it is on
        wait(
            browser,
            lambda d: "of 4" in css(d, "#task-progress .label").text.split("image")[-1],
            what="image j of m",
        )
        # the pod's one slot is taken: this one waits in the queue
        client.publish(envelope(queued_id), runtime="sdruntime")
        # the list shows both, with the running one's bar: the picture for docs/local.md
        browser.get(console.url + "#/tasks")
        wait(browser, lambda d: row_status(d, queued_id) == "queued", what="queued in the list")
        wait(
            browser,
            lambda d: (
                "image 1 of 4"
                in (label := css(d, f'tr[data-id="{running_id}"] .progress .label').text)
                and not label.startswith("step 0 ")
            ),
            what="progress in the list",
        )
        browser.save_screenshot(str(SHOTS / "console-tasks.png"))

        browser.get(console.url + f"#/task/{queued_id}")
        wait(browser, lambda d: css(d, "#cancel-button").is_displayed(), what="cancel button")
        css(browser, "#cancel-button").click()
        wait(browser, lambda d: css(d, "#cancel-result").text == "cancelled", what="cancelled")
        wait(browser, lambda d: css(d, "#task-status").text == "cancelled", what="cancelled")

        browser.get(console.url + f"#/task/{running_id}")
        wait(browser, lambda d: css(d, "#cancel-button").is_displayed(), what="cancel button")
        css(browser, "#cancel-button").click()
        wait(browser, lambda d: "cancel requested" in css(d, "#cancel-result").text, what="asked")
        wait(browser, lambda d: css(d, "#task-status").text == "cancelled", what="cancelled")
        results = listener.wait_terminal([running_id, queued_id], timeout_s=WAIT_S)
    assert {r.status for r in results.values()} == {"cancelled"}
    assert css(browser, "#task-error-code").text == "cancelled"
    assert css(browser, "#cancel-button").is_displayed() is False
