"""Step conditions and parameter templates: Google CEL with ``${...}`` placeholders.

A condition is a CEL expression (https://cel.dev) compiled once, when the workflow is
defined, and evaluated against a :class:`WorkflowScope` (the run's input and the results of
the steps that finished so far). Python ``eval`` is never used: CEL has no side effects, no
loops beyond bounded macros and no access to anything but the two variables below.

Two variables are visible:

``input``
    The run's input data (a JSON object).
``steps``
    ``steps.<step_id>.status`` (``"completed"``, ``"skipped"``, ...) and
    ``steps.<step_id>.output`` (the step's JSON output; ``null`` for a skipped step).

``${path}`` placeholders are rewritten into CEL before compiling:

* ``${variable}`` (a bare name) means ``input.variable``, so the seed form
  ``"${variable} == 'value'"`` works;
* ``${input.x}``, ``${steps.s1.output.y}`` and ``${steps.s1.status}`` map to the same CEL path;
* a segment that is not a CEL identifier becomes an index: ``${input.my-key}`` is
  ``input["my-key"]``; an all-digit segment is a list index: ``${steps.a.output.items.0}`` is
  ``steps.a.output.items[0]``;
* ``${`` inside a CEL string literal is left alone (``'${x}'`` is the five characters).

Conditions may only read steps that are upstream of their step (transitive dependencies), so
the value is always there when the condition runs. Write conditions defensively where a
value may be absent: ``has(input.x) && input.x > 3``, or
``steps.a.status == 'completed' && steps.a.output.y > 3`` when ``a`` may be skipped (CEL's
``&&`` and ``||`` skip the other side's error). Numbers compare across int and double
(``1 == 1.0`` is true), but arithmetic does not mix them: write ``double(input.n) * 1.5``.

Parameter templates (:func:`render_parameters`) use the same ``${path}`` syntax in any
string of a step's parameters; a string that is exactly one placeholder keeps the value's JSON
type. ``$${`` renders a literal ``${``.
"""

from __future__ import annotations

import copy
import enum
import json
import re
from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache
from typing import Final

import cel

from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.errors import ConditionError, WorkflowDefinitionError

__all__ = [
    "Condition",
    "WorkflowScope",
    "compile_condition",
    "render_parameters",
    "template_references",
    "validate_references",
]

#: The names a condition or template may start with.
SCOPE_NAMES: Final = frozenset({"input", "steps"})
#: What ``steps.<step_id>`` holds.
STEP_FIELDS: Final = frozenset({"status", "output"})

# Words CEL reserves: a path segment spelled like one of these must be written as an index.
_CEL_RESERVED: Final = frozenset(
    {
        "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
        "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
        "void", "while",
    }
)  # fmt: skip
_COMPREHENSION_MACROS: Final = frozenset(
    {"all", "exists", "exists_one", "map", "filter", "transformList", "transformMap"}
)

_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENT_FULL_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NUMBER_RE: Final = re.compile(
    r"0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?"
)
_STRING_START_RE: Final = re.compile(r"(?:[rR][bB]?|[bB][rR]?)?('''|\"\"\"|'|\")")
_TEMPLATE_RE: Final = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
_WHOLE_TEMPLATE_RE: Final = re.compile(r"\$\{([^{}]*)\}\Z")


# --------------------------------------------------------------------------------------------
# Paths


def _split_path(path: str) -> tuple[str, ...]:
    """``"steps.a.output.y"`` -> ``("steps", "a", "output", "y")``; a bare name gets ``input``."""
    text = path.strip()
    if not text:
        raise ConditionError("empty placeholder ${}: write ${input.key} or ${steps.<id>.output}")
    segments = tuple(segment.strip() for segment in text.split("."))
    if any(not segment for segment in segments):
        raise ConditionError(
            f"placeholder ${{{path}}} has an empty segment: separate names with single dots"
        )
    if segments[0] not in SCOPE_NAMES:
        segments = ("input", *segments)
    return segments


