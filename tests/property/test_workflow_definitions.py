"""Workflow definitions under hypothesis: documents round-trip, the order is topological with
ties in definition order, cycles are reported as real cycles, fingerprints ignore key order."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.workflows.definitions import (
    AdaptationRule,
    RuleAction,
    RuleTrigger,
    WorkflowDefinition,
    WorkflowStep,
)
from collaborative_blocks.errors import WorkflowDefinitionError

names = st.text(alphabet="abcdefgh-_", min_size=1, max_size=6).filter(
    lambda name: name[0].isalpha()
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values: st.SearchStrategy[JSONValue] = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
parameters = st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=4)
retry_policies = st.none() | st.fixed_dictionaries(
    {"max_retries": st.integers(0, 5)},
    optional={
        "delay": st.floats(0, 10),
        "backoff": st.floats(1, 4),
        "jitter": st.floats(0, 1),
        "retry_on": st.lists(st.sampled_from(["TimeoutError", "StepFailedError"]), max_size=2),
    },
)


@st.composite
def definitions(draw: st.DrawFn) -> WorkflowDefinition:
    step_ids = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    definition = WorkflowDefinition(
        draw(names),
        draw(st.text(max_size=10)),
        description=draw(st.text(max_size=10)),
        max_concurrency=draw(st.integers(1, 16)),
    )
    for index, step_id in enumerate(step_ids):
        earlier = step_ids[:index]
        dependencies = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
        compensation = draw(st.none() | st.sampled_from(["undo", "release"]))
        definition.add_step(
            WorkflowStep(
                step_id=step_id,
                system_target=draw(st.sampled_from(["inventory", "payments", "mail"])),
                action=draw(st.sampled_from(["reserve", "charge", "send"])),
                parameters=draw(parameters),
                retry_policy=draw(retry_policies),
                dependencies=dependencies,
                condition=draw(st.none() | st.just("${flag} == true")),
                compensation=compensation,
                compensation_parameters=draw(parameters) if compensation else None,
                timeout=draw(st.none() | st.floats(0.1, 60)),
                optional=draw(st.booleans()),
                fallback_target=draw(st.none() | st.just("backup")),
            )
        )
    if draw(st.booleans()):
        definition.add_rule(
            AdaptationRule("shed", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=10)
        )
    return definition


def shuffled_keys(value: Any, reverse: bool) -> Any:
    """The same JSON value with every object's keys in reverse insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        if reverse:
            items.reverse()
        return {key: shuffled_keys(item, reverse) for key, item in items}
    if isinstance(value, list):
        return [shuffled_keys(item, reverse) for item in value]
    return value


@settings(max_examples=80, deadline=None)
@given(definitions())
def test_documents_round_trip_through_dict_json_and_yaml(definition: WorkflowDefinition) -> None:
    document = definition.to_dict()
    assert WorkflowDefinition.from_dict(document).to_dict() == document
    assert WorkflowDefinition.from_json(json.dumps(document)).to_dict() == document
    assert WorkflowDefinition.from_yaml(yaml.safe_dump(document)).to_dict() == document
    assert WorkflowDefinition.from_dict(document).fingerprint() == definition.fingerprint()


@settings(max_examples=80, deadline=None)
@given(definitions())
def test_the_order_is_topological_with_ties_in_definition_order(
    definition: WorkflowDefinition,
) -> None:
    compiled = definition.compile()
    order = compiled.order
    assert sorted(order) == sorted(definition.steps)
    position = {step_id: index for index, step_id in enumerate(definition.steps)}
    done: set[str] = set()
    for step_id in order:
        ready = [
            other
            for other, step in definition.steps.items()
            if other not in done and set(step.dependencies) <= done
        ]
        # The chosen step is the earliest defined among the ready ones.
        assert step_id == min(ready, key=position.__getitem__)
        done.add(step_id)
    for step_id, compiled_step in compiled.steps.items():
        direct = set(compiled_step.step.dependencies)
        assert direct <= compiled_step.upstream
        for dependency in direct:
            assert compiled.steps[dependency].upstream <= compiled_step.upstream
            assert step_id in compiled.steps[dependency].dependents


@settings(max_examples=60, deadline=None)
@given(definitions(), st.data())
def test_a_back_edge_is_reported_as_a_real_cycle(
    definition: WorkflowDefinition, data: st.DataObject
) -> None:
    compiled = definition.compile()
    candidates = [
        (step_id, descendant)
        for step_id in compiled.order
        for descendant in compiled.order
        if step_id in compiled.steps[descendant].upstream
    ]
    if not candidates:
        return
    ancestor, descendant = data.draw(st.sampled_from(candidates))
    step = definition.steps[ancestor]
    definition.steps[ancestor] = WorkflowStep(
        **{**vars(step), "dependencies": (*step.dependencies, descendant)}
    )
    try:
        definition.compile()
    except WorkflowDefinitionError as error:
        match = re.search(r"cycle: (.*?);", str(error))
        assert match is not None
        cycle = match.group(1).split(" -> ")
        assert cycle[0] == cycle[-1]
        assert len(set(cycle[:-1])) == len(cycle) - 1
        for step_id, dependency in itertools.pairwise(cycle):
            assert dependency in definition.steps[step_id].dependencies
    else:
        raise AssertionError("a back edge did not make a cycle error")


@settings(max_examples=60, deadline=None)
@given(definitions())
def test_the_fingerprint_ignores_key_order(definition: WorkflowDefinition) -> None:
    reordered = WorkflowDefinition.from_dict(shuffled_keys(definition.to_dict(), reverse=True))
    assert reordered.fingerprint() == definition.fingerprint()
