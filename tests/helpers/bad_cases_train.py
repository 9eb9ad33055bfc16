"""Bad-input cases for train and config: output_name, locks, resume, accumulation, config keys, --set (rows of docs/bad_inputs.md)."""

from __future__ import annotations

from helpers.bad_inputs import Accepted, Command, Refused  # noqa: F401

REFUSED: list[Refused] = []
ACCEPTED: list[Accepted] = []
COMMANDS: list[Command] = []