def _cel_path(segments: Sequence[str]) -> str:
    parts = [segments[0]]
    for segment in segments[1:]:
        if segment.isdigit():
            parts.append(f"[{int(segment)}]")
        elif _IDENT_FULL_RE.match(segment) and segment not in _CEL_RESERVED:
            parts.append(f".{segment}")
        else:
            parts.append(f"[{json.dumps(segment)}]")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# A small CEL tokenizer: enough to find string literals, ``${...}`` and member chains.

_Token = tuple[str, str]  # (kind, text); kinds: str, ident, num, tmpl, ws, punct
_Path = tuple[str, ...]  # ("steps", "a", "output", "y")


def _string_end(source: str, start: int, quote: str, raw: bool) -> int:
    index = start
    while index < len(source):
        if not raw and source[index] == "\\":
            index += 2
            continue
        if source.startswith(quote, index):
            return index + len(quote)
        index += 1
    raise ValueError(f"unterminated string literal starting at column {start}")


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char.isspace():
            end = index + 1
            while end < len(source) and source[end].isspace():
                end += 1
            tokens.append(("ws", source[index:end]))
            index = end
            continue
        string_start = _STRING_START_RE.match(source, index)
        if string_start is not None:
            prefix = source[index : string_start.start(1)]
            quote = string_start.group(1)
            end = _string_end(source, string_start.end(), quote, raw="r" in prefix.lower())
            tokens.append(("str", source[index:end]))
            index = end
            continue
        if source.startswith("${", index):
            end = source.find("}", index)
            if end < 0:
                raise ValueError(f"placeholder at column {index + 1} has no closing '}}'")
            tokens.append(("tmpl", source[index : end + 1]))
            index = end + 1
            continue
        ident = _IDENT_RE.match(source, index)
        if ident is not None:
            tokens.append(("ident", ident.group()))
            index = ident.end()
            continue
        number = _NUMBER_RE.match(source, index)
        if number is not None:
            tokens.append(("num", number.group()))
            index = number.end()
            continue
        tokens.append(("punct", char))
        index += 1
    return tokens


def _literal_key(token: _Token) -> str | None:
    """The key of ``["key"]`` or ``[0]`` as a path segment, or None if not a plain literal."""
    kind, text = token
    if kind == "num" and text.isdigit():
        return text
    if kind == "str":
        value = cel.evaluate(text)
        return value if isinstance(value, str) else None
    return None


def _member_chains(tokens: Sequence[_Token]) -> tuple[set[_Path], set[str]]:
    """The paths of ``input``/``steps`` member chains, and comprehension-bound names.

    A chain stops at a method call or a computed index, so the path covers everything the
    expression can reach through it.
    """
    significant = [token for token in tokens if token[0] != "ws"]
    references: set[_Path] = set()
    bound: set[str] = set()
    for index, (kind, text) in enumerate(significant):
        previous = significant[index - 1] if index else ("", "")
        following = significant[index + 1] if index + 1 < len(significant) else ("", "")
        if kind != "ident":
            continue
        if text in _COMPREHENSION_MACROS and previous == ("punct", ".") and following[1] == "(":
            cursor = index + 2
            while (
                cursor + 1 < len(significant)
                and significant[cursor][0] == "ident"
                and significant[cursor + 1] == ("punct", ",")
            ):
                bound.add(significant[cursor][1])
                cursor += 2
            continue
        if text not in SCOPE_NAMES or previous == ("punct", ".") or following == ("punct", "("):
            continue
        segments = [text]
        cursor = index + 1
        while cursor < len(significant):
            token = significant[cursor]
            after = significant[cursor + 1] if cursor + 1 < len(significant) else ("", "")
            if token == ("punct", ".") and after[0] == "ident":
                if cursor + 2 < len(significant) and significant[cursor + 2] == ("punct", "("):
                    break  # a method call such as .startsWith(...)
                segments.append(after[1])
                cursor += 2
                continue
            if (
                token == ("punct", "[")
                and cursor + 2 < len(significant)
                and significant[cursor + 2] == ("punct", "]")
            ):
                key = _literal_key(after)
                if key is None:
                    break
                segments.append(key)
                cursor += 3
                continue
            break
        references.add(tuple(segments))
    return references, bound


def _map_placeholders(tokens: Sequence[_Token]) -> str:
    parts: list[str] = []
    for kind, text in tokens:
        if kind == "tmpl":
            parts.append(_cel_path(_split_path(text[2:-1])))
        else:
            parts.append(text)
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Reference validation (shared by conditions and parameter templates)


