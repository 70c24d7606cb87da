"""Fixtures of the agent tests; their helpers live in _agent_support (a unique module name,
so `import` never picks up another folder's conftest)."""

from _agent_support import agents, broker, models, watcher_factory  # noqa: F401
