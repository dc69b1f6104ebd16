"""State-machine aggregates: a lifecycle declared once, every transition a persisted event.

An aggregate's legal lifecycle is declared on its class: an ``Enum`` of states (``str``
values), the ``initial`` state, and one method per trigger decorated with :func:`transition`.
Calling a trigger method validates it against a ``transitions.Machine`` (compiled once per
class, shared by every instance), records one event that carries the trigger's arguments and
the destination state, and applies it. Replaying the stored events rebuilds the state without
re-checking anything: history is fact. An illegal trigger raises
:class:`~collaborative_blocks.errors.IllegalTransitionError` and records nothing.

```python
class OrderState(enum.Enum):
    NEW = "new"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"

class Order(StateMachineAggregate[OrderState]):
    initial = OrderState.NEW

    @event("Placed")
    def __init__(self, customer: str) -> None:
        self.customer = customer
        self.paid = 0

    def covers_total(self, amount: int) -> bool:        # a guard
        return amount >= 10

    @transition(source=OrderState.NEW, dest=OrderState.PAID, conditions=[covers_total])
    def pay(self, amount: int) -> None:                  # records an event "Pay"
        self.paid = amount

    @transition(source=OrderState.PAID, dest=OrderState.SHIPPED, event="Shipped")
    def ship(self) -> None: ...

    @transition(source=[OrderState.NEW, OrderState.PAID], dest=OrderState.CANCELLED)
    def cancel(self, reason: str) -> None:
        self.reason = reason

order = Order(customer="ann")
order.pay(amount=12)       # order.state is OrderState.PAID
order.ship()
order.cancel(reason="x")   # IllegalTransitionError: cannot 'cancel' in state 'shipped'
```

Guards (``conditions`` must all be true, ``unless`` must all be false) are methods of the
aggregate class, given by name or as the function itself (or a property, or any function
taking the aggregate first; a static or class method is called without it). Each is called
with those of the trigger's arguments its signature names (all of them if it takes
``**kwargs``), and must not change anything. They run when the command is issued, never on
replay. A trigger may have several transitions (stack :func:`transition` decorators): the
first whose source matches and whose guards pass wins, as in ``transitions``.

The trigger method's body runs first, still in the source state, then the state changes: if
the body raises, neither the event nor the state change is recorded.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

from eventsourcing.domain import CanMutateAggregate, event
from transitions import EventData, Machine

from collaborative_blocks.core.aggregates import (
    Aggregate,
    FastApply,
    _fast_apply_for,
    _plain_attributes,
)
from collaborative_blocks.errors import (
    CommandArgumentsError,
    GuardRejectedError,
    IllegalTransitionError,
)

__all__ = [
    "Guard",
    "Lifecycle",
    "StateMachineAggregate",
    "Trigger",
    "Upcaster",
    "transition",
]

S = TypeVar("S", bound=enum.Enum)
F = TypeVar("F", bound=Callable[..., None])

Guard = str | Callable[..., bool] | property
"""A guard: the name of an aggregate method or property, or a callable taking the aggregate."""

#: Where an instance keeps its current state's value (a plain string, so snapshots and
#: ``vars()`` stay JSON-friendly).
STATE_ATTRIBUTE = "_cb_state"
#: The event field that carries the destination state.
TO_STATE = "to_state"
_SPEC_ATTRIBUTE = "__cb_transitions__"
_EVENT_NAME_ATTRIBUTE = "__cb_event_name__"
_UPCASTERS_ATTRIBUTE = "__cb_upcasters__"

Upcaster = Callable[[dict[str, Any]], None]
"""Changes a stored event's state dict, in place, from one class version to the next."""


@dataclass(frozen=True, slots=True)
class _TransitionSpec:
    sources: tuple[enum.Enum, ...] | Literal["*"]
    dest: enum.Enum | None
    conditions: tuple[Guard, ...]
    unless: tuple[Guard, ...]


