"""When and how long to retry: 429, 503 and transport errors, exponential backoff with jitter.

A server's ``Retry-After`` is honoured as a lower bound on the wait. Everything else (4xx,
other 5xx) surfaces at once: retrying a request the server refused will not change the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from downstream_adapters.errors import RateLimitedError, StoreUnavailableError


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, RateLimitedError | StoreUnavailableError | httpx.TransportError)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waits from ``initial`` doubling up to ``maximum`` seconds, and
    never longer than ``deadline`` seconds overall."""

    attempts: int = 5
    initial: float = 0.1
    maximum: float = 5.0
    deadline: float = 30.0

    def _wait(self, state: RetryCallState) -> float:
        backoff = wait_exponential_jitter(multiplier=self.initial, max=self.maximum)(state)
        error = state.outcome.exception() if state.outcome else None
        hinted = getattr(error, "retry_after", None) or 0.0
        return min(max(backoff, hinted), self.maximum)

    def _options(self) -> dict[str, object]:
        return {
            "retry": retry_if_exception(is_retryable),
            "stop": stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
            "wait": self._wait,
            "reraise": True,
        }

    def sync(self) -> Retrying:
        return Retrying(**self._options())  # type: ignore[arg-type]

    def asynchronous(self) -> AsyncRetrying:
        return AsyncRetrying(**self._options())  # type: ignore[arg-type]


NO_RETRY = RetryPolicy(attempts=1)
