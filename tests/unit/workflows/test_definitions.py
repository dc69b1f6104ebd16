"""Workflow definitions: the seed API, validation, retry policies, rules and documents."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from collaborative_blocks.core.workflows.definitions import (
    AdaptationRule,
    RetryPolicy,
    RuleAction,
    RuleTrigger,
    WorkflowDefinition,
    WorkflowStep,
    load_definition,
)
from collaborative_blocks.errors import RetryPolicyError, WorkflowDefinitionError


def step(step_id: str, *dependencies: str, **fields: Any) -> WorkflowStep:
    fields.setdefault("system_target", "system")
    fields.setdefault("action", "act")
    return WorkflowStep(step_id=step_id, dependencies=list(dependencies), **fields)


def workflow(*steps: WorkflowStep, **options: Any) -> WorkflowDefinition:
    return WorkflowDefinition("wf", "Workflow", steps=steps, **options)


# -- the seed API ----------------------------------------------------------------------------------


def test_the_seed_api_compiles() -> None:
    params = {"amount": 10}
    definition = WorkflowDefinition("workflow_id", "name")
    definition.add_step(WorkflowStep(step_id="previous_step", system_target="system", action="a"))
    seed_step = WorkflowStep(
        step_id="step1",
        system_target="system",
        action="action",
        parameters=params,
        retry_policy={"max_retries": 3, "delay": 1},
        dependencies=["previous_step"],
        condition="${variable} == 'value'",
    )
    assert definition.add_step(seed_step) is definition
    compiled = definition.compile(default_max_retries=5)
    assert compiled.workflow_id == "workflow_id"
    assert compiled.order == ("previous_step", "step1")
    step1 = compiled.steps["step1"]
    assert step1.retry == RetryPolicy(max_retries=3, delay=1.0)
    assert step1.condition is not None
    assert step1.condition.cel_source == "input.variable == 'value'"
    assert step1.upstream == {"previous_step"}
    assert compiled.steps["previous_step"].retry.max_retries == 5  # the default
    assert compiled.steps["previous_step"].dependents == ("step1",)
    assert compiled.roots == ("previous_step",)
    params["amount"] = 99  # the definition keeps its own copy
    assert definition.steps["step1"].parameters == {"amount": 10}


# -- graph ---------------------------------------------------------------------------------------


def test_topological_order_breaks_ties_in_definition_order() -> None:
    compiled = workflow(
        step("d", "b", "c"),
        step("c", "a"),
        step("b", "a"),
        step("a"),
        step("e"),
    ).compile()
    assert compiled.order == ("a", "c", "b", "d", "e")
    assert compiled.steps["d"].upstream == {"a", "b", "c"}
    assert compiled.steps["a"].dependents == ("c", "b")
    assert compiled.steps["e"].upstream == frozenset()


def test_the_compiled_workflow_is_a_snapshot() -> None:
    definition = workflow(step("a"))
    compiled = definition.compile()
    definition.add_step(step("b", "a"))
    assert list(compiled.definition.steps) == ["a"]
    assert compiled.fingerprint != definition.fingerprint()


@pytest.mark.parametrize(
    ("steps", "step_id", "message"),
    [
        ((), None, "no steps"),
        ((step("a", "ghost"),), "a", "depends on 'ghost'.*fix the name"),
        ((step("a", "a"),), "a", "depends on itself"),
        ((step("a", "b"), step("b", "a")), "a", "cycle: a -> b -> a"),
        ((step("a", "c"), step("b", "a"), step("c", "b")), "a", "cycle: a -> c -> b -> a"),
        ((step("x"), step("a", "x", "b"), step("b", "a")), "a", "cycle: a -> b -> a"),
        ((step("a", system_target=""),), "a", "system_target must be a non-empty"),
        ((step("a", action="  "),), "a", "action must be a non-empty"),
        ((step("a", condition="${x} =="),), "a", "not valid CEL"),
        ((step("a", condition="x == 1"),), "a", "unknown name 'x'"),
        ((step("a", condition="${steps.zz.status} == 'x'"),), "a", "'zz', which is not a step"),
        (
            (
                step("a"),
                step("b", condition="steps.a.output.ok"),
            ),
            "b",
            "not upstream of 'b'",
        ),
        ((step("a", parameters={"id": "${steps.b.output.id}"}), step("b")), "a", "not upstream"),
        ((step("a", parameters={"id": "${steps.a.output.id}"}),), "a", "not upstream"),
        ((step("a", parameters={"v": "${unclosed"}),), "a", "parameters: .*closing"),
        ((step("a", parameters={"v": float("nan")}),), "a", "NaN"),
        ((step("a", parameters={"v": {1: "x"}}),), "a", "non-string key"),
        ((step("a", parameters={"v": object()}),), "a", "not a JSON value"),
        ((step("a", retry_policy={"max_retries": -1}),), "a", "max_retries must be"),
        ((step("a", retry_policy={"max_retries": 1.5}),), "a", "max_retries must be"),
        ((step("a", retry_policy={"max_retries": 1, "delay": -1}),), "a", "delay must be >= 0"),
        ((step("a", retry_policy={"max_retries": 1, "backoff": 0.5}),), "a", "backoff must be"),
        ((step("a", retry_policy={"max_retries": 1, "jitter": 2}),), "a", "jitter is a fraction"),
        ((step("a", retry_policy={"retries": 3}),), "a", "unknown key.*'retries'.*max_retries"),
        ((step("a", timeout=0),), "a", "timeout must be a positive"),
        ((step("a", timeout=-1.0),), "a", "timeout must be a positive"),
        ((step("a", compensation_parameters={"x": 1}),), "a", "without a compensation"),
        ((step("a", compensation=""),), "a", "compensation must be a non-empty"),
        ((step("a", fallback_target=""),), "a", "fallback_target must be"),
        ((step("a", optional="yes"),), "a", "optional must be true or false"),
    ],
)
def test_validation_errors_name_the_step(
    steps: tuple[WorkflowStep, ...], step_id: str | None, message: str
) -> None:
    with pytest.raises(WorkflowDefinitionError, match=message) as caught:
        workflow(*steps).compile()
    assert caught.value.workflow_id == "wf"
    assert caught.value.step_id == step_id


def test_a_duplicate_step_id_fails_at_once() -> None:
    definition = workflow(step("a"))
    with pytest.raises(WorkflowDefinitionError, match="already defined") as caught:
        definition.add_step(step("a", action="other"))
    assert caught.value.step_id == "a"
    assert definition.steps["a"].action == "act"  # the first one is kept


def test_max_concurrency_and_inputs_are_validated() -> None:
    with pytest.raises(WorkflowDefinitionError, match="max_concurrency"):
        workflow(step("a"), max_concurrency=0).compile()
    with pytest.raises(WorkflowDefinitionError, match="workflow_id must be"):
        WorkflowDefinition("", "name")


def test_declared_inputs_catch_typos_in_conditions_and_templates() -> None:
    with pytest.raises(WorkflowDefinitionError, match="input 'ordr_id'"):
        workflow(step("a", condition="${ordr_id} != ''"), inputs=["order_id"]).compile()
    with pytest.raises(WorkflowDefinitionError, match="input 'ordr_id'"):
        workflow(step("a", parameters={"o": "${ordr_id}"}), inputs=["order_id"]).compile()
    workflow(step("a", parameters={"o": "${order_id}"}), inputs=["order_id"]).compile()


def test_compensation_parameters_may_read_the_step_itself() -> None:
    compiled = workflow(
        step(
            "reserve",
            compensation="release",
            compensation_parameters={"reservation": "${steps.reserve.output.id}"},
        )
    ).compile()
    assert compiled.steps["reserve"].step.compensation == "release"


def test_templates_may_read_upstream_steps_and_inputs() -> None:
    workflow(
        step("a"),
        step("b", "a"),
        step("c", "b", parameters={"x": ["${steps.a.output.id}", "${input.n} ${m}"]}),
    ).compile()


# -- retry policy --------------------------------------------------------------------------------


def test_retry_policy_defaults_and_seed_form() -> None:
    assert RetryPolicy.from_value(None, default_max_retries=4) == RetryPolicy(max_retries=4)
    seed = RetryPolicy.from_value({"max_retries": 3, "delay": 1}, default_max_retries=9)
    assert (seed.max_retries, seed.delay, seed.backoff) == (3, 1.0, 2.0)
    assert RetryPolicy.from_value({"delay": 2}, default_max_retries=9).max_retries == 9
    policy = RetryPolicy(max_retries=1)
    assert RetryPolicy.from_value(policy, default_max_retries=9) is policy
    with pytest.raises(RetryPolicyError, match="mapping"):
        RetryPolicy.from_value(3, default_max_retries=1)  # type: ignore[arg-type]


def test_retry_delays_back_off_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_retries=10, delay=0.5, backoff=3, max_delay=10, jitter=0)
    rng = random.Random(1)
    assert [policy.delay_for(n, rng) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    constant = RetryPolicy(max_retries=3, delay=2, backoff=1, jitter=0)
    assert {constant.delay_for(n, rng) for n in range(1, 4)} == {2.0}


def test_retry_jitter_stays_within_its_fraction_and_uses_the_given_rng() -> None:
    policy = RetryPolicy(max_retries=3, delay=10, jitter=0.2, max_delay=1000)
    delays = [policy.delay_for(1, random.Random(seed)) for seed in range(200)]
    assert all(8.0 <= delay <= 12.0 for delay in delays)
    assert len(set(delays)) > 100
    assert policy.delay_for(2, random.Random(7)) == policy.delay_for(2, random.Random(7))


def test_which_errors_retry() -> None:
    every = RetryPolicy(max_retries=1)
    assert every.retries("TimeoutError")
    assert not every.retries("ConditionError")
    only = RetryPolicy(max_retries=1, retry_on=("TimeoutError",), non_retryable=())
    assert only.retries("TimeoutError")
    assert not only.retries("ValueError")
    assert RetryPolicy(max_retries=1, retry_on="X").retry_on == ("X",)  # type: ignore[arg-type]


def test_retry_policy_round_trips() -> None:
    policy = RetryPolicy(max_retries=2, delay=0.25, retry_on=("A",))
    assert RetryPolicy.from_value(policy.to_dict(), default_max_retries=0) == policy


# -- rules -----------------------------------------------------------------------------------------


def test_valid_rules() -> None:
    compiled = workflow(
        step("pay", system_target="payments", fallback_target="payments-b"),
        step("mail", "pay", optional=True),
        rules=[
            AdaptationRule("r1", RuleTrigger.BREAKER_OPEN, RuleAction.ROUTE_TO, target="payments"),
            AdaptationRule(
                "r2",
                "step_slower_than",  # type: ignore[arg-type]
                "set_parameters",  # type: ignore[arg-type]
                step_id="pay",
                threshold=2.5,
                parameters={"fast": True},
            ),
            AdaptationRule("r3", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=50),
        ],
    ).compile()
    assert [rule.rule_id for rule in compiled.rules] == ["r1", "r2", "r3"]
    assert compiled.rules[1].when is RuleTrigger.STEP_SLOWER_THAN


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            AdaptationRule("r", RuleTrigger.BREAKER_OPEN, RuleAction.ROUTE_TO, route_to="b"),
            "target",
        ),
        (
            AdaptationRule("r", RuleTrigger.STEP_SLOWER_THAN, RuleAction.SKIP_OPTIONAL),
            "numeric 'threshold' \\(seconds\\)",
        ),
        (
            AdaptationRule("r", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=-1),
            "positive",
        ),
        (
            AdaptationRule("r", RuleTrigger.BREAKER_OPEN, RuleAction.ROUTE_TO, target="system"),
            "fallback_target to step\\(s\\) a",
        ),
        (
            AdaptationRule("r", RuleTrigger.UNDER_LOAD, RuleAction.SET_PARAMETERS, threshold=3),
            "needs 'parameters'",
        ),
        (
            AdaptationRule(
                "r", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=3, step_id="a"
            ),
            "not optional",
        ),
        (
            AdaptationRule(
                "r", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=3, step_id="zz"
            ),
            "step_id 'zz'",
        ),
        (
            AdaptationRule("r", "sometimes", RuleAction.SKIP_OPTIONAL),  # type: ignore[arg-type]
            "'when' is 'sometimes'; use one of breaker_open",
        ),
        (
            AdaptationRule(
                "r",
                RuleTrigger.BREAKER_OPEN,
                RuleAction.SKIP_OPTIONAL,
                target="system",
                route_to="x",
            ),
            "'route_to' has no meaning",
        ),
    ],
)
def test_rule_errors_name_the_rule(rule: AdaptationRule, message: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match=f"rule 'r': .*{message}"):
        workflow(step("a"), rules=[rule]).compile()


def test_a_duplicate_rule_id_fails_at_once() -> None:
    rule = AdaptationRule("r", RuleTrigger.UNDER_LOAD, RuleAction.SKIP_OPTIONAL, threshold=1)
    definition = workflow(step("a"), rules=[rule])
    with pytest.raises(WorkflowDefinitionError, match="rule 'r' is already defined"):
        definition.add_rule(rule)


# -- documents -------------------------------------------------------------------------------------

YAML_DOCUMENT = """
workflow_id: orders
name: Place an order
description: Reserve, charge, ship.
inputs: [order_id, express]
max_concurrency: 4
steps:
  - id: reserve
    target: inventory
    action: reserve
    parameters: {order: "${order_id}"}
    compensation: release
  - step_id: charge
    system_target: payments
    action: charge
    depends_on: [reserve]
    retry_policy: {max_retries: 3, delay: 1, retry_on: [TimeoutError]}
    compensation:
      action: refund
      parameters: {charge: "${steps.charge.output.id}"}
    timeout: 2.5
    fallback_target: payments-backup
  - id: ship
    target: shipping
    action: ship
    dependencies: [charge]
    when: "${express} == true"
    optional: true
