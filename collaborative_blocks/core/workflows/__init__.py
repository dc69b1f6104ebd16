"""Durable workflows: definitions, conditions, circuit breakers, runs and the engine."""

from __future__ import annotations
