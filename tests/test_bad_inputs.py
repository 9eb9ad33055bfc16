"""The bad-input catalogue (docs/bad_inputs.md): one test per row."""

import logging
import re
from pathlib import Path

import pytest

from conftest import REPO
from helpers.bad_inputs import catalogue, printable, run_command, run_http, run_refused, scan_accepted

DOC = (REPO / "docs" / "bad_inputs.md").read_text()
REFUSED, ACCEPTED, COMMANDS, HTTP = catalogue()
STALE = "docs/bad_inputs.md is stale; regenerate it (see its header). Expected row:\n{}"


def _one_clear_message(case, got: int, want: int, message: str, row: str) -> None:
    """The exit code or status wanted, the case's message, no traceback, and the row in the catalogue."""
    assert got == want, message
    assert re.search(case.expect, message, re.S), message
    assert "Traceback" not in message
    assert row in DOC, STALE.format(row)


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused_with_a_specific_message_and_nothing_written(case, tmp_path, tiny_ckpt):
    if case.id == "output_unwritable" and not Path("/sys").is_dir():
        pytest.skip("needs Linux's read-only /sys")
    code, message, touched = run_refused(case, tmp_path, tiny_ckpt)
    _one_clear_message(case, code, 2, message, f"| {case.case} | {printable(message, tmp_path)} |")
    assert not touched, sorted((tmp_path / "output").rglob("*"))


@pytest.mark.parametrize("case", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_ends_with_one_clear_message(case, tmp_path, tiny_ckpt):
    code, message = run_command(case, tmp_path, tiny_ckpt)
    _one_clear_message(case, code, case.code, message, f"| {case.case} | {case.code} | {printable(message, tmp_path)} |")


@pytest.mark.parametrize("case", HTTP, ids=[c.id for c in HTTP])
def test_web_ui_refuses_with_a_status_and_a_message(case, tmp_path):
    status, message = run_http(case, tmp_path)
    _one_clear_message(case, status, case.status, message,
                       f"| {case.case} | {case.status} | {printable(message, tmp_path)} |")


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_accepted_and_read_as_a_viewer_shows_it(case, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        samples = scan_accepted(case, tmp_path)
    assert samples
    case.check(samples)
    if case.id == "animated_gif":
        assert "anim.gif is animated (3 frames); only the first frame is used" in caplog.text
    assert f"| {case.case} | {case.behaviour} |" in DOC


def test_every_case_has_a_row_and_no_row_is_orphaned():
    rows = [ln.split("|")[1].strip() for ln in DOC.splitlines() if ln.startswith("| ") and not ln.startswith("| Case")]
    assert rows == [c.case for c in REFUSED] + [c.case for c in COMMANDS] + [c.case for c in HTTP] \
        + [c.case for c in ACCEPTED]
