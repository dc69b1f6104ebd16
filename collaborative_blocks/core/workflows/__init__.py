"""Durable workflows: definitions, conditions, circuit breakers, runs and the engine.

```python
from collaborative_blocks.core.workflows import (
    WorkflowCoordinationEngine, WorkflowDefinition, WorkflowStep,
)
```

- :mod:`~collaborative_blocks.core.workflows.definitions`: :class:`WorkflowDefinition`,
  :class:`WorkflowStep`, :class:`RetryPolicy`, :class:`AdaptationRule`, YAML/JSON loading,
  define-time validation (:meth:`WorkflowDefinition.compile`).
- :mod:`~collaborative_blocks.core.workflows.conditions`: CEL conditions and ``${...}``
  parameter templates.
- :mod:`~collaborative_blocks.core.workflows.breakers`: circuit breakers per target
  (resilience4j semantics) and their registry.
- :mod:`~collaborative_blocks.core.workflows.run`: the event-sourced :class:`WorkflowRun`.
- :mod:`~collaborative_blocks.core.workflows.engine`: :class:`WorkflowCoordinationEngine`
  and its results.
"""

from __future__ import annotations

from collaborative_blocks.core.workflows.breakers import (
    BREAKER_STREAM_PREFIX,
    TRANSITION_TOPIC,
    BreakerConfig,
    BreakerMetrics,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    WindowType,
)
from collaborative_blocks.core.workflows.conditions import (
    Condition,
    WorkflowScope,
    compile_condition,
    render_parameters,
    template_references,
)
from collaborative_blocks.core.workflows.definitions import (
    AdaptationRule,
    CompiledStep,
    CompiledWorkflow,
    RetryPolicy,
    RuleAction,
    RuleTrigger,
    WorkflowDefinition,
    WorkflowStep,
    load_definition,
)
from collaborative_blocks.core.workflows.engine import (
    INTERRUPTED,
    AppliedRule,
    CompensationResult,
    RunEvent,
    StepResult,
    WorkflowCoordinationEngine,
    WorkflowResult,
)
from collaborative_blocks.core.workflows.run import (
    RunStatus,
    StepStatus,
    WorkflowRun,
    run_aggregate_id,
)

__all__ = [
    "BREAKER_STREAM_PREFIX",
    "INTERRUPTED",
    "TRANSITION_TOPIC",
    "AdaptationRule",
    "AppliedRule",
    "BreakerConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "CompensationResult",
    "CompiledStep",
    "CompiledWorkflow",
    "Condition",
    "RetryPolicy",
    "RuleAction",
    "RuleTrigger",
    "RunEvent",
    "RunStatus",
    "StepResult",
    "StepStatus",
    "WindowType",
    "WorkflowCoordinationEngine",
    "WorkflowDefinition",
    "WorkflowResult",
    "WorkflowRun",
    "WorkflowScope",
    "WorkflowStep",
    "compile_condition",
    "load_definition",
    "render_parameters",
    "run_aggregate_id",
    "template_references",
]
