"""The web console at / end to end, in headless Chromium (Debian's chromium + chromedriver) driven by
Selenium against a real service (tiny Llama base, a real worker). Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from slmtune import auto as auto_rule
from tests.conftest import chat_example
from tests.service.conftest import BASE, start_service, training_rows

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
                              "apt-get install chromium chromium-driver"),
]


def test_static_assets_and_helper_endpoints(tmp_path, tiny_llama_dir):
    """Without a browser: the page and its assets are served, and the wizard's two JSON helpers."""
    service = start_service(tmp_path / "home", tiny_llama_dir, workers=0)
    try:
        html = urllib.request.urlopen(service.url + "/").read().decode()
        assert "/static/console.js" in html and "<script src=\"http" not in html
        for asset in ("console.js", "console.css"):
            assert urllib.request.urlopen(f"{service.url}/static/{asset}").status == 200
        assert urllib.request.urlopen(f"{service.url}/favicon.ico").status == 200
        client = service.client("helper")
        def upload(name: str, rows: list[dict]):
            path = tmp_path / name
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            with open(path, "rb") as fh:
                return client.files.create(file=(name, fh), purpose="fine-tune")

        f = upload("t.jsonl", training_rows(12))
        auto = client.get(f"/slmtune/auto_hyperparameters?training_file={f.id}", cast_to=object)
        assert auto["auto"] == {"n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 1.0}
        # One-word answers: "auto" epochs count the answers' tokens, with the model's tokenizer, and
        # the job created on the file trains exactly that long (the examples term alone would say 3).
        g = upload("short.jsonl", [chat_example(f"Is {i} even?", "no" if i % 2 else "yes") for i in range(250)])
        counted = client.get(f"/slmtune/auto_hyperparameters?training_file={g.id}&model={BASE}", cast_to=object)
        assert counted["target_tokens"] > 250 and counted["model"] == BASE
        assert counted["auto"]["n_epochs"] == auto_rule.epochs(250, "sft", counted["target_tokens"],
                                                                 auto_rule.held_out(250)) > 3
        job = client.fine_tuning.jobs.create(model=BASE, training_file=g.id)
        assert job.hyperparameters.n_epochs == counted["auto"]["n_epochs"]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
        assert any(f"answering in {counted['target_tokens']} tokens" in m for m in events)
        # With a validation file nothing is held out: the hint and the job agree on that too.
        v = upload("v.jsonl", training_rows(12))
        validated = client.get(f"/slmtune/auto_hyperparameters?training_file={g.id}&model={BASE}"
                               f"&validation_file={v.id}", cast_to=object)
        assert validated["auto"]["n_epochs"] == auto_rule.epochs(250, "sft", validated["target_tokens"], 0)
        assert validated["steps_per_epoch"] == 63 and counted["steps_per_epoch"] == 55  # 250 or 218 rows, 4 a step
        job = client.fine_tuning.jobs.create(model=BASE, training_file=g.id, validation_file=v.id)
        assert job.hyperparameters.n_epochs == validated["auto"]["n_epochs"]
        # A large file is counted only as far as the rule looks (the event says "at least").
        big = upload("large.jsonl", [chat_example(f"Is {i} even?", "no" if i % 2 else "yes") for i in range(3000)])
        partial = client.get(f"/slmtune/auto_hyperparameters?training_file={big.id}&model={BASE}", cast_to=object)
        assert partial["target_tokens_text"] == f"at least {partial['target_tokens']}"
        assert auto_rule.tokens_enough(3000, auto_rule.held_out(3000)) <= partial["target_tokens"] < 3 * 3000
        job = client.fine_tuning.jobs.create(model=BASE, training_file=big.id)
        assert job.hyperparameters.n_epochs == auto_rule.epochs(3000) == partial["auto"]["n_epochs"]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
        assert any(f"answering in at least {partial['target_tokens']} tokens" in m for m in events)
        # A file none of whose answers fits data.max_length: a 400 naming the file by id, not by the
        # server's path (and again the second time: the failure is remembered, tests/test_auto.py).
        c = upload("cut.jsonl", [chat_example("Why " + "really " * 1500 + "?", "yes")] * 12)
        import openai

        for _ in range(2):
            with pytest.raises(openai.BadRequestError) as err:
                client.fine_tuning.jobs.create(model=BASE, training_file=c.id)
            assert c.id in err.value.message and "no example has trainable tokens" in err.value.message
            assert str(service.settings.home) not in err.value.message and "/files/" not in err.value.message
        plan = client.get(f"/slmtune/plan?model={BASE}&method=qlora&batch_size=2", cast_to=object)
        assert plan["hardware"].startswith(("cpu:", "1x", "2x")) and plan["estimate"]["method"] == "qlora"
        assert plan["fits"] is True and {r["method"] for r in plan["methods"]} == {"full", "dora", "lora", "qlora"}

        with pytest.raises(openai.BadRequestError):  # a model the service does not offer
            client.get(f"/slmtune/auto_hyperparameters?training_file={g.id}&model=nope", cast_to=object)
        with pytest.raises(openai.NotFoundError):  # another tenant's file
            service.client("rival").get(f"/slmtune/auto_hyperparameters?training_file={f.id}", cast_to=object)
        with pytest.raises(openai.AuthenticationError):
            service.client("helper").with_options(api_key="wrong").get(f"/slmtune/plan?model={BASE}", cast_to=object)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def console_service(tmp_path_factory, tiny_llama_dir):
    service = start_service(tmp_path_factory.mktemp("console-home"), tiny_llama_dir, workers=1)
    yield service
    service.stop()


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[test]' (selenium)")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # browser_errors() reads the console
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def wait(driver, predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate(driver)
        except Exception:  # noqa: BLE001 - elements come and go while the page re-renders
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            shot(driver, "timeout")
            raise AssertionError(f"timed out waiting for {what}; page says: {driver.find_element('id', 'main').text[:800]}")
        time.sleep(0.2)


def shot(driver, name):
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"console-{name}.png"))