def validate_references(
    references: Collection[str],
    *,
    workflow_id: str,
    step_id: str,
    known_steps: Collection[str],
    upstream_steps: Collection[str],
    inputs: Collection[str] | None,
    what: str,
) -> None:
    """Check dotted references (``"input.x"``, ``"steps.a.output.y"``) against a definition.

    ``what`` names the place for the message (``"condition 'x > 1'"``). Raises
    :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the step when a
    reference reads an unknown step, a step that is not upstream (a transitive dependency),
    a field other than ``status``/``output``, or an input key not in ``inputs`` (when the
    definition declares its inputs).
    """
    _validate_paths(
        [tuple(reference.split(".")) for reference in references],
        workflow_id=workflow_id,
        step_id=step_id,
        known_steps=known_steps,
        upstream_steps=upstream_steps,
        inputs=inputs,
        what=what,
    )


def _validate_paths(
    paths: Collection[_Path],
    *,
    workflow_id: str,
    step_id: str,
    known_steps: Collection[str],
    upstream_steps: Collection[str],
    inputs: Collection[str] | None,
    what: str,
) -> None:
    for segments in sorted(paths):
        if segments[0] == "input":
            if inputs is not None and len(segments) > 1 and segments[1] not in inputs:
                declared = ", ".join(sorted(inputs)) or "none"
                raise WorkflowDefinitionError(
                    workflow_id,
                    step_id,
                    f"{what} reads input {segments[1]!r}, which the workflow does not declare "
                    f"(declared inputs: {declared}); add it to 'inputs' or fix the name",
                )
            continue
        if len(segments) < 2:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"{what} reads 'steps' as a whole or with a computed key; read one step "
                "as steps.<step_id>.status or steps.<step_id>.output",
            )
        target = segments[1]
        if target not in known_steps:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"{what} reads step {target!r}, which is not a step of this workflow "
                f"(steps: {', '.join(sorted(known_steps))})",
            )
        if target not in upstream_steps:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"{what} reads step {target!r}, which is not upstream of {step_id!r}, so its "
                f"result may not exist yet; add {target!r} to the dependencies of {step_id!r}",
            )
        if len(segments) > 2 and segments[2] not in STEP_FIELDS:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"{what} reads steps.{target}.{segments[2]}; a step has only "
                f"steps.{target}.status and steps.{target}.output",
            )


# --------------------------------------------------------------------------------------------
# Scope


class _CachedContext:
    __slots__ = ("context", "scope_version", "step_versions")

    def __init__(
        self, context: cel.Context, scope_version: int, step_versions: tuple[int, ...]
    ) -> None:
        self.context = context
        self.scope_version = scope_version
        self.step_versions = step_versions