rules:
  - id: fallback
    when: breaker_open
    then: route_to
    target: payments
  - rule_id: shed
    when: under_load
    then: skip_optional
    threshold: 100
"""


def test_yaml_document() -> None:
    definition = WorkflowDefinition.from_yaml(YAML_DOCUMENT)
    assert definition.workflow_id == "orders"
    assert definition.inputs == ("order_id", "express")
    assert definition.max_concurrency == 4
    charge = definition.steps["charge"]
    assert charge.system_target == "payments"
    assert charge.dependencies == ("reserve",)
    assert charge.compensation == "refund"
    assert charge.compensation_parameters == {"charge": "${steps.charge.output.id}"}
    assert charge.timeout == 2.5
    assert definition.steps["ship"].condition == "${express} == true"
    assert definition.steps["ship"].optional is True
    assert definition.steps["reserve"].compensation == "release"
    assert definition.steps["reserve"].compensation_parameters is None
    assert [rule.when for rule in definition.rules] == [
        RuleTrigger.BREAKER_OPEN,
        RuleTrigger.UNDER_LOAD,
    ]
    compiled = definition.compile()
    assert compiled.order == ("reserve", "charge", "ship")
    assert compiled.steps["charge"].retry.retry_on == ("TimeoutError",)


def test_json_document_equals_the_yaml_one() -> None:
    from_yaml = WorkflowDefinition.from_yaml(YAML_DOCUMENT)
    from_json = WorkflowDefinition.from_json(json.dumps(from_yaml.to_dict()))
    assert from_json == from_yaml
    assert from_json.fingerprint() == from_yaml.fingerprint()


def test_round_trip_through_to_dict() -> None:
    definition = WorkflowDefinition.from_yaml(YAML_DOCUMENT)
    definition.steps["reserve"] = WorkflowStep(
        step_id="reserve",
        system_target="inventory",
        action="reserve",
        retry_policy=RetryPolicy(max_retries=1, jitter=0),
    )
    again = WorkflowDefinition.from_dict(json.loads(json.dumps(definition.to_dict())))
    assert again.to_dict() == definition.to_dict()


def test_load_definition_by_suffix(tmp_path: Path) -> None:
    yaml_file = tmp_path / "orders.yml"
    yaml_file.write_text(YAML_DOCUMENT, encoding="utf-8")
    json_file = tmp_path / "orders.json"
    json_file.write_text(json.dumps(load_definition(yaml_file).to_dict()), encoding="utf-8")
    assert load_definition(str(json_file)) == load_definition(yaml_file)
    other = tmp_path / "orders.txt"
    other.write_text(YAML_DOCUMENT, encoding="utf-8")
    with pytest.raises(WorkflowDefinitionError, match=r"\.yaml, \.yml or \.json"):
        load_definition(other)


def _document(**step_fields: Any) -> dict[str, Any]:
    fields = {"id": "s1", "target": "system", "action": "act", **step_fields}
    return {"workflow_id": "doc", "steps": [fields]}


@pytest.mark.parametrize(
    ("document", "step_id", "message"),
    [
        ({"workflow_id": "doc", "stepz": []}, None, "unknown key 'stepz'; allowed: workflow_id"),
        (_document(depends=["x"]), "s1", "unknown key 'depends'.*dependencies \\(or depends_on\\)"),
        (_document(step_id="s2"), "s2", "gives 'step_id' twice"),
        (_document(compensation={"action": "undo", "params": {}}), "s1", "unknown key 'params'"),
        (_document(compensation={"parameters": {}}), "s1", "needs 'action'"),
        (
            _document(compensation={"action": "u"}, compensation_parameters={}),
            "s1",
            "not both",
        ),
        (_document(dependencies="s0 s2", timeout="5"), "s1", "'timeout' must be a number"),
        (_document(dependencies=[1]), "s1", "must be step ids"),
        (_document(optional="yes"), "s1", "'optional' must be true or false"),
        (_document(parameters=[1, 2]), "s1", "'parameters' must be a mapping"),
        (_document(retry_policy=3), "s1", "'retry_policy' must be a mapping"),
        (_document(retry_policy={"max_retry": 3}), "s1", "unknown key.*'max_retry'"),
        (_document(retry_policy={"max_retries": 3, "jitter": 5}), "s1", "jitter"),
        ({"workflow_id": "doc", "steps": [{"id": "s1", "action": "a"}]}, "s1", "'system_target'"),
        ({"workflow_id": "doc", "steps": ["s1"]}, None, "steps\\[0\\] must be a mapping"),
        ({"workflow_id": "doc", "steps": {"s1": {}}}, None, "'steps' must be a list"),
        ({"name": "no id"}, None, "needs 'workflow_id'"),
        ({"workflow_id": "doc", "max_concurrency": "4"}, None, "'max_concurrency' must be"),
        ({"workflow_id": "doc", "inputs": "x"}, None, "'inputs' must be a list"),
        (
            {"workflow_id": "doc", "rules": [{"id": "r", "when": "often", "then": "route_to"}]},
            None,
            "rule 'r': 'when' is 'often'; use one of",
        ),
        (
            {"workflow_id": "doc", "rules": [{"id": "r", "when": "under_load", "thn": "x"}]},
            None,
            "unknown key 'thn'",
        ),
        (
            {
                "workflow_id": "doc",
                "steps": [
                    {"id": "s1", "target": "t", "action": "a"},
                    {"id": "s1", "target": "t", "action": "b"},
                ],
            },
            "s1",
            "already defined",
        ),
    ],
)
def test_bad_documents_name_the_field(
    document: dict[str, Any], step_id: str | None, message: str
) -> None:
    with pytest.raises(WorkflowDefinitionError, match=message) as caught:
        WorkflowDefinition.from_dict(document)
    assert caught.value.step_id == step_id


def test_unparsable_documents() -> None:
    with pytest.raises(WorkflowDefinitionError, match="not valid YAML"):
        WorkflowDefinition.from_yaml("steps: [unclosed")
    with pytest.raises(WorkflowDefinitionError, match="not valid JSON"):
        WorkflowDefinition.from_json("{")
    with pytest.raises(WorkflowDefinitionError, match="is a mapping, got list"):
        WorkflowDefinition.from_yaml("- a\n- b\n")


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(WorkflowDefinitionError, match="not valid YAML"):
        WorkflowDefinition.from_yaml("workflow_id: !!python/object/apply:os.getcwd []\n")


def test_a_single_dependency_may_be_a_string() -> None:
    definition = WorkflowDefinition.from_dict(
        {
            "workflow_id": "doc",
            "steps": [
                {"id": "a", "target": "t", "action": "x"},
                {"id": "b", "target": "t", "action": "x", "depends_on": "a"},
            ],
        }
    )
    assert definition.steps["b"].dependencies == ("a",)


# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_changes_when_a_step_changes() -> None:
    base = workflow(step("a", parameters={"x": 1, "y": 2}), step("b", "a"))
    changed_parameter = workflow(step("a", parameters={"x": 1, "y": 3}), step("b", "a"))
    changed_target = workflow(
        step("a", parameters={"x": 1, "y": 2}), step("b", "a", system_target="other")
    )
    added_condition = workflow(
        step("a", parameters={"x": 1, "y": 2}), step("b", "a", condition="${x} == 1")
    )
    fingerprints = {
        definition.compile().fingerprint
        for definition in (base, changed_parameter, changed_target, added_condition)
    }
    assert len(fingerprints) == 4


def test_fingerprint_ignores_dict_order() -> None:
    one = workflow(step("a", parameters={"x": 1, "y": {"p": 1, "q": 2}}, retry_policy=None))
    two = workflow(step("a", parameters={"y": {"q": 2, "p": 1}, "x": 1}, retry_policy=None))
    assert one.compile().fingerprint == two.compile().fingerprint
    assert len(one.fingerprint()) == 64


def test_rule_parameter_templates_are_checked_for_the_steps_they_apply_to() -> None:
    def rule(**fields: Any) -> AdaptationRule:
        return AdaptationRule(
            "slow", RuleTrigger.STEP_SLOWER_THAN, RuleAction.SET_PARAMETERS, threshold=1, **fields
        )

    ok = rule(step_id="b", parameters={"hint": "${steps.a.output.hint}", "n": "${n}"})
    workflow(step("a"), step("b", "a"), rules=[ok]).compile()
    every_step = rule(parameters={"hint": "${steps.a.output.hint}"})
    with pytest.raises(WorkflowDefinitionError, match=r"rule 'slow' parameters.*not upstream"):
        workflow(step("a"), step("b", "a"), rules=[every_step]).compile()
    with pytest.raises(WorkflowDefinitionError, match="input 'm'"):
        workflow(step("a"), rules=[rule(parameters={"x": "${m}"})], inputs=["n"]).compile()
    with pytest.raises(WorkflowDefinitionError, match=r"rule 'slow' parameters: .*closing"):
        workflow(step("a"), rules=[rule(parameters={"x": "${m"})]).compile()