def by_id(driver, ident):
    return driver.find_element("id", ident)


def sign_in(driver, url, key):
    driver.get(url + "/#/signin")
    field = wait(driver, lambda d: by_id(d, "api-key"), what="the sign-in form")
    assert driver.find_element("css selector", "label[for=api-key]").text == "API key"
    field.clear()
    field.send_keys(key + "\n")
    wait(driver, lambda d: d.execute_script("return location.hash") == "#/files" and by_id(d, "upload-file"),
         what="the files page")


def test_console_end_to_end(console_service, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    url, d = console_service.url, browser
    d.get(url + "/")
    wait(d, lambda d: by_id(d, "api-key"), what="redirect to sign-in")
    by_id(d, "api-key").send_keys("sk-slm-wrong\n")
    wait(d, lambda d: "was not accepted" in by_id(d, "signin-result").text and "Bearer" not in by_id(d, "signin-result").text, what="the refused key's message")
    assert d.execute_script("return sessionStorage.getItem('slmtune.apiKey')") is None
    sign_in(d, url, console_service.key("acme"))
    assert d.execute_script("return sessionStorage.getItem('slmtune.apiKey')") == console_service.key("acme")
    assert d.execute_script("return localStorage.length") == 0

    # a bad file: the API's line-numbered errors, inline
    good = [json.dumps(r) for r in training_rows(12)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(good[:4] + ["{not json"] + good[4:] + ['{"messages": []}']) + "\n")
    by_id(d, "upload-file").send_keys(str(bad))
    by_id(d, "upload-form").submit()
    error = wait(d, lambda d: by_id(d, "upload-error"), what="the upload error").text
    assert "line 5: invalid_json" in error and "line 14: missing_messages" in error, error
    items = d.find_elements("css selector", "#upload-error li")
    assert len(items) == 2 and items[0].text.startswith("line 5:")
    shot(d, "1-bad-upload")

    for name, rows in (("train.jsonl", good), ("val.jsonl", good[:3])):
        path = tmp_path / name
        path.write_text("\n".join(rows) + "\n")
        by_id(d, "upload-file").send_keys(str(path))
        by_id(d, "upload-form").submit()
        wait(d, lambda d: name in by_id(d, "upload-ok").text, what=f"{name} uploaded")
    files = {f.filename: f.id for f in console_service.client("acme").files.list()}
    assert set(files) == {"train.jsonl", "val.jsonl"}
    wait(d, lambda d: len(d.find_elements("css selector", "#file-list tbody tr")) == 2, what="the file list")
    d.find_element("css selector", "button[aria-label='Download val.jsonl']").click()
    downloaded = tmp_path / "downloads" / "val.jsonl"
    wait(d, lambda d: downloaded.exists() and downloaded.read_text() == "\n".join(good[:3]) + "\n", what="the download")
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(good) + "\n")
    by_id(d, "upload-file").send_keys(str(extra))
    by_id(d, "upload-form").submit()
    wait(d, lambda d: len(d.find_elements("css selector", "#file-list tbody tr")) == 3, what="three files")
    d.find_element("css selector", "button[aria-label='Delete extra.jsonl']").click()
    d.switch_to.alert.accept()
    wait(d, lambda d: len(d.find_elements("css selector", "#file-list tbody tr")) == 2, what="the deleted file gone")
    assert "extra.jsonl" not in [f.filename for f in console_service.client("acme").files.list()]

    # the new-job wizard: auto values and the memory plan shown before submitting
    d.get(url + "/#/new")
    wait(d, lambda d: by_id(d, "base-model").get_attribute("value") == BASE, what="the wizard")
    Select(by_id(d, "training-file")).select_by_value(files["train.jsonl"])
    Select(by_id(d, "validation-file")).select_by_value(files["val.jsonl"])
    wait(d, lambda d: '"auto" picks 10 for 12 examples' in by_id(d, "hp-n_epochs-hint").text, what="auto values")
    Select(by_id(d, "method")).select_by_value("lora")
    verdict = wait(d, lambda d: "lora" in by_id(d, "plan-verdict").text and by_id(d, "plan-verdict").text,
                   what="the memory plan")
    assert verdict.startswith("Fits:") and "this server" in verdict, verdict
    by_id(d, "hp-n_epochs").clear()
    by_id(d, "hp-n_epochs").send_keys("30")  # batch size stays "auto" (1): 360 short steps, long enough to watch
    by_id(d, "suffix").send_keys("web")
    shot(d, "2-new-job")
    by_id(d, "create-job").click()
    wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), what="the job page")
    job_id = d.execute_script("return location.hash").split("/")[-1]

    # the job page: the curve gains points while the job runs, then it succeeds
    STEPS = 30 * 12
    seen = []
    # A bound for a hung job, not a speed test (120 s timed out with a training benchmark beside it).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = by_id(d, "job-status").text
        points = int(by_id(d, "loss-chart").get_attribute("data-train-points") or 0)
        if not seen or seen[-1] != (status, points):
            seen.append((status, points))
            if points and len([s for s in seen if s[1]]) == 1:
                shot(d, "3-job-running")
        if status == "succeeded" and points == STEPS:
            break
        assert status not in ("failed", "cancelled"), by_id(d, "main").text
        time.sleep(0.3)
    assert seen[-1] == ("succeeded", STEPS), seen
    counts = [p for _, p in seen]
    assert counts == sorted(counts) and counts[0] == 0, seen
    assert any(0 < p < STEPS for p in counts), seen  # the curve grew while we watched the running job
    valid_points = int(by_id(d, "loss-chart").get_attribute("data-valid-points"))
    assert valid_points >= 1
    assert f"{STEPS} training loss point(s)" in by_id(d, "chart-note").text
    assert f"Step {STEPS}/{STEPS}: training loss=" in by_id(d, "event-log").text
    assert f"ckpt-step-{STEPS}" in by_id(d, "checkpoints").text
    assert "(best)" in by_id(d, "checkpoints").text  # the checkpoints of the best validation loss say so
    assert not by_id(d, "job-cancel").is_enabled() and not by_id(d, "job-pause").is_enabled()
    ft_model = by_id(d, "fine-tuned-model").text
    assert ft_model == f"ft:{BASE}:acme:web:{job_id}"
    shot(d, "4-job-succeeded")

    d.get(url + "/#/jobs")
    wait(d, lambda d: "succeeded" in d.find_element("css selector", f"tr[data-job-id='{job_id}']").text,
         what="the job list")

    # the playground: the same prompt to the fine-tuned model and its base, both streamed
    d.get(url + "/#/playground")
    wait(d, lambda d: by_id(d, "pg-model").get_attribute("value") == ft_model, what="the playground")
    assert BASE in by_id(d, "pg-base").text
    by_id(d, "pg-prompt").send_keys("What is fact number 3?")
    by_id(d, "pg-temperature").clear()
    by_id(d, "pg-temperature").send_keys("1")
    by_id(d, "pg-send").click()
    wait(d, lambda d: all(by_id(d, f"state-{p}").get_attribute("data-state") in ("done", "error") for p in ("ft", "base")),
         timeout=60, what="both answers")
    for panel in ("ft", "base"):
        assert by_id(d, f"state-{panel}").get_attribute("data-state") == "done", by_id(d, f"state-{panel}").text
        assert by_id(d, f"answer-{panel}").text.strip(), panel
    shot(d, "5-playground")

    # tools in the playground: bad JSON is refused in words; a forced call is shown as a call
    by_id(d, "pg-tools").send_keys("[{not json")
    by_id(d, "pg-send").click()
    assert "not valid JSON" in wait(d, lambda d: by_id(d, "pg-tools-error").text, what="the tools error")
    by_id(d, "pg-tools").clear()
    by_id(d, "pg-tools").send_keys(json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"]}}}]))
    Select(by_id(d, "pg-tool-choice")).select_by_value("required")
    by_id(d, "pg-max-tokens").clear()
    by_id(d, "pg-max-tokens").send_keys("160")  # the tiny tokenizer writes the call's ~80 characters in ~80 tokens
    by_id(d, "pg-send").click()
    wait(d, lambda d: all(by_id(d, f"state-{p}").text.startswith("done: 1 tool call") for p in ("ft", "base")),
         timeout=60, what="both answers' tool calls")
    for panel in ("ft", "base"):
        call = d.find_element("css selector", f"#answer-{panel} .tool-calls li")
        name, arguments = call.find_elements("css selector", "code")
        assert name.text == "get_weather" and json.loads(arguments.text)["city"] in ("Oslo", "Lima")
    assert not by_id(d, "pg-tools-error").text
    shot(d, "5b-playground-tool-call")

    # another tenant signs in: the job is "not found", and lists show nothing of acme's
    by_id(d, "sign-out").click()
    wait(d, lambda d: by_id(d, "api-key"), what="signed out")
    assert d.execute_script("return sessionStorage.getItem('slmtune.apiKey')") is None
    sign_in(d, url, console_service.key("rival"))
    assert "No files yet." in wait(d, lambda d: by_id(d, "file-list").text, what="rival's files")
    d.get(url + f"/#/jobs/{job_id}")
    message = wait(d, lambda d: by_id(d, "job-not-found").text, what="not found")
    assert "not found" in message.lower() and job_id in message
    shot(d, "6-other-tenant")
    assert browser_errors(d) == []


def test_keyboard_only_sign_in(console_service, browser):
    """Tab reaches the skip link, then the key field; Enter signs in; every input has a label."""
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(console_service.url + "/#/signin")
    wait(d, lambda d: by_id(d, "api-key"), what="the sign-in form")
    assert d.switch_to.active_element.get_attribute("id") == "api-key"  # focused on arrival
    d.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    assert d.switch_to.active_element.text == "Skip to content"
    d.switch_to.active_element.send_keys(Keys.TAB)
    assert d.switch_to.active_element.get_attribute("id") == "api-key"
    d.switch_to.active_element.send_keys(console_service.key("keyboard") + Keys.ENTER)
    wait(d, lambda d: by_id(d, "upload-file"), what="the files page")
    skip = d.find_element("css selector", "a.skip")
    d.execute_script("arguments[0].focus()", skip)
    skip.send_keys(Keys.TAB)
    assert d.switch_to.active_element.text == "Files"  # then the navigation, in order
    d.switch_to.active_element.send_keys(Keys.TAB)
    d.switch_to.active_element.send_keys(Keys.ENTER)  # "New job", by keyboard

    wait(d, lambda d: by_id(d, "job-form"), what="the wizard")
    unlabeled = d.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !document.querySelector(`label[for='${e.id}']`)).map(e => e.outerHTML)")
    assert unlabeled == []