class WorkflowScope:
    """The values one run's conditions and parameter templates see.

    ``WorkflowScope(input_data)`` starts with the run's input; the engine calls
    :meth:`set_step` when a step finishes (completed, skipped, failed, compensated...).
    :meth:`as_dict` is ``{"input": {...}, "steps": {step_id: {"status": ..., "output": ...}}}``.

    CEL contexts are prebuilt per set of paths a condition reads and hold only the values
    under those paths (CEL copies every intermediate map it selects through, so a condition
    reading ``steps.a.output.y`` must not drag a large output along). A step finishing only
    refreshes the contexts of conditions that read it, the first time they are evaluated
    afterwards; an evaluation on an unchanged scope costs about a microsecond.

    >>> scope = WorkflowScope({"x": 5})
    >>> scope.set_step("load", "completed", {"rows": 3})
    >>> scope.as_dict()["steps"]["load"]
    {'status': 'completed', 'output': {'rows': 3}}
    """

    __slots__ = ("_contexts", "_input", "_step_versions", "_steps", "_version")

    def __init__(self, input_data: Mapping[str, JSONValue] | None = None) -> None:
        self._input: dict[str, JSONValue] = dict(input_data or {})
        self._steps: dict[str, dict[str, JSONValue]] = {}
        self._step_versions: dict[str, int] = {}
        self._version = 0
        self._contexts: dict[tuple[_Path, ...], _CachedContext] = {}

    @property
    def input(self) -> Mapping[str, JSONValue]:
        """The run's input data (do not mutate)."""
        return self._input

    def set_step(self, step_id: str, status: str, output: JSONValue) -> None:
        """Record a step's status (a ``StepStatus`` value) and output (``None`` if none)."""
        value = status.value if isinstance(status, enum.Enum) else status
        self._steps[step_id] = {"status": str(value), "output": output}
        self._version += 1
        self._step_versions[step_id] = self._version

    def step(self, step_id: str) -> Mapping[str, JSONValue] | None:
        """``{"status": ..., "output": ...}`` of a step, or None if it has not been set."""
        return self._steps.get(step_id)

    def as_dict(self) -> dict[str, JSONValue]:
        """A snapshot ``{"input": ..., "steps": {step_id: {"status", "output"}}}``."""
        return {
            "input": dict(self._input),
            "steps": {step_id: dict(entry) for step_id, entry in self._steps.items()},
        }

    def _context_for(self, paths: tuple[_Path, ...], step_ids: tuple[str, ...]) -> cel.Context:
        """A CEL context holding the values under ``paths`` (kept up to date)."""
        cached = self._contexts.get(paths)
        if cached is not None and cached.scope_version == self._version:
            return cached.context
        versions = tuple(self._step_versions.get(step_id, 0) for step_id in step_ids)
        if cached is None:
            input_paths = [path[1:] for path in paths if path[0] == "input"]
            cached = _CachedContext(
                cel.Context(
                    variables={
                        "input": _prune(self._input, input_paths),
                        "steps": self._pruned_steps(paths),
                    }
                ),
                self._version,
                versions,
            )
            self._contexts[paths] = cached
        elif cached.step_versions != versions:
            cached.context.add_variable("steps", self._pruned_steps(paths))
            cached.step_versions = versions
        cached.scope_version = self._version
        return cached.context

    def _pruned_steps(self, paths: tuple[_Path, ...]) -> JSONValue:
        return _prune(self._steps, [path[1:] for path in paths if path[0] == "steps"])

    def resolve(self, path: str) -> JSONValue:
        """The value at a ``${...}`` path (``"x"``, ``"input.x"``, ``"steps.a.output.y"``).

        Raises :class:`~collaborative_blocks.errors.ConditionError` when the run has no such
        value.
        """
        return self._resolve(_split_path(path), path)

    def _resolve(self, segments: tuple[str, ...], path: str) -> JSONValue:
        value: JSONValue = self._input if segments[0] == "input" else self._steps
        for depth, segment in enumerate(segments[1:], start=1):
            if (type(value) is dict or isinstance(value, Mapping)) and segment in value:
                value = value[segment]
            elif (
                isinstance(value, Sequence)
                and not isinstance(value, str)
                and segment.isdigit()
                and int(segment) < len(value)
            ):
                value = value[int(segment)]
            else:
                where = ".".join(segments[: depth + 1])
                raise ConditionError(
                    f"${{{path}}}: the run has no value at {where}; check the name, or give the "
                    "input a default before starting the run"
                )
        return value


def _prune(value: JSONValue, paths: Sequence[_Path]) -> JSONValue:
    """The part of ``value`` that ``paths`` reach: maps keep only the keys on a path (absent
    keys stay absent, so ``has()`` answers the same); a path's end, a list or a scalar is
    kept whole."""
    if not paths:
        return {}
    if any(not path for path in paths) or not isinstance(value, Mapping):
        return value
    groups: dict[str, list[_Path]] = {}
    for path in paths:
        groups.setdefault(path[0], []).append(path[1:])
    return {key: _prune(value[key], rest) for key, rest in groups.items() if key in value}


# --------------------------------------------------------------------------------------------
# Conditions


