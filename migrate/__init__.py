"""migrate: post-copy live migration of guest memory over gRPC.

The destination resolves a guest's userfaultfd page faults by fetching pages
from the source while a bulk stream pushes the rest; see docs/architecture.md.
"""
import os

__version__ = "0.1.0"

# gRPC's core writes its own log lines (handshake failures, a port in use) to
# stderr, around the one line the CLI prints for the same failure, and in
# every agent's log on each refused client. Silence it before anything
# imports grpc (every entry point imports this package first); our own
# messages say what failed. GRPC_VERBOSITY=DEBUG in the environment brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