def test_job_buttons_and_failure_in_plain_words(console_service, browser, upload):
    """Pause, resume and cancel from the job page; a failed job shows the trainer's error."""
    from tests.service.test_service import create_job, long_job

    client = console_service.client("operator")
    job = long_job(client, upload, n_epochs=20)
    d = browser
    sign_in(d, console_service.url, console_service.key("operator"))
    d.get(f"{console_service.url}/#/jobs/{job.id}")
    wait(d, lambda d: by_id(d, "loss-chart").get_attribute("data-train-points") not in (None, "0"), timeout=60,
         what="the first training steps")
    for button, status in (("job-pause", "paused"), ("job-resume", "queued"), ("job-cancel", "cancelled")):
        wait(d, lambda d: by_id(d, button).is_enabled(), what=f"{button} enabled")
        by_id(d, button).click()
        wait(d, lambda d: by_id(d, "job-status").text in (status, "running" if status == "queued" else status),
             what=f"status {status}")
        assert client.fine_tuning.jobs.retrieve(job.id).status in (status, "running")
    wait(d, lambda d: "Job was cancelled" in by_id(d, "event-log").text, what="the cancel event")
    assert not by_id(d, "job-cancel").is_enabled()

    rows = training_rows(12)
    for row in rows:
        row["messages"][-1]["weight"] = 0  # passes the upload checks, but training has nothing to learn
    failing = create_job(client, upload(client, rows, name="nothing.jsonl").id)
    d.get(f"{console_service.url}/#/jobs/{failing.id}")
    message = wait(d, lambda d: by_id(d, "job-failure").text, timeout=60, what="the failure")
    assert message.startswith("This job failed.") and "Traceback" not in message
    assert client.fine_tuning.jobs.retrieve(failing.id).error.message in message
    shot(d, "7-failed-job")