def transition(
    *,
    source: S | Iterable[S] | Literal["*"],
    dest: S | None = None,
    conditions: Guard | Iterable[Guard] = (),
    unless: Guard | Iterable[Guard] = (),
    event: str | None = None,
    upcasters: Sequence[Upcaster] = (),
) -> Callable[[F], F]:
    """Declare the decorated method as a trigger of the aggregate's state machine.

    ``source``: the state(s) the trigger is allowed in (``"*"``: any state). ``dest``: the
    state it leads to (None: stay in the current state, an internal transition).
    ``conditions``/``unless``: guards (see the module docs). ``event``: the name of the
    recorded event class (default: the method name in CamelCase, as eventsourcing's
    ``@event`` would name it).

    The method's parameters are the trigger's payload and become the event's fields; its
    body applies the event to the aggregate, both when the command is issued and on replay,
    so it must only change the aggregate from its arguments. Stack several ``@transition``
    decorators for a trigger with several (source, dest) pairs; the first one whose source
    matches and whose guards pass is taken.

    ``upcasters``: schema evolution of the recorded event. When the method's parameters
    change, append a function that turns the stored state dict of the previous version into
    the current one (add a field with a default, rename one...). With N upcasters the event
    class is at ``class_version`` N + 1 and events stored by older versions are upcast, one
    step after another, as they are loaded (eventsourcing's ``upcast_vX_vY`` mechanism).
    Give them on one of a stacked trigger's decorators.
    """
    if source == "*":
        sources: tuple[enum.Enum, ...] | Literal["*"] = "*"
    elif isinstance(source, enum.Enum):
        sources = (source,)
    else:
        sources = tuple(cast(Iterable[enum.Enum], source))
    spec = _TransitionSpec(
        sources=sources,
        dest=dest,
        conditions=_as_guards(conditions),
        unless=_as_guards(unless),
    )

    def decorate(func: F) -> F:
        if not inspect.isfunction(func):
            raise TypeError(f"@transition decorates a method, not {func!r}")
        specs: list[_TransitionSpec] = list(getattr(func, _SPEC_ATTRIBUTE, ()))
        # Decorators apply bottom-up; keep the written (top-down) order, the one tried first.
        specs.insert(0, spec)
        setattr(func, _SPEC_ATTRIBUTE, tuple(specs))
        if event is not None:
            setattr(func, _EVENT_NAME_ATTRIBUTE, event)
        if upcasters:
            if getattr(func, _UPCASTERS_ATTRIBUTE, None) is not None:
                raise TypeError(
                    f"{func.__qualname__}: upcasters given on two @transition decorators; "
                    "give them once"
                )
            setattr(func, _UPCASTERS_ATTRIBUTE, tuple(upcasters))
        return func

    return decorate


def _as_guards(guards: Guard | Iterable[Guard]) -> tuple[Guard, ...]:
    if isinstance(guards, str | property) or callable(guards):
        return (guards,)
    return tuple(guards)


_Declaration = tuple[Callable[..., None], tuple[_TransitionSpec, ...], str]


_NO_DEFAULT: Any = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class Trigger:
    """One trigger of a lifecycle: its name, the event class it records, its signature."""

    name: str
    event_class: type[CanMutateAggregate[Any]]
    signature: inspect.Signature
    #: The fast binder's table, (name, default) in signature order without ``self``, when
    #: every parameter is a plain one (positional-or-keyword or keyword-only); else None.
    fields: tuple[tuple[str, Any], ...] | None = None
    #: How many leading fields may be given positionally.
    positional: int = 0
    names: frozenset[str] = frozenset()
    #: Applies a recorded event of this trigger from its field dict, when the event class is
    #: eventsourcing's standard one (see :meth:`StateMachineAggregate._fire`); else None.
    fast_apply: FastApply | None = None


def _trigger(
    name: str, event_class: type[CanMutateAggregate[Any]], func: Callable[..., None]
) -> Trigger:
    """The trigger with its binder table (see :meth:`StateMachineAggregate._bind`)."""
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())[1:]
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not all(p.kind in plain for p in parameters):
        return Trigger(name, event_class, signature)
    positional = 0
    for p in parameters:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        positional += 1
    fields = tuple((p.name, p.default) for p in parameters)
    return Trigger(
        name,
        event_class,
        signature,
        fields,
        positional,
        frozenset(p.name for p in parameters),
        _event_fast_apply(event_class, [p.name for p in parameters]),
    )


