"""The base of every error a user can fix (a setting, a missing package, an unreachable peer)."""


class FedafdError(RuntimeError):
    """Shown by the CLIs as one 'error: ...' line that says what to change, never as a traceback."""
