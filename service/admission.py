"""Admission control: a cap on UserService RPCs in progress in this process.

A call that arrives while MAX_CONCURRENT_RPCS calls are in progress is refused
at once with UNAVAILABLE (ErrorInfo reason OVERLOADED, RetryInfo with a delay),
the code gRPC retry policies and load balancers treat as "try again, maybe
elsewhere". Nothing waits in an unbounded queue: admitted calls that wait for
a database connection give up after DB_POOL_TIMEOUT_SECONDS (or their
deadline) with the same UNAVAILABLE.

Health and reflection are not admitted through here: a probe must get its
answer however busy the server is.
"""

from types import TracebackType

from service.errors import Overloaded


class Admission:
    """Counts RPCs in progress; `slot()` admits one or raises Overloaded.

    The event loop is single-threaded, so plain integers need no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0
        self.refused = 0
        self._slot = _Slot(self)

    def slot(self) -> "_Slot":
        """A context manager that holds one of the `limit` slots for its block."""
        return self._slot


class _Slot:
    # One reusable object instead of a generator-based context manager per RPC:
    # admission runs on every call and should cost next to nothing.
    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __enter__(self) -> None:
        admission = self._admission
        if admission.in_progress >= admission.limit:
            admission.refused += 1
            raise Overloaded()
        admission.in_progress += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._admission.in_progress -= 1
