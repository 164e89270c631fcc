"""The one error type users see for bad input: the CLI prints its message on one line and exits 2."""
from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input: a malformed file, a missing docid, an impossible option.

    The message says where (file and line when there is one), what was found, and what was expected.
    """

    @classmethod
    def at(cls, path: str | Path, line_number: int, problem: str, line: str) -> "InputError":
        shown = line.rstrip("\r\n")
        if len(shown) > 200:
            shown = shown[:200] + "..."
        return cls(f"{path}:{line_number}: {problem}: {shown!r}")


def check_integer(name: str, value: Any, least: int = 1, *, optional: bool = True) -> Any:
    """``value`` when it is an integer >= ``least`` (or None, when ``optional``); else an InputError that names it."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        expected = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise InputError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(name: str, value: Any, rule: Callable[[float], bool], expected: str, *,
                 optional: bool = True) -> float | None:
    """``value`` as a float when it is a real number (not a bool) that ``rule`` accepts (or None, when
    ``optional``); else an InputError: "NAME must be EXPECTED, got VALUE". NaN fails every comparison a rule makes."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not rule(value):
        raise InputError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def error_summary(error: BaseException) -> str:
    """``Type: first line of the message``: what a library's failure adds to an InputError on one line."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