def browser_errors(driver) -> list[str]:
    """Severe messages of the browser's console log: JavaScript errors, CSP violations, failed loads
    (not the API's own 4xx answers, which the walk provokes on purpose: a wrong key, another
    tenant's job)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not re.search(r"the server responded with a status of 4\d\d", e["message"])]


def test_dpo_in_the_wizard_and_the_reward_margin_curve(console_service, browser, upload):
    """A file of preference pairs switches the wizard to DPO (its beta shown, "auto" values for pairs);
    the job trains with method.type dpo and its page draws the reward margin; no JavaScript errors."""
    from selenium.webdriver.support.ui import Select

    from tests.test_preference import openai_pair

    client = console_service.client("prefs")
    pairs = upload(client, [openai_pair(i) for i in range(12)], name="pairs.jsonl")
    d = browser
    sign_in(d, console_service.url, console_service.key("prefs"))
    d.get(console_service.url + "/#/new")
    wait(d, lambda d: by_id(d, "base-model").get_attribute("value") == BASE, what="the wizard")
    Select(by_id(d, "training-file")).select_by_value(pairs.id)
    wait(d, lambda d: by_id(d, "method-type").get_attribute("value") == "dpo", what="DPO chosen for pairs")
    wait(d, lambda d: "for 12 pairs" in by_id(d, "hp-n_epochs-hint").text, what="auto values for pairs")
    assert by_id(d, "hp-beta").is_displayed() and '"auto" picks 0.1' in by_id(d, "hp-beta-hint").text
    by_id(d, "suffix").send_keys("pref-1")  # a "-" the browser's pattern check accepts
    shot(d, "8-new-dpo-job")
    by_id(d, "create-job").click()
    wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), what="the job page")
    job_id = d.execute_script("return location.hash").split("/")[-1]
    assert client.fine_tuning.jobs.retrieve(job_id).method.type == "dpo"
    wait(d, lambda d: by_id(d, "job-status").text == "succeeded", timeout=300, what="the DPO job to succeed")
    wait(d, lambda d: by_id(d, "margin-box").is_displayed() and by_id(d, "margin-chart").get_attribute(
        "data-train-points") not in (None, "0"), what="the reward margin curve")
    assert "Reward margin" in by_id(d, "margin-note").text and "dpo" in by_id(d, "job-facts").text
    shot(d, "9-dpo-job")
    assert browser_errors(d) == []


def test_reward_curve_for_reinforcement_jobs_only(tmp_path, tiny_llama_dir, browser, upload):
    """A job whose metrics events carry `reward` (GRPO) gets a reward chart next to its loss chart:
    training reward per step, validation reward points, each sub-grader's last reward, and its
    objective and grader among the facts; a job without `reward` shows no reward chart. No worker:
    the jobs stay queued and the worker's metrics events are written into the store directly."""
    from tests.service.test_reinforcement_service import PROMPTS, rft_method
    from tests.service.test_service import create_job
    from tests.test_grpo import EXACT, FUZZY_A

    service = start_service(tmp_path / "home", tiny_llama_dir, workers=0)
    try:
        client = service.client("rewards")
        store = service.app.state.service.store
        multi = {"type": "multi", "name": "checks", "calculate_output": "0.5 * exact + 0.5 * similar",
                 "graders": {"exact": EXACT, "similar": FUZZY_A}}
        rft = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, PROMPTS, name="prompts.jsonl").id,
                                             method=rft_method(multi, n_epochs=1, batch_size=4))
        sft = create_job(client, upload(client, training_rows(12)).id)
        for step in range(1, 5):  # what the worker's relay() stores for GRPO steps and evaluations
            reward, common = 0.2 * step, {"step": step, "tokens": 40 * step, "total_steps": 4, "epoch": step / 4}
            store.append_event(rft.id, f"Step {step}/4: training loss=0.0100, reward={reward:.4f}", type="metrics",
                               data=common | {"train_loss": 0.01, "learning_rate": 1e-5, "reward": reward,
                                              "reward_std": 0.1, "reward/exact": reward / 2,
                                              "reward/similar": min(1.0, 1.5 * reward), "zero_spread_groups": 0,
                                              "completion_length": 6.0, "generate_seconds": 0.5})
            store.append_event(sft.id, f"Step {step}/4: training loss={2.0 / step:.4f}", type="metrics",
                               data=common | {"train_loss": 2.0 / step, "learning_rate": 1e-4})
            if step % 2 == 0:
                valid = reward - 0.1
                store.append_event(rft.id, f"Step {step}: validation loss={1 - valid:.4f}, reward={valid:.4f}",
                                   type="metrics", data={"step": step, "valid_loss": 1 - valid, "valid_reward": valid,
                                                         "valid_reward/exact": valid / 2,
                                                         "valid_completion_length": 6.0})
                store.append_event(sft.id, f"Step {step}: validation loss={1.5 / step:.4f}", type="metrics",
                                   data={"step": step, "valid_loss": 1.5 / step})

        d = browser
        sign_in(d, service.url, service.key("rewards"))
        d.get(f"{service.url}/#/jobs/{rft.id}")
        chart = wait(d, lambda d: by_id(d, "reward-box").is_displayed() and by_id(d, "reward-chart"),
                     what="the reward chart")
        assert (chart.get_attribute("data-train-points"), chart.get_attribute("data-valid-points")) == ("4", "2")
        assert by_id(d, "loss-chart").get_attribute("data-train-points") == "4"  # the loss chart stays
        note = by_id(d, "reward-note").text
        assert "4 training point(s), last 0.800 at step 4" in note and "2 validation point(s), last 0.700 at step 4" in note
        assert "by grader: exact 0.400, similar 1.000" in note, note
        facts = by_id(d, "job-facts").text
        assert "reinforcement" in facts and "checks (multi)" in facts, facts
        assert by_id(d, "job-progress").text.startswith("step 4 of 4")
        d.execute_script("arguments[0].scrollIntoView()", by_id(d, "reward-box"))
        shot(d, "10-rft-job-reward-curve")

        d.get(f"{service.url}/#/jobs/{sft.id}")
        wait(d, lambda d: by_id(d, "loss-chart").get_attribute("data-train-points") == "4", what="the SFT loss curve")
        assert not by_id(d, "reward-box").is_displayed() and by_id(d, "reward-chart").get_attribute("data-train-points") is None
        assert "supervised" in by_id(d, "job-facts").text and "Grader" not in by_id(d, "job-facts").text

        d.get(f"{service.url}/#/jobs")
        rows = wait(d, lambda d: [d.find_element("css selector", f"tr[data-job-id='{j.id}']").text for j in (rft, sft)],
                    what="the job list")  # read at once: the list re-renders every 3 s
        assert "· reinforcement" in rows[0] and "·" not in rows[1], rows
        assert browser_errors(d) == []
    finally:
        service.stop()


