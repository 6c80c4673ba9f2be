"""Admission control: what a process takes on, so that it stays fast and bounded.

Two budgets, both answered with UNAVAILABLE (ErrorInfo reason OVERLOADED,
RetryInfo with a delay), the code gRPC retry policies and load balancers treat
as "try again, maybe elsewhere". Nothing waits in an unbounded queue:

- Work: at most MAX_CONCURRENT_RPCS calls run at once, and none is started
  while the event loop lags more than SHED_LOOP_LAG_SECONDS: the count
  cannot tell a cheap call from a 1,000-user page, the lag can. Admitted
  calls that wait for a database connection give up after
  DB_POOL_TIMEOUT_SECONDS (or their deadline) with the same UNAVAILABLE.
- Shares: no caller holds more than its share of those calls at once,
  MAX_CONCURRENT_RPCS_PER_CALLER (half the cap unless set) times its
  weight (auth.py), so one caller's flood leaves the rest of the cap to the
  others. A caller is an authenticated name; with authentication off, each
  peer address (connection) is one. The default cap is four times the
  pool, so half of it still keeps every connection busy: a lone caller
  loses no throughput to its share.
- Memory: an answer the caller does not read stays in the server until its
  connection takes it (or the call's deadline, or the connection, ends).
  Past MAX_UNSENT_RESPONSE_BYTES of such answers, connections holding more
  than SLOW_READER_BYTES of them are refused; past twice the budget, any
  connection holding an unsent answer; past four times, every call, until
  answers drain. Clients that read what they asked for are never behind,
  so they are served until that last stage.

Health and reflection are not admitted through here: a probe must get its
answer however busy the server is.
"""

from typing import Any, NoReturn

import grpc

from service.auth import ANONYMOUS, Caller
from service.errors import Overloaded
from service.loop_lag import LoopLag

Context = grpc.aio.ServicerContext[Any, Any]

# A connection holding this much unread is not keeping up: refused first.
SLOW_READER_BYTES = 256 * 1024

# Why a call was refused: the budget it would have overrun.
TOO_MANY_CALLS = "max_concurrent_rpcs"
CALLER_SHARE = "caller_share"
LOOP_LAG = "loop_lag"
UNSENT_ANSWERS = "unsent_responses"
REFUSAL_REASONS = (TOO_MANY_CALLS, CALLER_SHARE, LOOP_LAG, UNSENT_ANSWERS)


class Admission:
    """Counts calls in progress and answers not yet taken by their callers.

    The event loop is single-threaded, so plain integers need no lock.
    """

    def __init__(
        self,
        limit: int,
        share: int,
        unsent_budget: int,
        loop_lag: LoopLag,
        shed_lag: float,
    ) -> None:
        self.limit = limit
        self.share = share  # a caller of weight 1
        self.unsent_budget = unsent_budget
        self._loop_lag = loop_lag
        self._shed_lag = shed_lag
        self.in_progress = 0
        self.unsent_bytes = 0
        self._unsent_by_peer: dict[str, int] = {}
        self._held: dict[str, int] = {}  # calls in progress by caller (a name, or a peer)
        # Calls refused so far, by reason and by caller ("-": anonymous): counted on
        # refusal only (METRICS_PORT reads them).
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.refused_by_caller: dict[str, int] = {}

    def enter(self, context: Context, caller: Caller = ANONYMOUS) -> str:
        """Admit one call of `caller`, or raise Overloaded.

        Returns the caller's key, which `leave()` must be given once the call is done.
        """
        key = caller.name if caller is not ANONYMOUS else context.peer()
        if self.in_progress >= self.limit:
            self._refuse(TOO_MANY_CALLS, caller)
        held = self._held.get(key, 0)
        if held >= self.share * caller.weight:
            self._refuse(CALLER_SHARE, caller, whose=key)
        if self._loop_lag.last >= self._shed_lag:
            self._refuse(LOOP_LAG, caller)
        if self.unsent_bytes >= self.unsent_budget and self._behind(context.peer()):
            self._refuse(UNSENT_ANSWERS, caller)
        self.in_progress += 1
        self._held[key] = held + 1
        return key

    def _refuse(self, reason: str, caller: Caller, whose: str | None = None) -> NoReturn:
        self.refused[reason] += 1
        self.refused_by_caller[caller.name] = self.refused_by_caller.get(caller.name, 0) + 1
        raise Overloaded(share_of=whose)

    def leave(self, key: str) -> None:
        self.in_progress -= 1
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]

    def track_unsent(self, context: Context, size: int) -> None:
        """Count an answer of `size` bytes as unsent until its call is done (taken)."""
        peer = context.peer()
        self.unsent_bytes += size
        self._unsent_by_peer[peer] = self._unsent_by_peer.get(peer, 0) + size
        # types-grpcio declares the callback as a class, not a callable Protocol.
        context.add_done_callback(lambda _: self._sent(peer, size))  # type: ignore[arg-type]

    def _behind(self, peer: str) -> bool:
        """Whether, with unsent answers over budget, `peer` is refused."""
        if self.unsent_bytes >= 4 * self.unsent_budget:
            return True
        unsent = self._unsent_by_peer.get(peer, 0)
        if self.unsent_bytes >= 2 * self.unsent_budget:
            return unsent > 0
        return unsent >= SLOW_READER_BYTES

    def _sent(self, peer: str, size: int) -> None:
        self.unsent_bytes -= size
        left = self._unsent_by_peer[peer] - size
        if left:
            self._unsent_by_peer[peer] = left
        else:
            del self._unsent_by_peer[peer]