_EVENT_HEAD = ["originator_id", "originator_version", "timestamp", TO_STATE]


def _event_fast_apply(
    event_class: type[CanMutateAggregate[Any]], payload: list[str]
) -> FastApply | None:
    """The event class's fast applier, if building its events from a dict is what its
    dataclass ``__init__`` does: the fields are the standard head then the trigger's
    arguments, in that order (the stored bytes follow it); its ``__post_init__`` (the
    originator id check) is called as ``__init__`` would."""
    candidate: Any = event_class
    if not dataclasses.is_dataclass(candidate):
        return None
    if [f.name for f in dataclasses.fields(candidate)] != [*_EVENT_HEAD, *payload]:
        return None
    return _fast_apply_for(event_class)


_PLAIN_CLASSES: dict[type, bool] = {}


def _plain_class(cls: type, aggregate: Any) -> bool:
    """Whether ``cls`` keeps eventsourcing's plain ``version``/``modified_on`` properties
    (so writing ``_version``/``_modified_on`` is setting them); asked once per class."""
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        plain = _PLAIN_CLASSES[cls] = _plain_attributes(aggregate) is not None
    return plain


@dataclass(slots=True)
class Lifecycle(Generic[S]):
    """A state-machine aggregate class's compiled lifecycle (``Order.lifecycle``).

    ``machine`` is the ``transitions.Machine`` that validates triggers (no models are
    attached: instances keep their own state and share this one machine).
    """

    owner: str
    states: type[S]
    initial: S
    machine: Machine
    triggers: dict[str, Trigger] = field(default_factory=dict)

    def allowed(self, state: S) -> list[str]:
        """The triggers that have a transition out of ``state`` (guards not evaluated)."""
        return sorted(self.machine.get_triggers(state.value))


def _guard_callable(
    cls: type, guard: Guard, trigger: str, arguments: frozenset[str]
) -> Callable[[EventData], bool]:
    check = _guard_check(cls, guard, trigger, arguments)
    name = guard if isinstance(guard, str) else getattr(guard, "__name__", None)
    if name is None and isinstance(guard, property) and guard.fget is not None:
        name = guard.fget.__name__
    check.__cb_guard_name__ = name or repr(guard)  # type: ignore[attr-defined]
    return check


def _guard_check(
    cls: type, guard: Guard, trigger: str, arguments: frozenset[str]
) -> Callable[[EventData], bool]:
    target: Any = guard
    if isinstance(guard, str):
        target = inspect.getattr_static(cls, guard, None)
        if target is None:
            raise TypeError(
                f"{cls.__qualname__}.{trigger}: guard {guard!r} is not an attribute of "
                f"{cls.__qualname__}; define a method {guard}(self, ...) -> bool"
            )
    # A static or class method does not take the aggregate; everything else does.
    call_with_model = not isinstance(target, staticmethod | classmethod)
    if not call_with_model:
        target = target.__get__(None, cls)
    if isinstance(target, property):
        getter = target.fget
        if getter is None:
            raise TypeError(f"{cls.__qualname__}.{trigger}: guard property has no getter")
        return lambda data: bool(getter(data.model))
    if not callable(target):
        raise TypeError(
            f"{cls.__qualname__}.{trigger}: guard {guard!r} is not callable; give a method, "
            "a property or a function taking the aggregate"
        )
    parameters = inspect.signature(target).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    names = frozenset(parameters)
    # Catch a guard that needs an argument the trigger never passes when the class is
    # defined, not when a command first reaches it.
    own = list(parameters.values())[1 if call_with_model else 0 :]
    needed = [
        p.name
        for p in own
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in arguments
    ]
    if needed:
        label = guard if isinstance(guard, str) else getattr(guard, "__name__", repr(guard))
        raise TypeError(
            f"{cls.__qualname__}.{trigger}: guard {label!r} needs {', '.join(needed)}, which "
            f"{trigger}() does not take; give the guard's parameters the names of the "
            "trigger's arguments, or defaults"
        )
    func = cast(Callable[..., Any], target)

    def check(data: EventData) -> bool:
        kwargs: Mapping[str, Any] = data.kwargs
        if not takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in names}
        if call_with_model:
            return bool(func(data.model, **kwargs))
        return bool(func(**kwargs))

    return check