class Condition:
    """A step condition, compiled once; :meth:`evaluate` it against a :class:`WorkflowScope`.

    ``source`` is the text as written, ``cel_source`` the CEL after ``${...}`` mapping and
    ``references`` the dotted paths it reads (``"input.variable"``,
    ``"steps.step1.output.y"``). Build one with :func:`compile_condition`.
    """

    __slots__ = (
        "_paths",
        "_program",
        "_step_ids",
        "cel_source",
        "references",
        "source",
        "step_id",
        "workflow_id",
    )

    def __init__(
        self,
        *,
        source: str,
        cel_source: str,
        paths: Collection[_Path],
        program: cel.Program,
        workflow_id: str,
        step_id: str,
    ) -> None:
        self.source = source
        self.cel_source = cel_source
        self.references = frozenset(".".join(path) for path in paths)
        self.workflow_id = workflow_id
        self.step_id = step_id
        self._program = program
        self._paths = tuple(sorted(set(paths)))
        self._step_ids = tuple(
            sorted({path[1] for path in paths if path[0] == "steps" and len(path) > 1})
        )

    def evaluate(self, scope: WorkflowScope) -> bool:
        """True if the step should run.

        Raises :class:`~collaborative_blocks.errors.ConditionError` when evaluation fails (a
        missing key, a type mismatch) or the result is not a boolean.
        """
        try:
            result = self._program.execute(scope._context_for(self._paths, self._step_ids))
        except Exception as exc:  # the CEL extension raises several builtin error types
            raise ConditionError(
                f"condition {self.source!r} of step {self.step_id!r} in workflow "
                f"{self.workflow_id!r} failed: {type(exc).__name__}: {exc}. Guard values that "
                "may be absent with has(...), or test steps.<id>.status == 'completed' first"
            ) from exc
        if result is True or result is False:
            return result
        raise ConditionError(
            f"condition {self.source!r} of step {self.step_id!r} in workflow "
            f"{self.workflow_id!r} returned {result!r}, not a boolean; compare it explicitly "
            "(for example ${flag} == true or size(${items}) > 0)"
        )

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other.cel_source == self.cel_source

    def __hash__(self) -> int:
        return hash(self.cel_source)


def compile_condition(
    text: str,
    *,
    workflow_id: str,
    step_id: str,
    known_steps: Collection[str],
    upstream_steps: Collection[str],
    inputs: Collection[str] | None = None,
) -> Condition:
    """Compile a step condition (CEL with ``${...}`` placeholders) once, at define time.

    ``known_steps`` are the workflow's step ids, ``upstream_steps`` the transitive
    dependencies of ``step_id`` and ``inputs`` the declared input keys (None: any key).

    Raises :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the step for a
    syntax error (with CEL's caret message), a name other than ``input``/``steps``, a step
    that is unknown or not upstream, or an undeclared input.

    >>> condition = compile_condition(
    ...     "${variable} == 'value'", workflow_id="w", step_id="s",
    ...     known_steps=["s"], upstream_steps=[], inputs=None)
    >>> condition.cel_source, sorted(condition.references)
    ("input.variable == 'value'", ['input.variable'])
    >>> condition.evaluate(WorkflowScope({"variable": "value"}))
    True
    """
    what = f"condition {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise WorkflowDefinitionError(
            workflow_id, step_id, f"{what} is empty; give a CEL expression or leave it out"
        )
    try:
        tokens = _tokenize(text)
        cel_source = _map_placeholders(tokens)
    except (ValueError, ConditionError) as exc:
        raise WorkflowDefinitionError(workflow_id, step_id, f"{what}: {exc}") from exc
    try:
        program = cel.compile(cel_source)
    except Exception as exc:  # the CEL extension reports parse errors as ValueError
        raise WorkflowDefinitionError(
            workflow_id,
            step_id,
            f"{what} is not valid CEL (compiled as {cel_source!r}): {exc}",
        ) from exc
    references, bound = _member_chains(_tokenize(cel_source))
    for name in program.variables():
        if name not in SCOPE_NAMES and name not in bound:
            raise WorkflowDefinitionError(
                workflow_id,
                step_id,
                f"{what} reads the unknown name {name!r}; read run input as ${{{name}}} or "
                f"input.{name}, and step results as steps.<step_id>.output or .status",
            )
    _validate_paths(
        references,
        workflow_id=workflow_id,
        step_id=step_id,
        known_steps=known_steps,
        upstream_steps=upstream_steps,
        inputs=inputs,
        what=what,
    )
    return Condition(
        source=text,
        cel_source=cel_source,
        paths=references,
        program=program,
        workflow_id=workflow_id,
        step_id=step_id,
    )


