"""The runtime and what the components share: clock, randomness, settings, plugins,
aggregates and state machines."""