def _make_applier(func: Callable[..., None], name: str) -> Callable[..., None]:
    """The function the recorded event calls: the trigger body, then the state change.

    Its signature is the trigger's with ``to_state`` first, so eventsourcing defines the event
    class with the trigger's arguments plus the destination, and replay can pass them
    positionally when the trigger's parameters allow it.
    """

    def applier(self: Any, to_state: str, *args: Any, **kwargs: Any) -> None:
        func(self, *args, **kwargs)
        self.__dict__[STATE_ATTRIBUTE] = to_state

    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    applier.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            parameters[0],
            inspect.Parameter(TO_STATE, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
            *parameters[1:],
        ]
    )
    applier.__name__ = f"_cb_apply_{name}"
    applier.__qualname__ = f"{func.__qualname__.rsplit('.', 1)[0]}._cb_apply_{name}"
    applier.__module__ = func.__module__
    applier.__doc__ = func.__doc__
    return applier


def _make_command(trigger: str, func: Callable[..., None]) -> Callable[..., None]:
    def command(self: StateMachineAggregate[Any], *args: Any, **kwargs: Any) -> None:
        self._fire(trigger, args, kwargs)

    command.__name__ = func.__name__
    command.__qualname__ = func.__qualname__
    command.__module__ = func.__module__
    command.__doc__ = func.__doc__
    command.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return command


