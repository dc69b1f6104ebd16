"""Every error the framework raises on purpose.

Each error names what was wrong and says what to do about it. All of them derive from
:class:`CollaborativeBlocksError`, so an application can catch the whole family at once.
Store errors also derive from the matching ``eventsourcing.persistence`` error class where
one exists, so code written against eventsourcing keeps catching what it expects.
"""

from __future__ import annotations

import enum

from eventsourcing.persistence import IntegrityError as _ESIntegrityError
from eventsourcing.persistence import OperationalError as _ESOperationalError
from eventsourcing.persistence import PersistenceError as _ESPersistenceError


class CollaborativeBlocksError(Exception):
    """Base class of every error raised by Collaborative Blocks."""


class ConfigurationError(CollaborativeBlocksError, ValueError):
    """A setting or a URL is not valid; the message names it and the accepted values."""


class UnknownSchemeError(ConfigurationError):
    """No installed plugin provides the URL scheme that was asked for."""

    def __init__(self, kind: str, url: str, known: list[str], setting: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.known = sorted(known)
        where = f" (from {setting})" if setting else ""
        scheme = url.split("://", 1)[0] if "://" in url else url
        super().__init__(
            f"unknown {kind} URL scheme {scheme!r} in {_redact(url)!r}{where}; "
            f"installed schemes: {', '.join(self.known) or 'none'}. "
            f"Use one of those, or install a plugin that provides {scheme!r}."
        )


class PluginError(CollaborativeBlocksError):
    """A plugin could not be loaded or returned something the hook does not allow."""


class StoreError(CollaborativeBlocksError, _ESPersistenceError):
    """Base class of event store errors."""


class ConcurrencyError(StoreError, _ESIntegrityError):
    """An append's ``expected_version`` did not match the stream; nothing was written."""

    def __init__(
        self, stream: str, expected: int, actual: int, *, first_version: int | None = None
    ) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        self.first_version = first_version
        if first_version is None:
            problem = f"stream {stream!r} is at version {actual}, not the expected {expected}"
        else:
            problem = (
                f"stream {stream!r} is already at version {actual}, so events numbered from "
                f"version {first_version} would overwrite or precede it"
            )
        super().__init__(
            f"{problem}; nothing was written. Reload the stream, re-apply the command and "
            "append again."
        )


class TrackingConflictError(StoreError, _ESIntegrityError):
    """A consumer position was not greater than the one already recorded; nothing written."""

    def __init__(self, consumer: str, position: int, recorded: int) -> None:
        self.consumer = consumer
        self.position = position
        self.recorded = recorded
        super().__init__(
            f"consumer {consumer!r} already recorded position {recorded}; position {position} "
            "must be greater. The notification was processed before: skip it."
        )


class DuplicateMessageError(StoreError, _ESIntegrityError):
    """The consumer's inbox already holds this message id: its effect happened once already."""

    def __init__(self, consumer: str, message_id: str) -> None:
        self.consumer = consumer
        self.message_id = message_id
        super().__init__(
            f"consumer {consumer!r} already processed message {message_id!r}; nothing was "
            "written. Acknowledge the duplicate without repeating its effect."
        )


class EventSerializationError(StoreError, TypeError):
    """An event could not be stored as given (state not bytes, empty topic, bad stream id)."""


class CorruptRecordError(StoreError):
    """A row read back from the store does not have the shape of a stored event."""


class StoreUnavailableError(StoreError, _ESOperationalError):
    """The database could not be reached or stopped answering; the message says which."""


class StoreClosedError(StoreError):
    """The store was closed; open a new one."""


class IllegalTransitionError(CollaborativeBlocksError):
    """A state machine was asked for a transition its lifecycle does not allow.

    Nothing is persisted when this is raised.
    """

    def __init__(self, machine: str, trigger: str, state: str, allowed: list[str]) -> None:
        self.machine = machine
        self.trigger = trigger
        self.state = state
        self.allowed = allowed
        super().__init__(
            f"{machine}: cannot {trigger!r} in state {state!r}; allowed here: "
            f"{', '.join(allowed) or 'nothing (final state)'}. Nothing was persisted."
        )


class AggregateNotFoundError(CollaborativeBlocksError, LookupError):
    """No events are stored for the aggregate id that was asked for."""


class GuardRejectedError(IllegalTransitionError):
    """The trigger is allowed in the current state, but a guard of every matching transition
    said no. Nothing is persisted when this is raised."""

    def __init__(self, machine: str, trigger: str, state: str, rejected_by: list[str]) -> None:
        self.machine = machine
        self.trigger = trigger
        self.state = state
        self.allowed = [trigger]
        self.rejected_by = rejected_by
        CollaborativeBlocksError.__init__(
            self,
            f"{machine}: {trigger!r} in state {state!r} was rejected by its guard(s) "
            f"{', '.join(rejected_by)}. Nothing was persisted. Change the arguments or the "
            "aggregate's state so the guards pass, then retry.",
        )


class CommandArgumentsError(CollaborativeBlocksError, TypeError):
    """A command (a trigger) was called with arguments its signature does not accept.

    Nothing is recorded when this is raised; the message shows the expected signature.
    """


def _redact(url: str) -> str:
    """Hide a password in a URL before it goes into an error message."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


# -- messaging --------------------------------------------------------------------------------


class MessagingError(CollaborativeBlocksError):
    """Base class of message broker and transport errors."""


class RejectionReason(enum.Enum):
    """Why a message was refused at the wire or before handling (also a dead letter's reason)."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    EXPIRED = "expired"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"


class MessageRejectedError(MessagingError, ValueError):
    """A message failed wire validation; ``reason`` says which check, the text says why."""

    def __init__(self, reason: RejectionReason, detail: str, *, message_id: str | None = None):
        self.reason = reason
        self.detail = detail
        self.message_id = message_id
        super().__init__(f"message rejected ({reason.value}): {detail}")


class UnsupportedGuaranteeError(MessagingError, ConfigurationError):
    """A delivery guarantee was asked of a transport (or broker) that cannot give it."""


class NoRouteError(MessagingError):
    """Nobody serves the target of a command or query; the message was dead-lettered."""


class QueryTimeoutError(MessagingError, TimeoutError):
    """No response to a query arrived in time."""

    def __init__(self, target: str, name: str, timeout: float, correlation_id: str) -> None:
        self.target = target
        self.name = name
        self.timeout = timeout
        self.correlation_id = correlation_id
        super().__init__(
            f"query {name!r} to {target!r} got no response within {timeout}s "
            f"(correlation id {correlation_id}). Check that {target!r} is running and "
            "registered a handler with on_query, or pass a longer timeout="
        )


class RemoteHandlerError(MessagingError):
    """The target's query handler raised; ``remote_type`` and the text say what it raised."""

    def __init__(self, target: str, name: str, remote_type: str, detail: str) -> None:
        self.target = target
        self.name = name
        self.remote_type = remote_type
        self.detail = detail
        super().__init__(f"{target!r} failed to answer query {name!r}: {remote_type}: {detail}")


class HandlerTimeoutError(MessagingError, TimeoutError):
    """A handler did not finish within the broker's handler timeout; it was cancelled."""


class BrokerClosedError(MessagingError):
    """The broker was closed; create (and start) a new one."""


class TransportUnavailableError(MessagingError):
    """The transport's server could not be reached or went away; the message says which."""


class DeadLetterNotFoundError(MessagingError, LookupError):
    """No dead letter has the id that was asked for; list them with ``cblocks dlq list``."""


class PublishTimeoutError(MessagingError, TimeoutError):
    """The transport did not accept a message in time (consumers are lagging: backpressure)."""


class RemoteCommandError(RemoteHandlerError):
    """The target's command handler failed a request (``SystemConnector.request``), or the
    target has no handler for it. ``error_type`` (also ``remote_type``) is the class name of
    what it raised (``NoHandler`` when none is registered). The broker did not redeliver the
    command: retrying is the caller's decision."""

    def __init__(self, target: str, name: str, error_type: str, detail: str) -> None:
        super().__init__(target, name, error_type, detail)
        self.error_type = error_type
        self.args = (f"{target!r} failed command {name!r}: {error_type}: {detail}",)


def redact_url(url: str) -> str:
    """``url`` with its password hidden, for error messages and logs (plugins use this)."""
    return _redact(url)


# -- sync: event streams and the real-time sync engine ----------------------------------------


class SyncError(CollaborativeBlocksError):
    """Base class of EventStream and RealTimeSyncEngine errors."""


class SyncSerializationError(SyncError, TypeError):
    """A sync event or change could not be encoded as JSON; nothing was written.

    Give plain data (dicts, lists, str, int, float, bool, None, or a dataclass of those).
    """


class StreamHandlerError(SyncError):
    """A stream subscription's handler kept failing on one event; the subscription stopped.

    The event was not skipped: ``stream_id``, ``offset`` and ``position`` name it, and a
    named subscription resumes at it when restarted. Fix the handler (or the data) and
    subscribe again.
    """

    def __init__(
        self, subscription: str, stream_id: str, offset: int, position: int, attempts: int
    ) -> None:
        self.subscription = subscription
        self.stream_id = stream_id
        self.offset = offset
        self.position = position
        self.attempts = attempts
        super().__init__(
            f"subscription {subscription!r} stopped at stream {stream_id!r} offset {offset} "
            f"(log position {position}): its handler failed {attempts} time(s); the event was "
            "not skipped. Fix the handler or the data and subscribe again (a named "
            "subscription resumes at this event)."
        )


class TopologyError(SyncError, ValueError):
    """A system registration would make the sync topology invalid; nothing was registered."""


class DuplicateSystemError(TopologyError):
    """A system id was registered twice; register each system once (on every restart too)."""


class UnknownDependencyError(TopologyError):
    """A system depends on a system that is not registered; register dependencies first."""


class DependencyCycleError(TopologyError):
    """The dependencies would form a cycle; ``cycle`` lists it. Break the cycle."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(
            "dependency cycle " + " -> ".join(cycle) + "; a change would propagate forever. "
            "Remove one of these dependencies; nothing was registered."
        )


class UnknownSystemError(SyncError, LookupError):
    """A change came from (or was asked of) a system that is not registered; nothing written."""


class ChangeOutcomeUnknownError(SyncError):
    """The store failed while recording a change, and could not be read to tell whether the
    change went through. The engine settles it by itself once the store answers (the change
    then reaches every replica, or never existed); do not propagate it again blindly."""


class ResolverFailedError(SyncError):
    """A conflict resolver raised while folding a write; the replica was left unchanged and
    the failure was recorded as a conflict (see ``RealTimeSyncEngine.conflicts``)."""


# -- sync: conflict resolvers -----------------------------------------------------------------


class ResolverError(CollaborativeBlocksError):
    """Base class of conflict resolver errors (vector clocks, writes, resolver tables)."""


class InvalidWriteError(ResolverError, ValueError):
    """A write (or its vector clock) is malformed; nothing was folded. The message says which
    field and what it must be."""


class FutureTimestampError(ResolverError, ValueError):
    """A write's timestamp is further in the future than the allowed clock skew; not folded."""

    def __init__(self, key: str, writer: str, timestamp: float, now: float, skew: float) -> None:
        self.key = key
        self.writer = writer
        self.timestamp = timestamp
        self.now = now
        self.max_clock_skew = skew
        super().__init__(
            f"write to {key!r} by {writer!r} has timestamp {timestamp} which is "
            f"{timestamp - now:.3f}s ahead of now ({now}), more than the allowed clock skew of "
            f"{skew}s; it would win every last-write-wins comparison until then. Fix the "
            f"clock of system {writer!r} (or raise max_clock_skew) and write again."
        )


class UnknownNodeError(ResolverError, LookupError):
    """A write's vector clock names a node that is not a registered system; not folded."""

    def __init__(self, key: str, writer: str, unknown: list[str], known: list[str]) -> None:
        self.key = key
        self.writer = writer
        self.unknown = unknown
        self.known = known
        super().__init__(
            f"write to {key!r} by {writer!r} carries a vector clock with unknown node(s) "
            f"{', '.join(map(repr, unknown))} (known: {', '.join(known) or 'none'}); register "
            "those systems first, or drop the write: it was not folded."
        )


class UnknownResolverError(ResolverError, ConfigurationError, LookupError):
    """A key pattern names a conflict resolver no plugin provides."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"no conflict resolver named {name!r}; installed: {', '.join(known) or 'none'}. "
            "Use one of those, or register a plugin whose cb_conflict_resolvers provides it."
        )


class MergeFunctionError(ResolverError):
    """A resolver's merge function raised on a key's siblings; the siblings are kept and the
    failure is listed by ``conflicts(state)``. Fix the function; the state is unchanged."""

    def __init__(self, resolver: str, key: str, siblings: int, cause: BaseException) -> None:
        self.resolver = resolver
        self.key = key
        self.siblings = siblings
        self.cause = cause
        super().__init__(
            f"resolver {resolver!r}: the merge function for key {key!r} raised "
            f"{type(cause).__name__}: {cause} on {siblings} concurrent writes; they are kept as "
            "siblings (see conflicts(state)). Fix the function or choose a fallback."
        )


class UnresolvedConflictError(ResolverError):
    """A key holds concurrent writes and its resolver was told to raise rather than pick one."""

    def __init__(self, resolver: str, key: str, siblings: int) -> None:
        self.resolver = resolver
        self.key = key
        self.siblings = siblings
        super().__init__(
            f"resolver {resolver!r}: key {key!r} holds {siblings} concurrent writes and no "
            "merge function or fallback picks one; list them with conflicts(state), then write "
            "a value that supersedes them (its vector clock merging theirs) or configure a "
            "merge function/fallback."
        )


class InvalidOperationError(ResolverError, ValueError):
    """A write's value is not an operation the key's resolver understands; not folded."""


# -- workflows: definitions, runs, circuit breakers --------------------------------------------


class WorkflowError(CollaborativeBlocksError):
    """Base class of workflow definition, run and circuit breaker errors."""


class WorkflowDefinitionError(WorkflowError, ValueError):
    """A workflow definition is invalid; nothing was defined.

    ``workflow_id`` and ``step_id`` (when the problem is in one step) name where; the message
    says what is wrong and how to fix it.
    """

    def __init__(self, workflow_id: str, step_id: str | None, problem: str) -> None:
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.problem = problem
        where = (
            f"step {step_id!r} of workflow {workflow_id!r}"
            if step_id
            else (f"workflow {workflow_id!r}")
        )
        super().__init__(f"{where}: {problem}")


class ConditionError(WorkflowError):
    """A step's condition could not be evaluated for a run (for example it reads a value the
    run does not have); the step fails without retry. Guard optional values with CEL's
    ``has(...)``."""


class UnknownWorkflowError(WorkflowError, LookupError):
    """No workflow with this id was defined; call ``define_workflow`` first."""


class UnknownRunError(WorkflowError, LookupError):
    """No workflow run with this id is in the event store."""


class StepFailedError(WorkflowError):
    """A step's action failed (the target's handler raised, or no reply came in time)."""

    def __init__(self, step_id: str, error_type: str, detail: str) -> None:
        self.step_id = step_id
        self.error_type = error_type
        self.detail = detail
        super().__init__(f"step {step_id!r} failed: {error_type}: {detail}")


class CircuitOpenError(WorkflowError):
    """The circuit breaker for ``target`` is open (or half-open with every trial call taken):
    the call was not made. Retry after ``retry_after`` seconds, or route to a fallback."""

    def __init__(self, target: str, retry_after: float) -> None:
        self.target = target
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker for {target!r} is open; no call was made. It lets trial calls "
            f"through in {retry_after:.3g}s; retry later or route to a fallback target"
        )


class RetryPolicyError(WorkflowError, ValueError):
    """A retry policy has a bad value (negative, backoff below 1, jitter outside [0, 1], an
    unknown key); inside a workflow definition it is reported as a
    :class:`WorkflowDefinitionError` naming the step."""


# -- simulations ------------------------------------------------------------------------------


class SimulationError(CollaborativeBlocksError):
    """Base class of chaos simulation errors."""


class FaultPlanError(SimulationError, ValueError):
    """A fault plan spec could not be parsed; the message names the bad entry and the
    accepted forms (see ``cblocks chaos run --help``)."""


class UnknownScenarioError(SimulationError, LookupError):
    """No chaos scenario has this name; ``cblocks chaos list`` shows the ones installed."""


class NondeterminismError(SimulationError):
    """A simulated run touched a source of non-determinism (real time, real I/O, a thread)
    or replayed to a different digest; the message says which."""