def test_reinforcement_job_from_the_wizard(tmp_path, tiny_llama_dir, browser, upload):
    """A file of prompts switches the wizard to reinforcement: a grader to check (a bad one's error
    names its field), the reinforcement hyperparameters with what "auto" picks, a grader reading a
    field the rows lack refused by the server inline, and the job created with method.type
    reinforcement and the grader. No worker: the job stays queued. No JavaScript errors."""
    from selenium.webdriver.support.ui import Select

    from tests.service.test_reinforcement_service import PROMPTS
    from tests.test_grpo import EXACT

    def set_grader(grader):
        by_id(d, "grader").clear()
        by_id(d, "grader").send_keys(json.dumps(grader))
        wait(d, lambda d: json.loads(by_id(d, "grader").get_attribute("value")) == grader, what="the grader typed")

    service = start_service(tmp_path / "home", tiny_llama_dir, workers=0)
    try:
        client = service.client("rft-web")
        chat = upload(client, training_rows(12), name="chat.jsonl")
        prompts = upload(client, PROMPTS, name="prompts.jsonl")
        assert len(PROMPTS) >= 10 and PROMPTS[3] == {"messages": [{"role": "user", "content": "Say a word 3"}],
                                                      "answer": "a"}
        d = browser
        sign_in(d, service.url, service.key("rft-web"))
        d.get(service.url + "/#/new")
        wait(d, lambda d: by_id(d, "base-model").get_attribute("value") == BASE, what="the wizard")
        Select(by_id(d, "training-file")).select_by_value(chat.id)
        wait(d, lambda d: by_id(d, "method-type").get_attribute("value") == "supervised"
             and "for 12 examples" in by_id(d, "hp-n_epochs-hint").text, what="supervised for chat examples")
        assert not by_id(d, "grader-box").is_displayed() and not by_id(d, "hp-compute_multiplier").is_displayed()

        Select(by_id(d, "training-file")).select_by_value(prompts.id)
        wait(d, lambda d: by_id(d, "method-type").get_attribute("value") == "reinforcement"
             and by_id(d, "grader-box").is_displayed(), what="reinforcement chosen for prompts")
        wait(d, lambda d: '"auto" picks 10 for 16 prompts' in by_id(d, "hp-n_epochs-hint").text, what="auto values")
        assert '"auto" picks 4 prompts per step' in by_id(d, "hp-batch_size-hint").text
        assert '"auto" picks 32' in by_id(d, "hp-eval_samples-hint").text
        assert '"auto" picks 1' in by_id(d, "hp-compute_multiplier-hint").text
        assert by_id(d, "hp-eval_interval").is_displayed() and not by_id(d, "hp-beta").is_displayed()
        prefilled = json.loads(by_id(d, "grader").get_attribute("value"))
        assert prefilled["type"] == "string_check" and prefilled["reference"] == "{{item.answer}}"

        # a grader that cannot run: the server's message and the field it names, inline
        set_grader(EXACT | {"operation": "contains"})
        by_id(d, "check-grader").click()
        error = wait(d, lambda d: by_id(d, "grader-error").text, what="the grader's error")
        assert "operation must be one of" in error and "(grader.operation)" in error, error
        assert by_id(d, "grader").get_attribute("aria-invalid") == "true"
        shot(d, "11-rft-bad-grader")

        # a grader that runs but reads a field the file's rows lack: the job's 400, inline
        set_grader(EXACT | {"reference": "{{item.expected}}"})
        assert not d.find_elements("id", "grader-error")  # editing clears the old verdict
        by_id(d, "check-grader").click()
        wait(d, lambda d: by_id(d, "grader-ok").text, what="the grader accepted")
        by_id(d, "create-job").click()
        error = wait(d, lambda d: by_id(d, "job-error").text, what="the job's error")
        assert "expected" in error and "(method.reinforcement.grader)" in error, error
        assert d.execute_script("return location.hash") == "#/new" and client.fine_tuning.jobs.list().data == []

        # fixed: checked, then created with two hyperparameters set and the rest "auto"
        set_grader(EXACT)
        by_id(d, "check-grader").click()
        assert "exact (string_check)" in wait(d, lambda d: by_id(d, "grader-ok").text, what="the grader OK")
        for name, value in (("compute_multiplier", "0.5"), ("eval_samples", "8")):
            by_id(d, f"hp-{name}").clear()
            by_id(d, f"hp-{name}").send_keys(value)
        by_id(d, "suffix").send_keys("rft-1")
        shot(d, "12-new-rft-job")
        by_id(d, "create-job").click()
        wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), what="the job page")
        job_id = d.execute_script("return location.hash").split("/")[-1]
        facts = wait(d, lambda d: "exact (string_check)" in by_id(d, "job-facts").text and by_id(d, "job-facts").text,
                     what="the job's facts")
        assert "reinforcement" in facts

        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.status == "queued" and job.method.type == "reinforcement" and job.user_provided_suffix == "rft-1"
        assert job.method.reinforcement.grader.to_dict() == EXACT
        hp = job.method.reinforcement.hyperparameters
        assert (hp.compute_multiplier, hp.eval_samples, hp.n_epochs, hp.batch_size) == (0.5, 8, 10, 4)
        assert hp.reasoning_effort == "default"
        assert browser_errors(d) == []
    finally:
        service.stop()


