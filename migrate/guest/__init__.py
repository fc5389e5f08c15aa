"""The synthetic guest: workloads (native engine), the runner process that
owns guest RAM, and the agent-side handle to it.

- :mod:`migrate.guest.workloads` -- fill/digest/workload engine wrappers.
- :mod:`migrate.guest.runner` -- ``python -m migrate.guest.runner``.
- :mod:`migrate.guest.process` -- :class:`GuestSpec`, :class:`GuestProcess`.
"""
