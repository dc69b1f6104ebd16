"""Workflow definitions: steps over a DAG, retry policies, adaptation rules, YAML/JSON documents.

A :class:`WorkflowDefinition` is a named set of :class:`WorkflowStep` s. Each step sends one
``action`` as a command to a ``system_target`` and may depend on other steps, run only when
its ``condition`` holds, retry by its :class:`RetryPolicy` and name a ``compensation`` action
that undoes it when a later step fails (a saga). :meth:`WorkflowDefinition.compile` validates
everything at once and returns a :class:`CompiledWorkflow` (topological order, compiled
conditions, resolved retry policies, a fingerprint); the engine's ``define_workflow`` calls it.

>>> workflow = WorkflowDefinition("orders", "Place an order", inputs=["order_id", "express"])
>>> _ = workflow.add_step(WorkflowStep(
...     step_id="reserve", system_target="inventory", action="reserve",
...     parameters={"order": "${order_id}"}, compensation="release"))
>>> _ = workflow.add_step(WorkflowStep(
...     step_id="ship", system_target="shipping", action="ship",
...     parameters={"reservation": "${steps.reserve.output.id}"},
...     retry_policy={"max_retries": 3, "delay": 1}, dependencies=["reserve"],
...     condition="${express} == true"))
>>> compiled = workflow.compile()
>>> compiled.order
('reserve', 'ship')
>>> compiled.steps["ship"].upstream
frozenset({'reserve'})

The same workflow as a YAML document (:meth:`WorkflowDefinition.from_yaml`,
:func:`load_definition`); ``id``, ``target``, ``depends_on`` and ``when`` are accepted as
short names of ``step_id``, ``system_target``, ``dependencies`` and ``condition``::

    workflow_id: orders
    name: Place an order
    inputs: [order_id, express]
    steps:
      - id: reserve
        target: inventory
        action: reserve
        parameters: {order: "${order_id}"}
        compensation: release
      - id: ship
        target: shipping
        action: ship
        parameters: {reservation: "${steps.reserve.output.id}"}
        retry_policy: {max_retries: 3, delay: 1}
        depends_on: [reserve]
        when: "${express} == true"
"""

from __future__ import annotations

import copy
import enum
import hashlib
import heapq
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn

import yaml

from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.workflows.conditions import (
    Condition,
    compile_condition,
    template_references,
    validate_references,
)
from collaborative_blocks.errors import (
    ConditionError,
    RetryPolicyError,
    WorkflowDefinitionError,
)

__all__ = [
    "AdaptationRule",
    "CompiledStep",
    "CompiledWorkflow",
    "RetryPolicy",
    "RuleAction",
    "RuleTrigger",
    "WorkflowDefinition",
    "WorkflowStep",
    "load_definition",
]


