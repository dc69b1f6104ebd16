"""CEL step conditions, ``${...}`` mapping, the run scope and parameter templates."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.workflows.conditions import (
    Condition,
    WorkflowScope,
    compile_condition,
    render_parameters,
    template_references,
    validate_references,
)
from collaborative_blocks.errors import ConditionError, WorkflowDefinitionError

STEPS = ("a", "b", "my-step", "c")


def compile_(
    text: str,
    *,
    upstream: Collection[str] = ("a", "b", "my-step"),
    inputs: Collection[str] | None = None,
) -> Condition:
    return compile_condition(
        text,
        workflow_id="wf",
        step_id="c",
        known_steps=STEPS,
        upstream_steps=upstream,
        inputs=inputs,
    )


@pytest.fixture
def scope() -> WorkflowScope:
    scope = WorkflowScope(
        {
            "variable": "value",
            "count": 3,
            "ratio": 2.5,
            "flag": True,
            "nothing": None,
            "tags": ["x", "y"],
            "nested": {"deep": {"value": 7}},
            "my-key": "dashed",
        }
    )
    scope.set_step("a", "completed", {"y": 5, "items": [10, 20], "name": "ada"})
    scope.set_step("b", "skipped", None)
    scope.set_step("my-step", "completed", {"ok": True})
    return scope


# -- ${...} mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cel_source"),
    [
        ("${variable} == 'value'", "input.variable == 'value'"),
        ("${input.count} > 1", "input.count > 1"),
        ("${steps.a.output.y} > 3", "steps.a.output.y > 3"),
        ("${steps.a.status} == 'completed'", "steps.a.status == 'completed'"),
        ("${input.my-key} == 'dashed'", "input[\"my-key\"] == 'dashed'"),
        ("${my-key} == 'dashed'", "input[\"my-key\"] == 'dashed'"),
        ("${steps.my-step.output.ok}", 'steps["my-step"].output.ok'),
        ("${steps.a.output.items.1} == 20", "steps.a.output.items[1] == 20"),
        ("${in} == 1", 'input["in"] == 1'),
        ("${ variable } == 'value'", "input.variable == 'value'"),
        # ${ inside a CEL string literal is text, not a placeholder.
        ("${variable} != '${variable}'", "input.variable != '${variable}'"),
        ('${variable} != "${x}"', 'input.variable != "${x}"'),
        ("${variable} != '''${x}'''", "input.variable != '''${x}'''"),
        (r"${variable} != 'it\'s ${x}'", r"input.variable != 'it\'s ${x}'"),
        (r"${variable} != r'\${x}' + ${x}", r"input.variable != r'\${x}' + input.x"),
        ("input.count > 1", "input.count > 1"),
    ],
)
def test_placeholders_map_onto_cel_paths(text: str, cel_source: str) -> None:
    assert compile_(text).cel_source == cel_source


@pytest.mark.parametrize(
    ("text", "references"),
    [
        ("${variable} == 'value'", {"input.variable"}),
        ("has(steps.a.output.y) && steps.a.output.y > 3", {"steps.a.output.y"}),
        ("input['my-key'] == 'x' || input.tags[0] == 'x'", {"input.my-key", "input.tags.0"}),
        ("steps.a.output.name.startsWith('a')", {"steps.a.output.name"}),
        ("input.tags.all(t, t != '')", {"input.tags"}),
        ("'input.count' == input.variable", {"input.variable"}),
    ],
)
def test_references_are_the_dotted_paths_read(text: str, references: set[str]) -> None:
    assert compile_(text).references == references


# -- evaluation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${variable} == 'value'", True),
        ("${variable} == 'other'", False),
        ("${variable} != 'other'", True),
        ("${count} == 3 && ${flag}", True),
        ("${count} == 4 || ${flag} == false", False),
        ("${count} > 2 && ${ratio} < 3.0", True),
        # Ints and doubles compare by value.
        ("${count} == 3.0", True),
        ("${ratio} > 2", True),
        ("${nothing} == null", True),
        ("${flag} == true", True),
        ("'x' in ${tags}", True),
        ("'z' in ${tags}", False),
        ("'count' in input", True),
        ("has(input.count)", True),
        ("has(input.missing)", False),
        ("has(input.missing) && input.missing > 1", False),
        ("${nested.deep.value} == 7", True),
        ("input.nested.deep.value >= 7", True),
        ("${my-key} == 'dashed'", True),
        ("${steps.a.output.y} > 3", True),
        ("steps.a.output.items[1] == 20", True),
        ("size(steps.a.output.items) == 2", True),
        ("steps.a.output.name.startsWith('a')", True),
        ("${steps.my-step.output.ok}", True),
        ("steps.b.status == 'skipped'", True),
        ("steps.b.output == null", True),
        # A skipped step's output is null: test the status first; && skips the error.
        ("steps.b.status == 'completed' && steps.b.output.y > 3", False),
        ("steps.a.output.items.all(i, i >= 10)", True),
        ("steps.a.output.items.exists(i, i > 15)", True),
    ],
)
def test_condition_evaluation(scope: WorkflowScope, text: str, expected: bool) -> None:
    assert compile_(text).evaluate(scope) is expected


def test_the_seed_condition(scope: WorkflowScope) -> None:
    condition = compile_("${variable} == 'value'", inputs=["variable"])
    assert condition.evaluate(scope) is True
    assert condition.evaluate(WorkflowScope({"variable": "else"})) is False


@pytest.mark.parametrize(
    "text",
    [
        "input.missing == 1",  # missing key
        "steps.b.output.y > 3",  # the skipped step's output is null
        "${count} + 1.5 > 0",  # CEL does not mix int and double arithmetic
        "${count} / 0 == 1",
    ],
)
def test_a_runtime_error_is_a_condition_error(scope: WorkflowScope, text: str) -> None:
    with pytest.raises(ConditionError, match=r"step 'c'.*has\(") as caught:
        compile_(text).evaluate(scope)
    assert text in str(caught.value)


@pytest.mark.parametrize("text", ["${count}", "${tags}", "input.variable", "${nothing}"])
def test_a_non_boolean_result_is_a_condition_error(scope: WorkflowScope, text: str) -> None:
    with pytest.raises(ConditionError, match="not a boolean"):
        compile_(text).evaluate(scope)


def test_double_arithmetic_works_with_an_explicit_conversion(scope: WorkflowScope) -> None:
    assert compile_("double(${count}) * 1.5 == 4.5").evaluate(scope) is True


def test_evaluation_sees_steps_set_after_an_earlier_evaluation() -> None:
    scope = WorkflowScope({"x": 1})
    condition = compile_("has(steps.a) && steps.a.output.y > 3")
    other = compile_("${x} == 1")
    assert condition.evaluate(scope) is False
    assert other.evaluate(scope) is True
    scope.set_step("a", "completed", {"y": 5})
    assert condition.evaluate(scope) is True
    scope.set_step("a", "compensated", {"y": 1})
    assert condition.evaluate(scope) is False
    scope.set_step("b", "completed", {"y": 100})  # not read by the condition
    assert condition.evaluate(scope) is False
    assert other.evaluate(scope) is True


def test_a_condition_sees_only_its_scope_not_another_runs() -> None:
    condition = compile_("${x} == 1")
    assert condition.evaluate(WorkflowScope({"x": 1})) is True
    assert condition.evaluate(WorkflowScope({"x": 2})) is False


# -- define-time errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${variable} ==", "not valid CEL"),
        ("input.x == 'unterminated", "unterminated string"),
        ("${variable == 1", "no closing"),
        ("${} == 1", "empty placeholder"),
        ("${input..x} == 1", "empty segment"),
        ("   ", "is empty"),
        ("variable == 'value'", "unknown name 'variable'.*\\$\\{variable\\}"),
        ("${steps.nope.output} == 1", "step 'nope', which is not a step of this workflow"),
        ("steps.c.status == 'x'", "step 'c', which is not upstream of 'c'"),
        ("${steps.a.result} == 1", "only steps.a.status and steps.a.output"),
        ("size(steps) > 0", "'steps' as a whole"),
    ],
)
def test_define_time_errors_name_the_step_and_what_to_do(text: str, message: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match=message) as caught:
        compile_(text, upstream=("a",))
    assert caught.value.workflow_id == "wf"
    assert caught.value.step_id == "c"
    assert "step 'c' of workflow 'wf'" in str(caught.value)


def test_a_cel_syntax_error_carries_the_caret_message() -> None:
    with pytest.raises(WorkflowDefinitionError, match=r"\^"):
        compile_("input.x == ")


def test_a_step_that_is_not_upstream_says_to_add_the_dependency() -> None:
    with pytest.raises(WorkflowDefinitionError, match="add 'b' to the dependencies of 'c'"):
        compile_("steps.b.status == 'completed'", upstream=("a",))


def test_undeclared_inputs_are_errors_only_when_inputs_are_declared() -> None:
    assert compile_("${colour} == 'red'", inputs=None).references == {"input.colour"}
    with pytest.raises(WorkflowDefinitionError, match=r"input 'colour'.*declared inputs: color"):
        compile_("${colour} == 'red'", inputs=["color"])
    assert compile_("${color} == 'red'", inputs=["color"]).references == {"input.color"}


def test_validate_references_accepts_the_whole_input() -> None:
    validate_references(
        {"input"},
        workflow_id="wf",
        step_id="c",
        known_steps=STEPS,
        upstream_steps=(),
        inputs=["x"],
        what="a template",
    )


# -- scope -----------------------------------------------------------------------------------------


def test_scope_as_dict_is_a_snapshot() -> None:
    scope = WorkflowScope({"x": 1})
    scope.set_step("a", "completed", {"y": 2})
    snapshot = scope.as_dict()
    assert snapshot == {
        "input": {"x": 1},
        "steps": {"a": {"status": "completed", "output": {"y": 2}}},
    }
    scope.set_step("b", "skipped", None)
    assert "b" not in snapshot["steps"]  # type: ignore[operator]
    assert scope.step("b") == {"status": "skipped", "output": None}
    assert scope.step("zzz") is None


def test_scope_resolve_reads_paths() -> None:
    scope = WorkflowScope({"x": {"y": [1, 2]}})
    scope.set_step("a", "completed", {"id": "r-1"})
    assert scope.resolve("x.y.1") == 2
    assert scope.resolve("input.x") == {"y": [1, 2]}
    assert scope.resolve("steps.a.output.id") == "r-1"
    assert scope.resolve("steps.a.status") == "completed"
    with pytest.raises(ConditionError, match=r"no value at input\.x\.z"):
        scope.resolve("x.z")
    with pytest.raises(ConditionError, match=r"no value at input.x.y.5"):
        scope.resolve("x.y.5")


# -- templates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${count}", 3),
        ("${ratio}", 2.5),
        ("${flag}", True),
        ("${nothing}", None),
        ("${tags}", ["x", "y"]),
        ("${nested}", {"deep": {"value": 7}}),
        ("${steps.a.output.items.0}", 10),
        ("${steps.b.output}", None),
        ("${steps.b.status}", "skipped"),
        ("${steps.my-step.output.ok}", True),
        ("n=${count}", "n=3"),
        ("${variable}-${count}", "value-3"),
        ("flag ${flag}, none ${nothing}, tags ${tags}", 'flag true, none null, tags ["x","y"]'),
        ("cost $${count}", "cost ${count}"),
        ("plain text", "plain text"),
        ("$5 and ${count}", "$5 and 3"),
        (7, 7),
        (None, None),
        (
            {"a": ["${count}", {"b": "id-${steps.a.output.name}"}], "c": False},
            {"a": [3, {"b": "id-ada"}], "c": False},
        ),
    ],
)
def test_render_parameters(scope: WorkflowScope, template: JSONValue, expected: JSONValue) -> None:
    assert render_parameters(template, scope) == expected


def test_a_whole_value_template_is_a_copy(scope: WorkflowScope) -> None:
    rendered = render_parameters({"tags": "${tags}"}, scope)
    assert isinstance(rendered, dict)
    rendered["tags"].append("z")
    assert scope.resolve("tags") == ["x", "y"]


@pytest.mark.parametrize("template", ["${missing}", "x ${steps.a.output.nope}", ["${steps.zz}"]])
def test_a_missing_path_is_a_condition_error(scope: WorkflowScope, template: JSONValue) -> None:
    with pytest.raises(ConditionError, match="no value at"):
        render_parameters(template, scope)


def test_template_references() -> None:
    template: JSONValue = {
        "a": "${x}",
        "b": ["${steps.s1.output.id}", {"c": "text ${input.y} and ${steps.s2.status}"}],
        "d": "$${not_a_reference}",
        "e": 3,
    }
    assert template_references(template) == {
        "input.x",
        "steps.s1.output.id",
        "input.y",
        "steps.s2.status",
    }
    assert template_references("no placeholders") == frozenset()


@pytest.mark.parametrize("template", ["${unclosed", "a ${b ${c}}", "${}"])
def test_a_malformed_template_is_an_error(template: str) -> None:
    with pytest.raises(ConditionError):
        template_references(template)


def test_conditions_reading_different_parts_of_one_output_see_the_same_values() -> None:
    scope = WorkflowScope({"big": list(range(100)), "m": {"k": 1, "j": 2}})
    scope.set_step("a", "completed", {"y": 5, "items": list(range(1000)), "map": {"p": 1}})
    cases = {
        "steps.a.output.y == 5": True,
        "has(steps.a.output.nope)": False,
        "has(steps.a.output.map.p) && !has(steps.a.output.map.q)": True,
        "size(steps.a.output) == 3": True,
        "'items' in steps.a.output && 'nope' in steps.a.output == false": True,
        "size(steps.a.output.items) == 1000 && steps.a.output.items[999] == 999": True,
        "(steps.a.output).map.p == 1": True,
        "steps.a.output.map == {'p': 1}": True,
        "size(input) == 2 && size(input.m) == 2": True,
        "input.m.k == 1 && input.big[99] == 99": True,
        "steps.a.output.items.filter(i, i > 997) == [998, 999]": True,
    }
    for text, expected in cases.items():
        assert compile_(text).evaluate(scope) is expected, text


def test_other_mappings_and_sequences_render_as_dicts_and_lists(scope: WorkflowScope) -> None:
    from types import MappingProxyType

    template = MappingProxyType({"t": ("${count}", "x")})
    assert render_parameters(template, scope) == {"t": [3, "x"]}


def test_a_status_given_as_an_enum_member_is_stored_as_its_value() -> None:
    import enum

    class Status(str, enum.Enum):  # noqa: UP042 - a plain str mixin, whose str() is not the value
        DONE = "completed"

    scope = WorkflowScope({})
    scope.set_step("a", Status.DONE, None)
    assert scope.step("a") == {"status": "completed", "output": None}
    assert compile_("steps.a.status == 'completed'").evaluate(scope) is True
