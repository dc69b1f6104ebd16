"""Planted bugs for the chaos simulator: each module is a plugin that breaks one component.

They prove the checkers can fail (issue 6, item 7): a run with one of them must violate an
invariant within a few seeds, and ``tests/simulation/test_mutations.py`` asserts it does. They
are also examples of the ``cb_chaos_component`` hook: to validate your own scenario's checkers,
write a mutant like these for your component and check that some seed fails.

==========================  =========================================  =====================
module                      the planted bug                            caught by
==========================  =========================================  =====================
``forgetful_inbox``         EXACTLY_ONCE inbox kept in memory: a       ``transfers``
                            crash forgets which messages were handled  (no_double_apply,
                                                                       conservation)
``noncommutative_resolver`` ``last_write_wins`` keeps the write that   ``replicas``
                            *arrived* last, not the latest one         (converged)
``skipped_compensation``    the workflow engine's ``refund``           ``orders``
                            compensation reports success unsent        (saga_atomicity,
                                                                       money_conserved)
``early_ack_transport``     the network acknowledges a delivery as     ``pipeline``
                            soon as it is fetched, before the handler  (no_lost_message,
                                                                       accounting)
``lossy_store``             the store acknowledges a write before it   ``transfers``
                            is durable: a crash loses the node's last  (conservation, ...)
                            write
==========================  =========================================  =====================

Run one: ``cblocks chaos run --scenario transfers -p
collaborative_blocks.testing.mutants.forgetful_inbox`` exits 1 and prints the replay command.
Never install them in a real deployment: the hook only fires in simulations anyway.
"""

#: mutant module (under this package) -> the scenario whose checkers catch it.
MUTANTS: dict[str, str] = {
    "forgetful_inbox": "transfers",
    "noncommutative_resolver": "replicas",
    "skipped_compensation": "orders",
    "early_ack_transport": "pipeline",
    "lossy_store": "transfers",
}

__all__ = ["MUTANTS"]
