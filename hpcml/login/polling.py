"""Following something on Slurm from the login node: ask every few seconds, print what changed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(fetch: Callable[[], T], done: Callable[[T], bool], poll_s: float, show: Callable[[T], str | None]) -> T:
    """Call `fetch` every `poll_s` seconds until `done` holds for its result, and return that result.

    `show` turns each result into the text to print (None: nothing to print); a text is printed only
    when it differs from the last one printed, and nothing is slept after the last look.
    """
    last = None
    while True:
        result = fetch()
        text = show(result)
        if text is not None and text != last:
            print(text, flush=True)
            last = text
        if done(result):
            return result
        time.sleep(poll_s)
