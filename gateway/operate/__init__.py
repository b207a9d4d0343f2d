"""What an operator runs and sees: the ``osteogate`` CLI, the service that wires the stages
(serve / worker), the scheduler, health and metrics HTTP server, admin commands (replay,
resend, purge), self-checks, read-only queries and the demo.

May import: every gateway package and ``osteogate.model``; ``training`` only for the CLI's
model commands (their handlers import torch lazily).
"""
