"""The dashboard's page in a real browser (Debian's headless Chromium, `tests/install_browser.sh`) against a real
MLflow store: the evaluation panel shows what `moeforge run` prints at its end."""

from __future__ import annotations

import re
import threading

import pytest

from pipeline.dag import Dag
from pipeline.dashboard.app import create_app
from pipeline.dashboard.data import RayView, RunData
from pipeline.runner import default_stages
from tests.conftest import free_port, headless_chromium, wait_http
from tests.pipeline.dashboard.conftest import SUMMARY, log_evaluation, start_stage


@pytest.fixture
def dashboard(tracked):
    """The dashboard app served on loopback (as `moeforge dashboard` serves it) for a finished run that evaluated
    and registered its student; yields (page URL of the run, run id)."""
    import uvicorn
    from mlflow.entities import Metric

    cfg, tracker, stages = tracked
    parent = tracker.start_pipeline(cfg, "test", ["evaluate", "register"])
    evaluate = start_stage(tracker, cfg, parent, stages["evaluate"], "k-eval")
    log_evaluation(tracker, evaluate)
    tracker.finish_stage(evaluate, {})
    register = start_stage(tracker, cfg, parent, stages["register"], "k-register")
    tracker.client.log_batch(register, metrics=[Metric("version", 3, 0, 0), Metric("champion", 0, 0, 0)])
    tracker.finish_stage(register, {})
    tracker.finish(parent)

    port = free_port()
    app = create_app(RunData(tracker, RayView(None), Dag(default_stages())))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/api/runs", timeout=30)
        yield f"http://127.0.0.1:{port}/?run={parent}", parent
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser():
    driver = headless_chromium()
    try:
        yield driver
    finally:
        driver.quit()


def printed_by_the_cli(summary) -> str:
    """What `moeforge run` (and `moeforge status`) print of an evaluation, on one line per paragraph."""
    from pipeline.cli import _print_evaluation, console

    with console.capture() as captured:
        _print_evaluation(summary)
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", captured.get()).split())  # wrapped lines joined back


@pytest.mark.slow  # the browser
@pytest.mark.timeout(120)
def test_the_evaluation_panel_shows_what_the_cli_prints(dashboard, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, run_id = dashboard
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == run_id, browser.find_element(
        By.ID, "error"
    ).text
    text = lambda css: browser.find_element(By.CSS_SELECTOR, css).text

    # the columns: the teacher, the teacher with worked examples, the student and the constant-answer floor
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#eval-table thead th")]
    assert heads == ["held-out pass@1", "teacher", "teacher, worked examples", "student", "constant-answer floor"]
    # pass@1 per task and overall of each, the floor with its constant answer
    rows = browser.find_elements(By.CSS_SELECTOR, "#eval-table tbody tr")
    assert [r.get_attribute("data-task") for r in rows] == [*SUMMARY.tasks(), "overall"]
    models = {"teacher": SUMMARY.teacher, "teacher_best": SUMMARY.teacher_best, "student": SUMMARY.student}
    floor = SUMMARY.floor
    assert floor is not None
    for row in rows:
        task = row.get_attribute("data-task")
        of = None if task == "overall" else task
        for css, result in models.items():
            assert row.find_element(By.CSS_SELECTOR, f"td.{css}").text == f"{result.pass_at_1_on(of):.3f}"
        cell = row.find_element(By.CSS_SELECTOR, "td.floor").text
        if of is None:
            assert cell == f"{floor.pass_at_1:.3f}"
        else:
            answer = row.find_element(By.CSS_SELECTOR, "td.floor .floor-answer").text
            assert answer == floor.answer_by_task[of] and cell == f"{floor.pass_at_1_by_task[of]:.3f} (always {answer})"
    # the answers' statistics under the table
    failures = browser.find_element(By.CSS_SELECTOR, '#eval-table tfoot tr[data-stat="format_failure_rate"]')
    assert failures.find_element(By.CSS_SELECTOR, "td.student").text == f"{SUMMARY.student.format_failure_rate:.3f}"
    tokens = browser.find_element(By.CSS_SELECTOR, '#eval-table tfoot tr[data-stat="mean_completion_tokens"]')
    assert tokens.find_element(By.CSS_SELECTOR, "td.teacher_best").text == "52.0"

    # the cost line and the decode speeds: word for word what the CLI prints
    printed = printed_by_the_cli(SUMMARY)
    costs, speeds = text("#eval-costs"), text("#eval-decode")
    assert costs.startswith("student cost vs teacher: active non-embedding parameters per token 42.5M vs 106.2M (40%)")
    assert "KV cache per token 8640 vs 11520 floats (75%)" in costs
    assert costs.endswith("KL to the teacher before training 0.412 nats/token")
    assert speeds == (
        "decode tokens/s (this machine, greedy): batch 1: student 31.5, teacher 40.3; "
        "batch 16: student 310.0, teacher 290.5"
    )
    assert costs in printed and speeds in printed
    assert text("#registration") == "registered version 3 as challenger"