# --------------------------------------------------------------------------------------------
# Parameter templates

_TemplatePart = str | tuple[str, tuple[str, ...]]  # literal text, or (path, segments)


@lru_cache(maxsize=4096)
def _parse_template(text: str) -> tuple[_TemplatePart, ...]:
    whole = _WHOLE_TEMPLATE_RE.match(text)
    if whole is not None:
        return ((whole.group(1), _split_path(whole.group(1))),)
    parts: list[_TemplatePart] = []
    position = 0
    for match in _TEMPLATE_RE.finditer(text):
        parts.append(text[position : match.start()])
        if match.group(1) is None:
            parts.append("${")
        else:
            parts.append((match.group(1), _split_path(match.group(1))))
        position = match.end()
    parts.append(text[position:])
    return tuple(part for part in parts if part != "")


def _format_embedded(value: JSONValue) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def render_parameters(template: JSONValue, scope: WorkflowScope) -> JSONValue:
    """Substitute ``${...}`` placeholders in strings anywhere in nested dicts and lists.

    A string that is exactly one placeholder is replaced by the value itself (keeping its
    JSON type: ``"${input.count}"`` -> ``3``); placeholders embedded in text are formatted
    (strings as they are, other values as compact JSON: ``true``, ``null``, ``[1,2]``).
    ``$${`` renders ``${``. Raises :class:`~collaborative_blocks.errors.ConditionError` when a
    path is missing in the run.

    >>> scope = WorkflowScope({"count": 3, "name": "ada"})
    >>> render_parameters({"n": "${count}", "greeting": "hi ${name}", "k": [1, "${count}"]}, scope)
    {'n': 3, 'greeting': 'hi ada', 'k': [1, 3]}
    """
    # Concrete types first: isinstance against the Mapping/Sequence ABCs costs far more.
    if isinstance(template, str):
        return _render_string(template, scope)
    if isinstance(template, dict):
        return {key: render_parameters(value, scope) for key, value in template.items()}
    if isinstance(template, list):
        return [render_parameters(value, scope) for value in template]
    if template is None or isinstance(template, int | float):
        return template
    if isinstance(template, Mapping):
        return {key: render_parameters(value, scope) for key, value in template.items()}
    return [render_parameters(value, scope) for value in template]  # another sequence


def _render_string(template: str, scope: WorkflowScope) -> JSONValue:
    if "${" not in template:
        return template
    parts = _parse_template(template)
    first = parts[0] if len(parts) == 1 else None
    if isinstance(first, tuple) and template.startswith("${"):
        value = scope._resolve(first[1], first[0])
        # A copy, so a step's parameters never alias another step's output.
        return copy.deepcopy(value) if isinstance(value, dict | list) else value
    rendered: list[str] = []
    for part in parts:
        if isinstance(part, str):
            rendered.append(part)
        else:
            rendered.append(_format_embedded(scope._resolve(part[1], part[0])))
    return "".join(rendered)


def template_references(template: JSONValue) -> frozenset[str]:
    """The dotted paths the ``${...}`` placeholders of a template read (bare names get
    ``input.``), for define-time validation with :func:`validate_references`.

    Raises :class:`~collaborative_blocks.errors.ConditionError` for a malformed placeholder.

    >>> sorted(template_references({"a": "${x}", "b": ["${steps.s1.output.id}"]}))
    ['input.x', 'steps.s1.output.id']
    """
    found: set[str] = set()
    _collect_references(template, found)
    return frozenset(found)


def _collect_references(template: JSONValue, found: set[str]) -> None:
    if isinstance(template, str):
        if "$" not in template:
            return
        stripped = _TEMPLATE_RE.sub("", template)
        if "${" in stripped:
            raise ConditionError(
                f"template {template!r} has a '${{' without a closing '}}' (or with a nested "
                "'{'); close it, or write $${ for a literal ${"
            )
        for part in _parse_template(template):
            if isinstance(part, tuple):
                found.add(".".join(part[1]))
    elif isinstance(template, Mapping):
        for value in template.values():
            _collect_references(value, found)
    elif isinstance(template, Sequence):
        for value in template:
            _collect_references(value, found)