class StateMachineAggregate(Aggregate, Generic[S]):
    """Base class of aggregates whose lifecycle is a ``transitions`` state machine.

    Subclasses set ``initial`` to a member of their states ``Enum`` (whose values must be
    strings) and declare triggers with :func:`transition`. ``state`` is the current state;
    ``allowed_triggers`` the triggers with a transition out of it; :meth:`fire` issues a
    trigger by name (for code that drives machines generically); :meth:`may` asks whether a
    trigger would be accepted now.
    """

    # Declared for type checkers only: eventsourcing turns a class with annotations into a
    # dataclass, whose generated __init__ would shadow the subclasses' inherited ones.
    if TYPE_CHECKING:
        lifecycle: ClassVar[Lifecycle[Any]]
        _cb_declarations: ClassVar[dict[str, _Declaration]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        pending: list[tuple[str, Callable[..., None], tuple[_TransitionSpec, ...], str]] = []
        for name, value in list(cls.__dict__.items()):
            specs = getattr(value, _SPEC_ATTRIBUTE, None)
            if specs is None or not inspect.isfunction(value):
                continue
            if TO_STATE in inspect.signature(value).parameters:
                raise TypeError(
                    f"{cls.__qualname__}.{name}: the parameter name {TO_STATE!r} is reserved "
                    "for the destination state; rename the parameter"
                )
            event_name = getattr(
                value,
                _EVENT_NAME_ATTRIBUTE,
                "".join(part.capitalize() for part in name.split("_")),
            )
            applier = _make_applier(value, name)
            # eventsourcing defines the event class from the applier's signature when it
            # processes the class, under a private attribute; the public name becomes the
            # validating command.
            setattr(cls, f"_cb_apply_{name}", event(event_name)(applier))
            setattr(cls, name, _make_command(name, value))
            pending.append((name, value, specs, event_name))
        super().__init_subclass__(**kwargs)
        initial = cls.__dict__.get("initial", getattr(cls, "initial", None))
        if initial is None:
            if pending:
                raise TypeError(
                    f"{cls.__qualname__} declares transitions but no initial state; set "
                    "initial = <YourStates>.<FIRST> on the class"
                )
            return  # an abstract intermediate base
        cls._compile(initial, pending)

    @classmethod
    def _compile(
        cls,
        initial: enum.Enum,
        pending: list[tuple[str, Callable[..., None], tuple[_TransitionSpec, ...], str]],
    ) -> None:
        if not isinstance(initial, enum.Enum):
            raise TypeError(
                f"{cls.__qualname__}.initial must be a member of an Enum of states, got {initial!r}"
            )
        states = type(initial)
        for member in states:
            if not isinstance(member.value, str):
                raise TypeError(
                    f"{cls.__qualname__}: state {member!r} has a non-string value; the value "
                    "is what events store, so give every state a str value"
                )
        declarations: dict[str, _Declaration] = dict(getattr(cls, "_cb_declarations", {}))
        for name, func, specs, event_name in pending:
            declarations[name] = (func, specs, event_name)
        machine = Machine(
            model=None,
            states=[member.value for member in states],
            initial=initial.value,
            auto_transitions=False,
            send_event=True,
            name=cls.__qualname__,
        )
        lifecycle: Lifecycle[Any] = Lifecycle(
            owner=cls.__qualname__, states=states, initial=initial, machine=machine
        )
        for name, (func, specs, _event_name) in declarations.items():
            arguments = frozenset(list(inspect.signature(func).parameters)[1:])
            for spec in specs:
                if spec.sources == "*":
                    source: Any = "*"
                else:
                    source = [cls._state_value(states, s, name) for s in spec.sources]
                dest = None if spec.dest is None else cls._state_value(states, spec.dest, name)
                machine.add_transition(
                    trigger=name,
                    source=source,
                    dest=dest,
                    conditions=[_guard_callable(cls, g, name, arguments) for g in spec.conditions],
                    unless=[_guard_callable(cls, g, name, arguments) for g in spec.unless],
                )
            applier_decorator = getattr(cls, f"_cb_apply_{name}")
            event_class = cls._event_class_of(name, applier_decorator)
            upcasters: tuple[Upcaster, ...] = getattr(func, _UPCASTERS_ATTRIBUTE, ())
            if upcasters:
                # Where eventsourcing's Mapper (writing) and the Repository (reading) look.
                cast(Any, event_class).class_version = len(upcasters) + 1
                for version, upcaster in enumerate(upcasters, 1):
                    setattr(
                        event_class, f"upcast_v{version}_v{version + 1}", staticmethod(upcaster)
                    )
            lifecycle.triggers[name] = _trigger(name, event_class, func)
        cls._cb_declarations = declarations
        cls.lifecycle = lifecycle

    @staticmethod
    def _state_value(states: type[enum.Enum], state: object, trigger: str) -> str:
        if not isinstance(state, states):
            raise TypeError(
                f"trigger {trigger!r}: state {state!r} is not a member of {states.__name__}"
            )
        return cast(str, state.value)

    @classmethod
    def _event_class_of(cls, name: str, applier: Any) -> type[CanMutateAggregate[Any]]:
        from eventsourcing.domain import decorated_func_callers

        # The private applier attribute resolves to eventsourcing's command decorator, whose
        # registered event class is the one this class (or the base that declared it) defined.
        decorator = inspect.getattr_static(cls, f"_cb_apply_{name}")
        return cast(type[CanMutateAggregate[Any]], decorated_func_callers[decorator])

    def __base_init__(
        self, originator_id: Any, originator_version: int, timestamp: datetime
    ) -> None:
        super().__base_init__(originator_id, originator_version, timestamp)
        self.__dict__[STATE_ATTRIBUTE] = type(self).lifecycle.initial.value

    # -- the public surface ------------------------------------------------------------------

    @property
    def state(self) -> S:
        """The current state."""
        return cast(S, type(self).lifecycle.states(self.__dict__[STATE_ATTRIBUTE]))

    @property
    def allowed_triggers(self) -> list[str]:
        """Triggers with a transition out of the current state (guards not evaluated)."""
        return type(self).lifecycle.allowed(self.state)

    def fire(self, trigger: str, /, **payload: Any) -> None:
        """Issue ``trigger`` by name with ``payload`` as its keyword arguments.

        Same as calling the trigger method: records one event, or raises
        :class:`~collaborative_blocks.errors.IllegalTransitionError` (unknown trigger, not
        allowed in the current state, or a guard said no) and records nothing.
        """
        self._fire(trigger, (), payload)

    def may(self, trigger: str, /, **payload: Any) -> bool:
        """Whether ``trigger`` with ``payload`` would be accepted now (guards evaluated)."""
        try:
            self._select(trigger, self._bind(trigger, (), payload))
        except (IllegalTransitionError, CommandArgumentsError):
            return False
        return True

    def _bind(self, trigger: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        lifecycle = type(self).lifecycle
        spec = lifecycle.triggers.get(trigger)
        if spec is None:
            raise IllegalTransitionError(
                lifecycle.owner, trigger, self.state.value, lifecycle.allowed(self.state)
            )
        fields = spec.fields
        if fields is not None and len(args) <= spec.positional and spec.names.issuperset(kwargs):
            # The fast binder: what Signature.bind + apply_defaults give for plain parameters,
            # without building a BoundArguments per command.
            payload: dict[str, Any] = {}
            for index, (field_name, default) in enumerate(fields):
                if index < len(args):
                    if field_name in kwargs:
                        break  # given twice: Signature.bind words the error
                    payload[field_name] = args[index]
                elif field_name in kwargs:
                    payload[field_name] = kwargs[field_name]
                elif default is not _NO_DEFAULT:
                    payload[field_name] = default
                else:
                    break  # missing: Signature.bind words the error
            else:
                return payload
        try:
            bound = spec.signature.bind(self, *args, **kwargs)
        except TypeError as error:
            expected = ", ".join(
                str(p.replace(annotation=inspect.Parameter.empty))
                for p in list(spec.signature.parameters.values())[1:]
            )
            raise CommandArgumentsError(
                f"{lifecycle.owner}.{trigger}({expected}): {error}. Nothing was recorded."
            ) from None
        bound.apply_defaults()
        payload = dict(bound.arguments)
        payload.pop(next(iter(spec.signature.parameters)))  # self
        return payload

    def _select(self, trigger: str, payload: dict[str, Any]) -> str:
        lifecycle = type(self).lifecycle
        machine = lifecycle.machine
        current = self.__dict__[STATE_ATTRIBUTE]
        candidates = machine.events[trigger].transitions.get(current)
        if not candidates:
            raise IllegalTransitionError(
                lifecycle.owner, trigger, current, lifecycle.allowed(self.state)
            )
        first = candidates[0]
        if not first.conditions:  # no guards (the common case): no EventData to build
            return current if first.dest is None else first.dest
        data = EventData(
            machine.get_state(current), machine.events[trigger], machine, self, (), payload
        )
        rejected: list[str] = []
        for candidate in candidates:
            failed = [c for c in candidate.conditions if not c.check(data)]
            if not failed:
                return current if candidate.dest is None else candidate.dest
            rejected.extend(_guard_name(c) for c in failed)
        raise GuardRejectedError(lifecycle.owner, trigger, current, rejected)

    def _fire(self, trigger: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        payload = self._bind(trigger, args, kwargs)
        to_state = self._select(trigger, payload)
        cls = type(self)
        spec = cls.lifecycle.triggers[trigger]
        event_class = spec.event_class
        fast_apply = spec.fast_apply
        attributes = self.__dict__
        if (
            fast_apply is None
            or getattr(cls, "TOPIC", None)
            or type(attributes.get("_version")) is not int
            or not _plain_class(cls, self)
        ):
            self.trigger_event(event_class, **{TO_STATE: to_state}, **payload)
            return
        # eventsourcing's trigger_event + mutate + apply for a standard event class, without
        # the keyword plumbing: the same event (fields in the same order), the same checks
        # (a body that raises records nothing), the same bookkeeping.
        version = attributes["_version"] + 1
        timestamp = event_class.create_timestamp()
        state: dict[str, Any] = {
            "originator_id": attributes["_id"],
            "originator_version": version,
            "timestamp": timestamp,
            TO_STATE: to_state,
        }
        state.update(payload)
        recorded: Any = object.__new__(event_class)
        object.__setattr__(recorded, "__dict__", state)
        post_init = getattr(recorded, "__post_init__", None)
        if post_init is not None:
            post_init()
        fast_apply(self, state)
        attributes["_version"] = version
        attributes["_modified_on"] = timestamp
        attributes["_pending_events"].append(recorded)


def _guard_name(condition: Any) -> str:
    func = condition.func
    name = getattr(func, "__cb_guard_name__", None) or getattr(func, "__name__", repr(func))
    return f"not {name}" if condition.target is False else str(name)
