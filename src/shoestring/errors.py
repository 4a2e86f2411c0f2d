"""Errors that reach the user as one line, never as a traceback.

`UserError` is a mistake the user can fix (bad config, missing file): exit status 2.
`RunError` is a failure at run time (NaN loss, full disk): exit status 1.
Both carry the problem and, where we know it, the fix.
"""

from __future__ import annotations


class ShoestringError(Exception):
    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


class UserError(ShoestringError):
    exit_code = 2


class RunError(ShoestringError):
    exit_code = 1
