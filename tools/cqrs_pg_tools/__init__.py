"""cqrs_pg's development tools: local clusters, the demo, chaos runs, benchmarks, and the
test support they and the tests share (``cqrs_pg_tools.testing``). Not part of the
library: installed from a checkout with ``python3 -m pip install -e tools``."""
