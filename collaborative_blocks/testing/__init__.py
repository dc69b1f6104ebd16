"""What the package ships for testing: conformance suites for stores (and, later, transports
and resolvers) and a pytest plugin with fixtures (installed automatically with the package).
"""

from __future__ import annotations

from collaborative_blocks.testing.services import (
    ServiceUnavailable,
    postgres_admin_dsn,
    require_postgres,
    services_required,
)
from collaborative_blocks.testing.store_conformance import StoreConformance

__all__ = [
    "ServiceUnavailable",
    "StoreConformance",
    "postgres_admin_dsn",
    "require_postgres",
    "services_required",
]
