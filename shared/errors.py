"""The one base class of every error fedrec reports to a person rather than as a bug.

Owns: :class:`FedrecError`, and :class:`RunFailed` (shared by the ServerApp that ends a run
and the callers that read its ``results.json``). Each package's own error types (bad data, bad
config, a refused budget, a failed deployment step...) derive from it as well as from the built-in type they
always were (``ValueError``, ``RuntimeError``), so ``except ValueError`` still catches them and
the command line (:func:`fedrec.cli.main.run`) prints any of them as one message and an exit
code, with the traceback only under ``--debug``.

Must not: import anything.
"""

from __future__ import annotations


class FedrecError(Exception):
    """A problem a user can fix: the message says what is wrong, where, and how to fix it.

    ``exit_code``: what the command line exits with (2: bad input or configuration,
    1: a step failed or a check refused).
    """

    exit_code = 1


class InputError(FedrecError, ValueError):
    """Bad input a command found in what it was given (a message of another error type it
    caught, made one of fedrec's, with that error as its cause)."""

    exit_code = 2


class StepFailed(FedrecError, RuntimeError):
    """A step of a command failed on input that looked valid (the message says which step)."""


class RunFailed(FedrecError, RuntimeError):
    """A federated run ended without any platform training in any round.

    The ServerApp records the reason in ``results.json`` under :attr:`RESULTS_KEY` and raises
    this, so Flower marks the run failed; ``flwr run`` still exits 0, so callers read the key.
    """

    RESULTS_KEY = "failed"
