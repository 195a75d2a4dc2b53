"""Bounded retries with exponential backoff for calls to outside services (MLflow tracking server, DVC remote).

One small helper instead of a retry loop per call site, so every outage ends the same way: a few attempts spaced
``backoff, 2*backoff, 4*backoff, ...`` seconds apart (capped), then :class:`ServiceUnavailableError` naming the
service, how many attempts were made over how long, and the last cause, with credentials masked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tasks.secrets import redact

T = TypeVar("T")
log = logging.getLogger("autolabel")


class ServiceUnavailableError(RuntimeError):
    """An outside service did not answer after bounded retries; the message names it."""


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries in all; waits ``first``, ``first*factor``, ... seconds (at most ``cap``) between them."""

    attempts: int = 4
    first: float = 1.0
    factor: float = 2.0
    cap: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.cap, self.first * self.factor**k) for k in range(max(0, self.attempts - 1))]


def retry(
    fn: Callable[[], T],
    service: str,
    backoff: Backoff,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it returns, retrying on ``retry_on`` with ``backoff``.

    Args:
        service: what is being reached, as the error should name it, e.g.
            ``"MLflow tracking server at http://127.0.0.1:5000"`` (credentials are masked in the message).

    Raises:
        ServiceUnavailableError: "<service> is unreachable after N attempts over S s: <last cause>".
    """
    start = time.monotonic()
    delays = backoff.delays()
    for attempt in range(1, max(1, backoff.attempts) + 1):
        try:
            return fn()
        except retry_on as exc:
            cause = f"{type(exc).__name__}: {exc}"
            if attempt > len(delays):
                elapsed = time.monotonic() - start
                raise ServiceUnavailableError(
                    redact(f"{service} is unreachable after {attempt} attempts over {elapsed:.1f} s: {cause}")
                ) from None
            delay = delays[attempt - 1]
            log.warning(redact(f"{service}: attempt {attempt} failed ({cause}); retrying in {delay:.1f} s"))
            sleep(delay)
    raise AssertionError("unreachable")
