"""The traffic monitor shared by gateway replicas: a replicated state machine over one Redis stream, as
`guard.gateway.shared_state`'s docstring tells (the stream, the verdicts, its memory bound). Apart from the rate
limits' Redis so that a gateway without the monitor imports none of the detectors."""

from __future__ import annotations

import json
import logging
import threading

from cachetools import LRUCache

from detectors.events import PROMPT_BYTES, Event, compact
from detectors.monitor import ALLOW, LEVELS, Action, Monitor
from guard.gateway.errors import APIError
from guard.gateway.shared_state import SharedState, Unreachable

logger = logging.getLogger(__name__)


# KEYS: the stream, its event counter. ARGV: the stream's length bound, then the event's fields and values. The
# counter numbers every event, so that a replica can tell how many were trimmed before it read them.
APPEND = """
local seq = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, unpack(ARGV, 2))
"""
# the most an event in the stream takes: its capped prompt (and an answer's capped response), its other fields,
# Redis' overhead
EVENT_BYTES = 2 * PROMPT_BYTES + 512


def _id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


class SharedMonitor:
    """A `Monitor` that judges the events of every replica sharing `shared`'s Redis, in one order (see the module
    docstring). It answers `observe` as `Monitor` does, so `Monitored` takes either. The stream is bounded at
    about `max_bytes`. Safe to call from several threads: it locks only around its in-memory state."""

    thread_safe = True

    def __init__(self, monitor: Monitor, shared: SharedState, max_bytes: int = 256 << 20):
        self.monitor, self.shared = monitor, shared
        self.detector, self.settings = monitor.detector, monitor.settings
        self.max_events = max(1, max_bytes // EVENT_BYTES)
        # one hash slot for the stream and its counter, as a script on a Redis Cluster needs
        self.stream = f"{shared.prefix}:{{monitor}}:events"
        self.counter, self.verdicts = f"{shared.prefix}:{{monitor}}:added", f"{shared.prefix}:monitor:verdicts"
        self._append = shared.redis.register_script(APPEND)
        shared.redis.script_load(APPEND)  # a script Redis cannot run fails here, at start-up
        self.applied, self.seq = "0-0", None  # the last event applied, and its number
        self.missed = 0
        self.answers: LRUCache[str, Action] = LRUCache(10_000)  # applied events' actions, until their replica reads
        self.written: LRUCache[str, str] = LRUCache(monitor.max_flagged)  # verdicts known to be in Redis
        self.lock = threading.Lock()  # held to apply events, never across a call to Redis
        for client, saved in shared.redis.hscan_iter(self.verdicts):
            kind, p, reason = json.loads(saved)
            monitor.remember(client, Action(kind, reason, p, served=kind != "block"))
            self.written[client] = kind
        newest = shared.redis.xrevrange(self.stream, count=1)
        if newest:  # a replica that starts beside running ones first replays what the stream still holds
            self._catch_up(newest[0][0])

    def observe(self, event: Event) -> Action:
        event = compact(event)
        fields = [str(v) for name, value in vars(event).items() if value is not None for v in (name, value)]
        try:
            mine = self.shared.call("monitor", self._append, keys=[self.stream, self.counter],
                                    args=[self.max_events, *fields])
            action = self._catch_up(mine)
            if action is None:  # trimmed before it was read (a stream far too short for the load)
                action = self.monitor.actions.get(event.client, ALLOW)
            self._write(event.client, action)
            return action
        except Unreachable:
            return self.monitor.actions.get(event.client, ALLOW)

    def answered(self, client: str, prompt: str, response: str) -> None:
        """As `Monitor.answered`, for every replica: the answer joins the stream, and each replica applies it
        in its place in the order. Unreachable Redis: it is lost, counted under its own component
        (`monitor_answers`), and no replica diverges; the answer itself, generated already, is still served
        (even failing closed: the request was admitted)."""
        event = compact(Event(client, 0.0, prompt, response=response))
        try:
            self.shared.call("monitor_answers", self._append, keys=[self.stream, self.counter],
                             args=[self.max_events, "answer", "1", "client", client, "prompt", event.prompt,
                                   "response", event.response])
        except (Unreachable, APIError):
            pass

    def _catch_up(self, mine: str) -> Action | None:
        """Applies every event after the last one applied, up to `mine`; the action `mine` got (None if it
        was trimmed before any replica here read it). Reads from Redis outside the lock, applies under it:
        events another thread applied meanwhile are skipped, and its answers are kept for their threads."""
        while True:
            with self.lock:
                if mine in self.answers or _id(self.applied) >= _id(mine):
                    return self.answers.pop(mine, None)
                start = self.applied
            events = self.shared.call("monitor", self.shared.redis.xrange, self.stream, min=f"({start}", max=mine,
                                      count=1000)
            with self.lock:
                for event_id, fields in events:
                    if _id(event_id) > _id(self.applied):
                        self._apply(event_id, fields)
                if not events and _id(self.applied) < _id(mine):
                    self.applied = mine  # nothing left up to it: everything between was trimmed
                    self.answers.pop(mine, None)
                    return None

    def _apply(self, event_id: str, fields: dict[str, str]) -> None:
        seq = int(fields.pop("seq"))
        if self.seq is not None and seq > self.seq + 1:  # trimmed before this replica read them
            self.missed += seq - self.seq - 1
            self.shared.missed.inc(seq - self.seq - 1)
            logger.warning("the shared monitor missed %d events trimmed from the stream before it read them; "
                           "raise its bound (max_bytes) or give the replica more CPU", seq - self.seq - 1)
        self.seq = seq
        if "answer" in fields:
            self.monitor.answered(fields["client"], fields["prompt"], fields["response"])
        else:
            self.answers[event_id] = self.monitor.observe(_event(fields))
        self.applied = event_id

    def _write(self, client: str, action: Action) -> None:
        """Keeps `client`'s verdict in Redis once it is raised (by this replica, whose request met it)."""
        if action.kind == "allow" or LEVELS.index(action.kind) <= LEVELS.index(self.written.get(client, "allow")):
            return
        try:
            self.shared.call("monitor", self.shared.redis.hset, self.verdicts, client,
                             json.dumps([action.kind, action.p_value, action.reason]))
            self.written[client] = action.kind
        except (Unreachable, APIError):
            pass  # the verdict holds on this replica, and the client's next request writes it again


def _event(fields: dict[str, str]) -> Event:
    return Event(client=fields["client"], time=float(fields["time"]), prompt=fields["prompt"],
                 prompt_tokens=int(fields.get("prompt_tokens", 0)),
                 response_tokens=int(fields.get("response_tokens", 0)), endpoint=fields.get("endpoint", "chat"),
                 ip=fields.get("ip"), payment=fields.get("payment"))
