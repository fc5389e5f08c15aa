"""migrate: post-copy live migration of guest memory over gRPC.

The destination resolves a guest's userfaultfd page faults by fetching pages
from the source while a bulk stream pushes the rest; see docs/architecture.md.
"""

__version__ = "0.1.0"