PAGES = ("files", "new", "jobs", "job", "playground")


def test_phone_width_double_clicks_asking_twice_and_progress(console_service, browser, upload):
    """At 375 px no page scrolls sideways; a double-click on "Create job" makes one job; asking again
    in the playground cancels the first streams; a job shows "step N of M"; screenshots of every
    page at desktop and phone width in test-artifacts/."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    from tests.service.conftest import wait_for
    from tests.service.test_service import create_job

    client = console_service.client("phone")
    f = upload(client, training_rows(12))
    done = wait_for(client, create_job(client, f.id, suffix="phone-1").id)
    assert done.status == "succeeded", done.error
    d = browser
    sign_in(d, console_service.url, console_service.key("phone"))
    for width, label in ((1280, "desktop"), (375, "phone")):
        d.set_window_size(width, 900)
        for page in PAGES:
            d.get(console_service.url + (f"/#/jobs/{done.id}" if page == "job" else f"/#/{page}"))
            wait(d, lambda d: d.find_element("css selector", "main h1").text.strip(), what=f"the {page} page")
            if page == "job":
                wait(d, lambda d: by_id(d, "job-progress").get_attribute("data-total"), what="the job's progress")
                assert by_id(d, "job-progress").text.startswith("step ")
            if page == "jobs":
                row = wait(d, lambda d: d.find_element("css selector", f"tr[data-job-id='{done.id}']"), what="the job row")
                assert "phone-1" in row.text and "lora" in row.text  # suffix and method columns
            widths = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            shot(d, f"{label}-{page}")
            assert widths[0] <= widths[1], (label, page, widths)
    d.set_window_size(1280, 1000)

    # a double-click on Create job creates one job
    before = len(client.fine_tuning.jobs.list().data)
    d.get(console_service.url + "/#/new")
    wait(d, lambda d: by_id(d, "base-model").get_attribute("value") == BASE, what="the wizard")
    Select(by_id(d, "training-file")).select_by_value(f.id)
    options = [o.get_attribute("value") for o in Select(by_id(d, "training-file")).options]
    assert done.result_files[0] not in options  # the job's step_metrics.csv is not offered as training data
    ActionChains(d).double_click(by_id(d, "create-job")).perform()
    wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), what="the job page")
    jobs = client.fine_tuning.jobs.list().data
    assert len(jobs) == before + 1
    client.fine_tuning.jobs.cancel(jobs[0].id)

    # asking twice: the first streams are cancelled, each panel ends "done" once, with one answer
    d.get(console_service.url + "/#/playground")
    wait(d, lambda d: by_id(d, "pg-send"), what="the playground")
    by_id(d, "pg-prompt").send_keys("What is fact number 3?")
    by_id(d, "pg-max-tokens").clear()
    by_id(d, "pg-max-tokens").send_keys("200")
    by_id(d, "pg-send").click()
    by_id(d, "pg-send").click()
    wait(d, lambda d: all(by_id(d, f"state-{p}").get_attribute("data-state") == "done" for p in ("ft", "base")),
         timeout=60, what="both answers")
    assert by_id(d, "pg-form").get_attribute("data-asks") == "2"
    assert browser_errors(d) == []