# --------------------------------------------------------------------------------------------
# Retry policy


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RetryPolicyError(f"retry policy {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RetryPolicyError(f"retry policy {name} must be finite, got {value!r}")
    return float(value)


def _names(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise RetryPolicyError(
            f"retry policy {name} must be a list of error type names, got {value!r}"
        )
    return tuple(value)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing step is retried.

    ``max_retries`` retries follow the first attempt. Retry ``n`` (1 = the first retry) waits
    ``min(delay * backoff ** (n - 1), max_delay)``, spread by ``jitter`` (a fraction: 0.1 is
    ±10 %). ``retry_on`` lists the error type names that retry (empty: every error retries);
    ``non_retryable`` lists the ones that never do (a failing condition by default).

    >>> policy = RetryPolicy(max_retries=3, delay=1, jitter=0)
    >>> [policy.delay_for(n, random.Random(0)) for n in (1, 2, 3)]
    [1.0, 2.0, 4.0]
    >>> policy.retries("TimeoutError"), policy.retries("ConditionError")
    (True, False)
    """

    max_retries: int
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    retry_on: tuple[str, ...] = ()
    non_retryable: tuple[str, ...] = ("ConditionError",)

    #: The keys :meth:`from_value` accepts.
    KEYS: ClassVar[tuple[str, ...]] = (
        "max_retries",
        "delay",
        "backoff",
        "max_delay",
        "jitter",
        "retry_on",
        "non_retryable",
    )

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise RetryPolicyError(
                f"retry policy max_retries must be a whole number >= 0, got {self.max_retries!r}"
            )
        if _number(self.delay, "delay") < 0:
            raise RetryPolicyError(f"retry policy delay must be >= 0 seconds, got {self.delay!r}")
        if _number(self.backoff, "backoff") < 1:
            raise RetryPolicyError(
                f"retry policy backoff must be >= 1 (1 = constant delay), got {self.backoff!r}"
            )
        if _number(self.max_delay, "max_delay") < 0:
            raise RetryPolicyError(
                f"retry policy max_delay must be >= 0 seconds, got {self.max_delay!r}"
            )
        if not 0 <= _number(self.jitter, "jitter") <= 1:
            raise RetryPolicyError(
                f"retry policy jitter is a fraction between 0 and 1 (0.1 = ±10 %), "
                f"got {self.jitter!r}"
            )
        for name in ("delay", "backoff", "max_delay", "jitter"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "retry_on", _names(self.retry_on, "retry_on"))
        object.__setattr__(self, "non_retryable", _names(self.non_retryable, "non_retryable"))

    def delay_for(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``attempt`` (1 = the first retry), jitter included."""
        base = min(self.delay * self.backoff ** max(attempt - 1, 0), self.max_delay)
        if self.jitter:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(base, self.max_delay))

    def retries(self, error_type: str) -> bool:
        """True if an error of this type (class name) may be retried."""
        if error_type in self.non_retryable:
            return False
        return not self.retry_on or error_type in self.retry_on

    def to_dict(self) -> dict[str, JSONValue]:
        """Every field, as a JSON object :meth:`from_value` reads back."""
        return {
            "max_retries": self.max_retries,
            "delay": self.delay,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "retry_on": list(self.retry_on),
            "non_retryable": list(self.non_retryable),
        }

    @classmethod
    def from_value(
        cls, value: Mapping[str, Any] | RetryPolicy | None, *, default_max_retries: int
    ) -> RetryPolicy:
        """A policy from a step's ``retry_policy``: None -> ``default_max_retries`` (the
        caller passes ``MAX_RETRY_ATTEMPTS``) with the other defaults; a mapping such as the
        seed's ``{"max_retries": 3, "delay": 1}`` (missing keys take the defaults); a policy
        as it is. Raises :class:`~collaborative_blocks.errors.RetryPolicyError` naming an
        unknown key or a bad value."""
        if value is None:
            return cls(max_retries=default_max_retries)
        if isinstance(value, RetryPolicy):
            return value
        if not isinstance(value, Mapping):
            raise RetryPolicyError(
                f"retry policy must be a mapping such as {{'max_retries': 3, 'delay': 1}}, "
                f"got {value!r}"
            )
        unknown = sorted(str(key) for key in value if key not in cls.KEYS)
        if unknown:
            raise RetryPolicyError(
                f"retry policy has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(cls.KEYS)}"
            )
        arguments = dict(value)
        arguments.setdefault("max_retries", default_max_retries)
        return cls(**arguments)


# --------------------------------------------------------------------------------------------
# Steps and rules


@dataclass(frozen=True)
class WorkflowStep:
    """One step: send ``action`` as a command to ``system_target`` and wait for the reply.

    ``parameters`` may hold ``${...}`` templates (``${order_id}``, ``${input.x}``,
    ``${steps.<id>.output.y}``) rendered when the step starts. ``retry_policy`` is a
    :class:`RetryPolicy` or a mapping of its fields (None: the engine's default from
    ``MAX_RETRY_ATTEMPTS``). The step starts when every step in ``dependencies`` is done
    (completed or skipped) and its ``condition`` (CEL, see
    :mod:`collaborative_blocks.core.workflows.conditions`) holds; a false condition skips it.
    ``compensation`` is the action sent to the same target to undo the step when a later one
    fails, with ``compensation_parameters`` (which may read ``${steps.<this step>.output}``).
    ``timeout`` bounds each attempt (seconds; None: the engine's default). ``optional`` steps
    may be skipped by an ``under_load`` rule; ``fallback_target`` is where a ``route_to`` rule
    without its own ``route_to`` sends the step.
    """

    step_id: str
    system_target: str
    action: str
    parameters: Mapping[str, JSONValue] | None = None
    retry_policy: Mapping[str, Any] | RetryPolicy | None = None
    dependencies: Sequence[str] = ()
    condition: str | None = None
    compensation: str | None = None
    compensation_parameters: Mapping[str, JSONValue] | None = None
    timeout: float | None = None
    optional: bool = False
    fallback_target: str | None = None

    def __post_init__(self) -> None:
        # Copies, so a caller's later edits to its dicts and lists never change a definition.
        if isinstance(self.dependencies, str):
            object.__setattr__(self, "dependencies", (self.dependencies,))
        else:
            object.__setattr__(self, "dependencies", tuple(self.dependencies))
        for name in ("parameters", "compensation_parameters", "retry_policy"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, copy.deepcopy(dict(value)))

    def to_dict(self) -> dict[str, JSONValue]:
        """The step as a JSON object in the document schema (canonical key names)."""
        retry: JSONValue
        if isinstance(self.retry_policy, RetryPolicy):
            retry = self.retry_policy.to_dict()
        elif self.retry_policy is None:
            retry = None
        else:
            retry = copy.deepcopy(dict(self.retry_policy))
        compensation: JSONValue = None
        if self.compensation is not None:
            compensation = {
                "action": self.compensation,
                "parameters": copy.deepcopy(
                    dict(self.compensation_parameters)
                    if self.compensation_parameters is not None
                    else None
                ),
            }
        return {
            "step_id": self.step_id,
            "system_target": self.system_target,
            "action": self.action,
            "parameters": copy.deepcopy(dict(self.parameters))
            if self.parameters is not None
            else None,
            "retry_policy": retry,
            "dependencies": list(self.dependencies),
            "condition": self.condition,
            "compensation": compensation,
            "timeout": self.timeout,
            "optional": self.optional,
            "fallback_target": self.fallback_target,
        }


class RuleTrigger(enum.StrEnum):
    """When an :class:`AdaptationRule` applies."""

    #: The circuit breaker of ``target`` is open.
    BREAKER_OPEN = "breaker_open"
    #: The step took longer than ``threshold`` seconds (its previous attempt, or the median of
    #: previous runs).
    STEP_SLOWER_THAN = "step_slower_than"
    #: At least ``threshold`` steps are in flight in the engine.
    UNDER_LOAD = "under_load"


class RuleAction(enum.StrEnum):
    """What an :class:`AdaptationRule` does."""

    #: Send the step to ``route_to`` (or the step's ``fallback_target``) instead.
    ROUTE_TO = "route_to"
    #: Merge ``parameters`` into the step's parameters.
    SET_PARAMETERS = "set_parameters"
    #: Skip the step if it is ``optional``.
    SKIP_OPTIONAL = "skip_optional"


@dataclass(frozen=True)
class AdaptationRule:
    """A rule the engine applies during a run: ``when`` it triggers, ``then`` do something.

    ``step_id`` limits the rule to one step (None: every matching step). Required fields by
    trigger: ``breaker_open`` needs ``target``; ``step_slower_than`` and ``under_load`` need
    ``threshold`` (seconds, or in-flight steps). By action: ``route_to`` needs ``route_to``
    (or every step it applies to has a ``fallback_target``); ``set_parameters`` needs
    ``parameters``.

    >>> AdaptationRule("fallback", when="breaker_open", then="route_to",
    ...                target="payments", route_to="payments-backup").when
    <RuleTrigger.BREAKER_OPEN: 'breaker_open'>
    """

    rule_id: str
    when: RuleTrigger
    then: RuleAction
    target: str | None = None
    step_id: str | None = None
    threshold: float | None = None
    route_to: str | None = None
    parameters: Mapping[str, JSONValue] | None = None

    def __post_init__(self) -> None:
        # Strings from documents are accepted; a bad one is reported by validate().
        for name, kind in (("when", RuleTrigger), ("then", RuleAction)):
            value = getattr(self, name)
            if isinstance(value, str) and not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    pass
        if isinstance(self.parameters, Mapping):
            object.__setattr__(self, "parameters", copy.deepcopy(dict(self.parameters)))

    def validate(self, workflow_id: str, steps: Mapping[str, WorkflowStep]) -> None:
        """Raise :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the rule
        when a field its trigger or action needs is missing or wrong."""

        def fail(problem: str) -> NoReturn:
            raise WorkflowDefinitionError(workflow_id, None, f"rule {self.rule_id!r}: {problem}")

        if not isinstance(self.rule_id, str) or not self.rule_id:
            fail("rule_id must be a non-empty string")
        when: object = self.when  # documents may hold any string here
        then: object = self.then
        if not isinstance(when, RuleTrigger):
            fail(
                f"'when' is {self.when!r}; use one of "
                f"{', '.join(trigger.value for trigger in RuleTrigger)}"
            )
        if not isinstance(then, RuleAction):
            fail(
                f"'then' is {self.then!r}; use one of "
                f"{', '.join(action.value for action in RuleAction)}"
            )
        if self.step_id is not None and self.step_id not in steps:
            fail(
                f"step_id {self.step_id!r} is not a step of this workflow "
                f"(steps: {', '.join(steps)})"
            )
        if self.when is RuleTrigger.BREAKER_OPEN and not _non_empty(self.target):
            fail("'breaker_open' needs 'target': the system whose open breaker triggers it")
        if self.when in (RuleTrigger.STEP_SLOWER_THAN, RuleTrigger.UNDER_LOAD):
            threshold = self.threshold
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                unit = "seconds" if self.when is RuleTrigger.STEP_SLOWER_THAN else "steps"
                fail(f"{self.when.value!r} needs a numeric 'threshold' ({unit})")
            elif not math.isfinite(threshold) or threshold <= 0:
                fail(f"'threshold' must be a positive number, got {threshold!r}")
        elif self.threshold is not None:
            fail(f"'threshold' has no meaning for {self.when.value!r}; remove it")
        if self.then is RuleAction.ROUTE_TO:
            if self.route_to is not None and not _non_empty(self.route_to):
                fail("'route_to' must be a non-empty system name")
            if self.route_to is None:
                applies = (
                    [steps[self.step_id]]
                    if self.step_id is not None
                    else [
                        step
                        for step in steps.values()
                        if self.target is None or step.system_target == self.target
                    ]
                )
                missing = [step.step_id for step in applies if not step.fallback_target]
                if missing or not applies:
                    fail(
                        "'route_to' needs a system to route to: set 'route_to', or give "
                        f"fallback_target to step(s) {', '.join(missing) or '(none match)'}"
                    )
        elif self.route_to is not None:
            fail(f"'route_to' has no meaning for {self.then.value!r}; remove it")
        if self.then is RuleAction.SET_PARAMETERS:
            if not isinstance(self.parameters, Mapping) or not self.parameters:
                fail("'set_parameters' needs 'parameters': a mapping merged into the step's")
            _check_json(self.parameters, workflow_id, None, f"rule {self.rule_id!r} parameters")
        elif self.parameters is not None:
            fail(f"'parameters' has no meaning for {self.then.value!r}; remove it")
        if (
            self.then is RuleAction.SKIP_OPTIONAL
            and self.step_id is not None
            and not steps[self.step_id].optional
        ):
            fail(
                f"'skip_optional' applies to step {self.step_id!r}, which is not optional; "
                "mark the step optional: true"
            )

    def to_dict(self) -> dict[str, JSONValue]:
        """The rule as a JSON object in the document schema."""
        return {
            "rule_id": self.rule_id,
            "when": self.when.value if isinstance(self.when, enum.Enum) else self.when,
            "then": self.then.value if isinstance(self.then, enum.Enum) else self.then,
            "target": self.target,
            "step_id": self.step_id,
            "threshold": self.threshold,
            "route_to": self.route_to,
            "parameters": copy.deepcopy(dict(self.parameters))
            if self.parameters is not None
            else None,
        }


def _non_empty(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_json(value: object, workflow_id: str, step_id: str | None, what: str) -> None:
    """Raise if ``value`` is not a JSON value (string keys, finite numbers, lists, dicts)."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WorkflowDefinitionError(
                workflow_id, step_id, f"{what} holds {value!r}; JSON has no NaN or infinity"
            )
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise WorkflowDefinitionError(
                    workflow_id, step_id, f"{what} has the non-string key {key!r}; use strings"
                )
            _check_json(item, workflow_id, step_id, what)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_json(item, workflow_id, step_id, what)
        return
    raise WorkflowDefinitionError(
        workflow_id,
        step_id,
        f"{what} holds {type(value).__name__} {value!r}, which is not a JSON value",
    )


# --------------------------------------------------------------------------------------------
# Compiled form


@dataclass(frozen=True)
class CompiledStep:
    """A validated step: its resolved retry policy, compiled condition, transitive
    dependencies (``upstream``) and the steps that depend on it directly (``dependents``)."""

    step: WorkflowStep
    retry: RetryPolicy
    condition: Condition | None
    upstream: frozenset[str]
    dependents: tuple[str, ...]


@dataclass(frozen=True)
class CompiledWorkflow:
    """A validated workflow, ready to run.

    ``order`` is a topological order of the steps (ties in definition order); ``fingerprint``
    is the sha256 of the canonical JSON of :meth:`WorkflowDefinition.to_dict`, so a run can
    tell that its workflow was redefined differently.
    """

    definition: WorkflowDefinition
    order: tuple[str, ...]
    steps: Mapping[str, CompiledStep]
    rules: tuple[AdaptationRule, ...]
    fingerprint: str

    @property
    def workflow_id(self) -> str:
        return self.definition.workflow_id

    @property
    def roots(self) -> tuple[str, ...]:
        """Steps without dependencies, in definition order."""
        return tuple(step_id for step_id in self.order if not self.steps[step_id].step.dependencies)


# --------------------------------------------------------------------------------------------
# Definition


_TOP_KEYS: Final = (
    "workflow_id",
    "name",
    "description",
    "inputs",
    "max_concurrency",
    "steps",
    "rules",
)
# canonical name -> accepted short names
_STEP_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "step_id": ("id",),
    "system_target": ("target",),
    "action": (),
    "parameters": (),
    "retry_policy": (),
    "dependencies": ("depends_on",),
    "condition": ("when",),
    "compensation": (),
    "compensation_parameters": (),
    "timeout": (),
    "optional": (),
    "fallback_target": (),
}
_RULE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "rule_id": ("id",),
    "when": (),
    "then": (),
    "target": (),
    "step_id": ("step",),
    "threshold": (),
    "route_to": (),
    "parameters": (),
}


def _canonical_keys(
    data: Mapping[str, Any],
    schema: Mapping[str, tuple[str, ...]],
    workflow_id: str,
    step_id: str | None,
    what: str,
) -> dict[str, Any]:
    alias_of = {alias: name for name, aliases in schema.items() for alias in aliases}
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = key if key in schema else alias_of.get(key) if isinstance(key, str) else None
        if name is None:
            allowed = ", ".join(
                name + "".join(f" (or {alias})" for alias in aliases)
                for name, aliases in schema.items()
            )
            raise WorkflowDefinitionError(
                workflow_id, step_id, f"{what} has the unknown key {key!r}; allowed: {allowed}"
            )
        if name in result:
            raise WorkflowDefinitionError(
                workflow_id, step_id, f"{what} gives {name!r} twice (once as {key!r}); keep one"
            )
        result[name] = value
    return result


def _expect(
    value: object,
    kinds: type | tuple[type, ...],
    workflow_id: str,
    step_id: str | None,
    what: str,
    described: str,
) -> None:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise WorkflowDefinitionError(
            workflow_id, step_id, f"{what} must be {described}, got {value!r}"
        )


class WorkflowDefinition:
    """A workflow: steps over a DAG, adaptation rules, declared inputs.

    ``inputs`` (optional) declares the run input keys conditions and templates may read: with
    it, a typo such as ``${ordr_id}`` is an error at define time. ``max_concurrency`` bounds
    how many steps of one run are in flight at once.

    The seed form::

        workflow = WorkflowDefinition("workflow_id", "name")
        workflow.add_step(WorkflowStep(step_id="step1", system_target="system", action="action",
                                       retry_policy={"max_retries": 3, "delay": 1},
                                       condition="${variable} == 'value'"))
    """

    def __init__(
        self,
        workflow_id: str,
        name: str,
        *,
        steps: Iterable[WorkflowStep] = (),
        rules: Iterable[AdaptationRule] = (),
        inputs: Sequence[str] | None = None,
        max_concurrency: int = 8,
        description: str = "",
    ) -> None:
        if not isinstance(workflow_id, str) or not workflow_id.strip():
            raise WorkflowDefinitionError(
                str(workflow_id), None, "workflow_id must be a non-empty string"
            )
        self.workflow_id = workflow_id
        self.name = name
        self.description = description
        if isinstance(inputs, str):
            inputs = [inputs]
        self.inputs: tuple[str, ...] | None = tuple(inputs) if inputs is not None else None
        self.max_concurrency = max_concurrency
        self.steps: dict[str, WorkflowStep] = {}
        self.rules: list[AdaptationRule] = []
        for step in steps:
            self.add_step(step)
        for rule in rules:
            self.add_rule(rule)

    def __repr__(self) -> str:
        return (
            f"WorkflowDefinition({self.workflow_id!r}, {self.name!r}, "
            f"steps={list(self.steps)!r}, rules={[rule.rule_id for rule in self.rules]!r})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowDefinition) and other.to_dict() == self.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def add_step(self, step: WorkflowStep) -> WorkflowDefinition:
        """Add a step (returns the definition, so calls chain). A step id that is already
        used raises :class:`~collaborative_blocks.errors.WorkflowDefinitionError` at once."""
        if not isinstance(step, WorkflowStep):
            raise WorkflowDefinitionError(
                self.workflow_id, None, f"add_step takes a WorkflowStep, got {step!r}"
            )
        if step.step_id in self.steps:
            raise WorkflowDefinitionError(
                self.workflow_id,
                step.step_id,
                "a step with this id is already defined; step ids must be unique — rename one",
            )
        self.steps[step.step_id] = step
        return self

    def add_rule(self, rule: AdaptationRule) -> WorkflowDefinition:
        """Add an adaptation rule (validated by :meth:`compile`); a duplicate rule id raises
        :class:`~collaborative_blocks.errors.WorkflowDefinitionError` at once."""
        if not isinstance(rule, AdaptationRule):
            raise WorkflowDefinitionError(
                self.workflow_id, None, f"add_rule takes an AdaptationRule, got {rule!r}"
            )
        if any(existing.rule_id == rule.rule_id for existing in self.rules):
            raise WorkflowDefinitionError(
                self.workflow_id,
                None,
                f"rule {rule.rule_id!r} is already defined; rule ids must be unique",
            )
        self.rules.append(rule)
        return self

    # -- compile --------------------------------------------------------------------------------

    def compile(self, *, default_max_retries: int = 3) -> CompiledWorkflow:
        """Validate the whole definition and return its :class:`CompiledWorkflow`.

        ``default_max_retries`` (``MAX_RETRY_ATTEMPTS``) is used by steps without a retry
        policy. Raises :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the
        step (or rule) and saying what to fix, for: no steps; an empty id, target or action;
        an unknown or self dependency; a cycle (the message lists it); a malformed condition
        or one that reads an unknown variable or a step that is not upstream; a parameter
        template that does the same; a bad retry policy, timeout or rule.
        """
        workflow_id = self.workflow_id
        if not self.steps:
            raise WorkflowDefinitionError(
                workflow_id, None, "the workflow has no steps; add at least one with add_step"
            )
        if (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise WorkflowDefinitionError(
                workflow_id,
                None,
                f"max_concurrency must be a whole number >= 1, got {self.max_concurrency!r}",
            )
        if self.inputs is not None and not all(isinstance(key, str) and key for key in self.inputs):
            raise WorkflowDefinitionError(
                workflow_id, None, f"inputs must be a list of names, got {list(self.inputs)!r}"
            )
        for step in self.steps.values():
            self._check_step_fields(step)
        order = self._topological_order()
        upstream: dict[str, frozenset[str]] = {}
        for step_id in order:
            step = self.steps[step_id]
            closure: set[str] = set(step.dependencies)
            for dependency in step.dependencies:
                closure |= upstream[dependency]
            upstream[step_id] = frozenset(closure)
        dependents: dict[str, list[str]] = {step_id: [] for step_id in self.steps}
        for step in self.steps.values():
            for dependency in dict.fromkeys(step.dependencies):
                dependents[dependency].append(step.step_id)
        compiled: dict[str, CompiledStep] = {}
        for step_id in order:
            step = self.steps[step_id]
            compiled[step_id] = CompiledStep(
                step=step,
                retry=self._retry(step, default_max_retries),
                condition=self._condition(step, upstream[step_id]),
                upstream=upstream[step_id],
                dependents=tuple(dependents[step_id]),
            )
            self._check_templates(step, upstream[step_id])
        for rule in self.rules:
            rule.validate(workflow_id, self.steps)
            self._check_rule_templates(rule, upstream)
        snapshot = WorkflowDefinition(
            workflow_id,
            self.name,
            steps=self.steps.values(),
            rules=self.rules,
            inputs=self.inputs,
            max_concurrency=self.max_concurrency,
            description=self.description,
        )
        return CompiledWorkflow(
            definition=snapshot,
            order=tuple(order),
            steps=compiled,
            rules=tuple(self.rules),
            fingerprint=self.fingerprint(),
        )

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`to_dict` (keys sorted)."""
        canonical = json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _check_step_fields(self, step: WorkflowStep) -> None:
        workflow_id, step_id = self.workflow_id, step.step_id
        if not _non_empty(step_id):
            raise WorkflowDefinitionError(
                workflow_id, str(step_id), "step_id must be a non-empty string"
            )
        for name in ("system_target", "action"):
            if not _non_empty(getattr(step, name)):
                raise WorkflowDefinitionError(
                    workflow_id,
                    step_id,
                    f"{name} must be a non-empty string (got {getattr(step, name)!r})",
                )
        for dependency in step.dependencies:
            if dependency == step_id:
                raise WorkflowDefinitionError(
                    workflow_id, step_id, "the step depends on itself; remove it from dependencies"
                )
            if dependency not in self.steps:
                raise WorkflowDefinitionError(
                    workflow_id,
                    step_id,
                    f"depends on {dependency!r}, which is not a step of this workflow "
                    f"(steps: {', '.join(self.steps)}); fix the name or add that step",
                )
        for name in ("parameters", "compensation_parameters"):
            value = getattr(step, name)
            if value is not None and not isinstance(value, Mapping):
                raise WorkflowDefinitionError(
                    workflow_id, step_id, f"{name} must be a mapping, got {value!r}"
                )
            _check_json(value, workflow_id, step_id, name)
        if step.condition is not None and not isinstance(step.condition, str):
            raise WorkflowDefinitionError(
                workflow_id, step_id, f"condition must be a string, got {step.condition!r}"
            )
        if step.compensation is not None and not _non_empty(step.compensation):
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"compensation must be a non-empty action name, got {step.compensation!r}",
            )
        if step.compensation is None and step.compensation_parameters is not None:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                "compensation_parameters without a compensation action; add compensation",
            )
        if step.timeout is not None and (
            isinstance(step.timeout, bool)
            or not isinstance(step.timeout, int | float)
            or not math.isfinite(step.timeout)
            or step.timeout <= 0
        ):
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"timeout must be a positive number of seconds, got {step.timeout!r}",
            )
        if not isinstance(step.optional, bool):
            raise WorkflowDefinitionError(
                workflow_id, step_id, f"optional must be true or false, got {step.optional!r}"
            )
        if step.fallback_target is not None and not _non_empty(step.fallback_target):
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"fallback_target must be a non-empty system name, got {step.fallback_target!r}",
            )

    def _topological_order(self) -> list[str]:
        """Kahn's algorithm; among ready steps the earliest defined goes first."""
        position = {step_id: index for index, step_id in enumerate(self.steps)}
        remaining = {step_id: len(set(step.dependencies)) for step_id, step in self.steps.items()}
        children: dict[str, list[str]] = {step_id: [] for step_id in self.steps}
        for step in self.steps.values():
            for dependency in set(step.dependencies):
                children[dependency].append(step.step_id)
        ready = [position[step_id] for step_id, count in remaining.items() if count == 0]
        heapq.heapify(ready)
        names = list(self.steps)
        order: list[str] = []
        while ready:
            step_id = names[heapq.heappop(ready)]
            order.append(step_id)
            for child in children[step_id]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    heapq.heappush(ready, position[child])
        if len(order) < len(self.steps):
            cycle = self._find_cycle({step_id for step_id, count in remaining.items() if count})
            raise WorkflowDefinitionError(
                self.workflow_id,
                cycle[0],
                f"the dependencies form a cycle: {' -> '.join(cycle)}; "
                "remove one of these dependencies",
            )
        return order

    def _find_cycle(self, stuck: set[str]) -> list[str]:
        # Every stuck step has a stuck dependency, so walking dependencies must revisit one.
        start = next(step_id for step_id in self.steps if step_id in stuck)
        path: list[str] = []
        seen: dict[str, int] = {}
        current = start
        while current not in seen:
            seen[current] = len(path)
            path.append(current)
            current = next(d for d in self.steps[current].dependencies if d in stuck)
        cycle = path[seen[current] :]
        # Written in the direction of the arrows "a depends on b": report as a -> b -> ... -> a.
        return [*cycle, cycle[0]]

    def _retry(self, step: WorkflowStep, default_max_retries: int) -> RetryPolicy:
        try:
            return RetryPolicy.from_value(
                step.retry_policy, default_max_retries=default_max_retries
            )
        except (RetryPolicyError, TypeError) as exc:
            raise WorkflowDefinitionError(self.workflow_id, step.step_id, str(exc)) from exc

    def _condition(self, step: WorkflowStep, upstream: frozenset[str]) -> Condition | None:
        if step.condition is None:
            return None
        return compile_condition(
            step.condition,
            workflow_id=self.workflow_id,
            step_id=step.step_id,
            known_steps=self.steps.keys(),
            upstream_steps=upstream,
            inputs=self.inputs,
        )

    def _check_templates(self, step: WorkflowStep, upstream: frozenset[str]) -> None:
        for name, allowed in (
            ("parameters", upstream),
            ("compensation_parameters", upstream | {step.step_id}),
        ):
            value = getattr(step, name)
            if value is None:
                continue
            try:
                references = template_references(value)
            except ConditionError as exc:
                raise WorkflowDefinitionError(
                    self.workflow_id, step.step_id, f"{name}: {exc}"
                ) from exc
            validate_references(
                references,
                workflow_id=self.workflow_id,
                step_id=step.step_id,
                known_steps=self.steps.keys(),
                upstream_steps=allowed,
                inputs=self.inputs,
                what=f"a template in {name}",
            )

    def _check_rule_templates(
        self, rule: AdaptationRule, upstream: Mapping[str, frozenset[str]]
    ) -> None:
        """``set_parameters`` values may be templates: check them against every step the rule
        can apply to, as if they were that step's parameters."""
        if rule.parameters is None:
            return
        what = f"a template in rule {rule.rule_id!r} parameters"
        try:
            references = template_references(rule.parameters)
        except ConditionError as exc:
            raise WorkflowDefinitionError(
                self.workflow_id, None, f"rule {rule.rule_id!r} parameters: {exc}"
            ) from exc
        if not references:
            return
        applies = [rule.step_id] if rule.step_id is not None else list(self.steps)
        for step_id in applies:
            validate_references(
                references,
                workflow_id=self.workflow_id,
                step_id=step_id,
                known_steps=self.steps.keys(),
                upstream_steps=upstream[step_id],
                inputs=self.inputs,
                what=what,
            )

    # -- documents ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, JSONValue]:
        """The definition as a JSON object in the document schema (every key, canonical
        names); :meth:`from_dict` reads it back to an equal definition."""
        return {
            "workflow_id": self.workflow_id,
            "name": self.name,
            "description": self.description,
            "inputs": list(self.inputs) if self.inputs is not None else None,
            "max_concurrency": self.max_concurrency,
            "steps": [step.to_dict() for step in self.steps.values()],
            "rules": [rule.to_dict() for rule in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowDefinition:
        """A definition from a parsed document (see the module docstring for the schema).

        Unknown keys, wrong types and duplicate step ids raise
        :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the key, the step
        and the allowed keys; a typo never passes silently. The result is not yet validated as
        a graph: :meth:`compile` (or ``define_workflow``) does that.
        """
        if not isinstance(data, Mapping):
            raise WorkflowDefinitionError(
                "<document>", None, f"a workflow document is a mapping, got {type(data).__name__}"
            )
        workflow_id = data.get("workflow_id")
        if not _non_empty(workflow_id):
            raise WorkflowDefinitionError(
                "<document>", None, "the document needs 'workflow_id': a non-empty string"
            )
        assert isinstance(workflow_id, str)
        top = _canonical_keys(
            data, {key: () for key in _TOP_KEYS}, workflow_id, None, "the document"
        )
        name = top.get("name", workflow_id)
        _expect(name, str, workflow_id, None, "'name'", "a string")
        description = top.get("description", "") or ""
        _expect(description, str, workflow_id, None, "'description'", "a string")
        inputs = top.get("inputs")
        if inputs is not None and (
            not isinstance(inputs, list) or not all(isinstance(key, str) for key in inputs)
        ):
            raise WorkflowDefinitionError(
                workflow_id, None, f"'inputs' must be a list of names, got {inputs!r}"
            )
        max_concurrency = top.get("max_concurrency", 8)
        _expect(max_concurrency, int, workflow_id, None, "'max_concurrency'", "a whole number")
        steps = top.get("steps") or []
        _expect(steps, list, workflow_id, None, "'steps'", "a list of steps")
        rules = top.get("rules") or []
        _expect(rules, list, workflow_id, None, "'rules'", "a list of rules")
        definition = cls(
            workflow_id,
            name,
            inputs=inputs,
            max_concurrency=max_concurrency,
            description=description,
        )
        for index, raw in enumerate(steps):
            definition.add_step(_step_from_dict(raw, workflow_id, index))
        for index, raw in enumerate(rules):
            definition.add_rule(_rule_from_dict(raw, workflow_id, index))
        return definition

    @classmethod
    def from_json(cls, text: str) -> WorkflowDefinition:
        """A definition from a JSON document (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkflowDefinitionError(
                "<document>", None, f"not valid JSON: {exc}; fix the document"
            ) from exc
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, text: str) -> WorkflowDefinition:
        """A definition from a YAML document (``yaml.safe_load``; see :meth:`from_dict`)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise WorkflowDefinitionError(
                "<document>", None, f"not valid YAML: {exc}; fix the document"
            ) from exc
        return cls.from_dict(data)


def _step_from_dict(raw: object, workflow_id: str, index: int) -> WorkflowStep:
    if not isinstance(raw, Mapping):
        raise WorkflowDefinitionError(
            workflow_id, None, f"steps[{index}] must be a mapping with step_id, target and action"
        )
    step_id = raw.get("step_id", raw.get("id"))
    label = step_id if _non_empty(step_id) else None
    where = f"steps[{index}]"
    fields = _canonical_keys(raw, _STEP_KEYS, workflow_id, label, where)
    for name in ("step_id", "system_target", "action"):
        if name not in fields:
            short = _STEP_KEYS[name]
            also = f" (or {short[0]})" if short else ""
            raise WorkflowDefinitionError(workflow_id, label, f"{where} needs {name!r}{also}")
        _expect(fields[name], str, workflow_id, label, f"{where} {name!r}", "a string")
    compensation = fields.get("compensation")
    if isinstance(compensation, Mapping):
        compensation_fields = _canonical_keys(
            compensation,
            {"action": (), "parameters": ()},
            workflow_id,
            label,
            f"{where} 'compensation'",
        )
        if "compensation_parameters" in fields:
            raise WorkflowDefinitionError(
                workflow_id,
                label,
                "give compensation parameters either inside 'compensation' or as "
                "'compensation_parameters', not both",
            )
        if "action" not in compensation_fields:
            raise WorkflowDefinitionError(
                workflow_id, label, f"{where} 'compensation' needs 'action'"
            )
        fields["compensation"] = compensation_fields["action"]
        fields["compensation_parameters"] = compensation_fields.get("parameters")
    checks: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
        ("parameters", (Mapping, type(None)), "a mapping"),
        ("retry_policy", (Mapping, type(None)), "a mapping of retry policy fields"),
        ("dependencies", (list, str, type(None)), "a list of step ids"),
        ("condition", (str, type(None)), "a CEL expression string"),
        ("compensation", (str, type(None)), "an action name or {action, parameters}"),
        ("compensation_parameters", (Mapping, type(None)), "a mapping"),
        ("timeout", (int, float, type(None)), "a number of seconds"),
        ("optional", bool, "true or false"),
        ("fallback_target", (str, type(None)), "a system name"),
    )
    for name, kinds, described in checks:
        if name in fields:
            _expect(fields[name], kinds, workflow_id, label, f"{where} {name!r}", described)
    dependencies = fields.get("dependencies") or ()
    if not isinstance(dependencies, str) and not all(
        isinstance(item, str) for item in dependencies
    ):
        raise WorkflowDefinitionError(
            workflow_id, label, f"{where} 'dependencies' must be step ids, got {dependencies!r}"
        )
    fields["dependencies"] = dependencies
    if fields.get("retry_policy") is not None:
        try:  # report a typo in the policy when the document is read, not later
            RetryPolicy.from_value(fields["retry_policy"], default_max_retries=0)
        except (RetryPolicyError, TypeError) as exc:
            raise WorkflowDefinitionError(workflow_id, label, f"{where}: {exc}") from exc
    return WorkflowStep(**fields)


def _rule_from_dict(raw: object, workflow_id: str, index: int) -> AdaptationRule:
    where = f"rules[{index}]"
    if not isinstance(raw, Mapping):
        raise WorkflowDefinitionError(workflow_id, None, f"{where} must be a mapping")
    fields = _canonical_keys(raw, _RULE_KEYS, workflow_id, None, where)
    for name in ("rule_id", "when", "then"):
        if name not in fields:
            raise WorkflowDefinitionError(workflow_id, None, f"{where} needs {name!r}")
        _expect(fields[name], str, workflow_id, None, f"{where} {name!r}", "a string")
    for name, kinds, described in (
        ("target", (str, type(None)), "a system name"),
        ("step_id", (str, type(None)), "a step id"),
        ("threshold", (int, float, type(None)), "a number"),
        ("route_to", (str, type(None)), "a system name"),
        ("parameters", (Mapping, type(None)), "a mapping"),
    ):
        if name in fields:
            _expect(fields[name], kinds, workflow_id, None, f"{where} {name!r}", described)
    for name, kind in (("when", RuleTrigger), ("then", RuleAction)):
        allowed = [member.value for member in kind]
        if fields[name] not in allowed:
            raise WorkflowDefinitionError(
                workflow_id,
                None,
                f"rule {fields['rule_id']!r}: {name!r} is {fields[name]!r}; "
                f"use one of {', '.join(allowed)}",
            )
    return AdaptationRule(**fields)


def load_definition(path: str | Path) -> WorkflowDefinition:
    """Read a workflow definition from a ``.yaml``/``.yml`` or ``.json`` file."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise WorkflowDefinitionError(
            "<document>", None, f"{file}: use a .yaml, .yml or .json file for a workflow"
        )
    text = file.read_text(encoding="utf-8")
    if suffix == ".json":
        return WorkflowDefinition.from_json(text)
    return WorkflowDefinition.from_yaml(text)
