"""cqrs_pg: CQRS built from PostgreSQL itself."""

from __future__ import annotations

__version__ = "0.1.0"
