"""A Flower Grid that cannot wait silently: node waits and stalled rounds end the run.

Flower's strategies wait for ``min_available_nodes`` with no limit and for replies up
to ``timeout`` (an hour by default). :class:`WatchedGrid` wraps the real grid and:

- fails with :class:`NodeWaitTimeout` when the strategy has polled for connected nodes
  for longer than ``run.node_wait_s`` without sending anything, naming the counts seen;
- replaces ``send_and_receive`` with a polling loop that fails with :class:`Stalled`
  when no reply has arrived for ``run.stall_timeout_s``, naming the phase (train,
  evaluate; "no reply yet" covers Ray and model start-up), the nodes that have not
  answered and, where a node ever reported it, their partition ids;
- records when each node's reply came, per phase (``arrivals``): a round waits for its
  last reply, and the spread is what slow links or devices (stragglers) cost the rest.

Flower's Grid has no progress hook, so this loop is written here; it keeps the
documented semantics of ``send_and_receive`` (push, pull until all replies or timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedpeft.errors import RunFailed

_CAUSES = ("likely causes: a client that hangs or is far slower than expected (raise "
           "run.stall_timeout_s for slow methods), Ray workers that cannot start (run "
           "`fedpeft doctor`), or SuperNodes that lost their connection")


class Stalled(RunFailed):
    """No client reply for ``run.stall_timeout_s`` seconds."""


class NodeWaitTimeout(RunFailed):
    """Not enough nodes connected within ``run.node_wait_s`` seconds."""


class WatchedGrid(Grid):
    """Delegates to ``inner``; adds the node-wait limit and the stall watchdog."""

    def __init__(self, inner: Grid, *, stall_timeout_s: float, node_wait_s: float,
                 nodes_needed: int, partition_of: Callable[[str], int | None] | None = None,
                 poll_s: float = 1.0) -> None:
        self.inner = inner
        self.stall_timeout_s, self.node_wait_s = stall_timeout_s, node_wait_s
        self.nodes_needed, self.poll_s = nodes_needed, poll_s
        self.partition_of = partition_of or (lambda _node: None)
        self._wait_since: float | None = None
        self.last_progress = time.monotonic()
        self.arrivals: dict[str, dict[str, float]] = {}  # phase -> node -> s after push

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids; fails once the strategy has waited too long for them."""
        ids = list(self.inner.get_node_ids())
        now = time.monotonic()
        self._wait_since = self._wait_since or now
        if now - self._wait_since > self.node_wait_s:
            raise NodeWaitTimeout(
                f"waited {now - self._wait_since:.0f}s (run.node_wait_s={self.node_wait_s:g})"
                f" for nodes: {len(ids)} connected, the strategy needs {self.nodes_needed}; "
                "start more SuperNodes, lower strategy.min_available_nodes / "
                "min_train_nodes, or raise sim.num_clients")
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._wait_since = None
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in, ``timeout`` passes, or a stall.

        Every reply comes back filed under the node its message was sent to: the
        SuperLink answers for a dead node with an error from itself (node id 1), and a
        node with no reply by ``timeout`` gets an error reply naming the wait."""
        messages = list(messages)
        ids = list(self.push_messages(messages))
        sent = {i: m for i, m in zip(ids, messages, strict=False) if i}
        pending = {i: str(m.metadata.dst_node_id) for i, m in sent.items()}
        phase = messages[0].metadata.message_type if messages else "?"
        end = None if timeout is None else time.monotonic() + timeout
        self.last_progress, replies, t0 = time.monotonic(), [], time.monotonic()
        arrived = self.arrivals[phase] = {}
        while pending and (end is None or time.monotonic() < end):
            got = [_attributed(r, sent, t0) for r in self.inner.pull_messages(list(pending))]
            self._note(got, pending, replies, arrived, t0)
            if pending and not got:
                self._check_stall(phase, pending, len(replies))
                time.sleep(self.poll_s)
        waited = time.monotonic() - t0
        return replies + [_no_reply(sent[i], waited, timeout) for i in pending]

    def _note(self, got: list[Message], pending: dict[str, str], replies: list,
              arrived: dict[str, float], t0: float) -> None:
        """File ``got`` as answered, with when each came (to the poll: ``poll_s``)."""
        for msg in got:
            node = pending.pop(msg.metadata.reply_to_message_id, None)
            if node is not None:
                arrived[node] = round(time.monotonic() - t0, 3)
        if got:
            replies.extend(got)
            self.last_progress = time.monotonic()

    def _check_stall(self, phase: str, pending: dict[str, str], answered: int) -> None:
        silent = time.monotonic() - self.last_progress
        if silent <= self.stall_timeout_s:
            return
        nodes = sorted(set(pending.values()))
        parts = [self.partition_of(n) for n in nodes]
        known = sorted(p for p in parts if p is not None)
        waiting = ("no client has replied yet (model loading or Ray start-up included)"
                   if answered == 0 else f"{answered} replied")
        raise Stalled(
            f"stalled in phase '{phase}': no client reply for {silent:.1f}s "
            f"(run.stall_timeout_s={self.stall_timeout_s:g}); {waiting}; silent nodes "
            f"{nodes}" + (f" (partitions {known})" if known else "") + f"; {_CAUSES}")


def _attributed(reply: Message, sent: dict[str, Message], t0: float) -> Message:
    """``reply`` from the node its message went to: a SuperLink-made error (source: the
    SuperLink) is re-issued as that node's error reply, with when it came."""
    asked = sent.get(reply.metadata.reply_to_message_id)
    if asked is None or reply.metadata.src_node_id == asked.metadata.dst_node_id:
        return reply
    if not reply.has_error():
        return reply
    reason = (f"{reply.error.reason} (reported by the SuperLink for node "
              f"{asked.metadata.dst_node_id} {time.monotonic() - t0:.1f}s into the round)")
    return Message(Error(code=reply.error.code, reason=reason), reply_to=asked)


def _no_reply(asked: Message, waited: float, timeout: float | None) -> Message:
    """An error reply for a node that never answered within the round's timeout."""
    reason = (f"no reply within {waited:.1f}s (run.round_timeout_s={timeout:g}); the node "
              "is slow, hung or lost its connection")
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=asked)
