"""The ``fedrec`` command line: one typer app; each module in :data:`COMMAND_MODULES` adds its
commands through a ``register(app)`` function. Heavy imports stay inside the commands so that
``fedrec --help`` is instant.

One error path (:func:`run`): a :class:`~fedrec.shared.errors.FedrecError` is printed as its
message with its exit code, a file-system error as the path and what went wrong, anything else
as an internal error; the traceback is shown only with ``fedrec --debug`` (or
``FEDREC_DEBUG=1``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import typer

app = typer.Typer(
    name="fedrec",
    help="Federated, privacy-preserving, cross-platform recommender.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = (
    "fedrec.simulations.world",  # fedrec world
    "fedrec.cli.encode",  # fedrec encode
    "fedrec.cli.train",  # fedrec train
    "fedrec.simulations.simulate",  # fedrec simulate
    "fedrec.cli.serve",  # fedrec recommend|serve|export
    "fedrec.deploy.cli",  # fedrec deploy certs|local|split|superlink|node
    "fedrec.audit.cli",  # fedrec audit
    "fedrec.cli.node",  # fedrec node policy|check-ledger|reset-ledger
)
DEBUG_ENV = "FEDREC_DEBUG"
INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in fedrec, not in the input


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show the Python traceback of an error (also FEDREC_DEBUG=1)."
    ),
) -> None:
    """Federated, privacy-preserving, cross-platform recommender."""
    # --debug is read by run() before the command starts (it decides how errors are shown)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


# Known, understood library warnings that would bury the command's own output (the command
# line only; libraries and apps keep every warning).
QUIET = (
    r"Secure RNG turned off",  # Opacus: OS-entropy-seeded noise (DPSession.noise_seed)
    r"Full backward hook is firing",  # Opacus ghost clipping's second backward pass
    r"Optimal order is the largest alpha",  # RDP: ε is still a valid (looser) upper bound
)


def _say(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}")


def _first_command(argv: list[str]) -> int:
    """Index of the first argument that is not an option of ``fedrec`` itself."""
    return next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))


def run(args: Sequence[str] | None = None) -> int:
    """Run the ``fedrec`` command line on ``args`` (default ``sys.argv[1:]``); the exit code."""
    import click

    from fedrec.shared.errors import FedrecError

    argv = list(args) if args is not None else sys.argv[1:]
    debug = os.environ.get(DEBUG_ENV) == "1" or "--debug" in argv[: _first_command(argv)]
    try:
        rv = app(args=argv, standalone_mode=False)
    except click.ClickException as exc:  # bad option or argument: click's own message
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
    except FedrecError as exc:
        if debug:
            raise
        _say(str(exc))
        return exc.exit_code
    except OSError as exc:
        if debug:
            raise
        if exc.filename:  # a file-system error on a path
            what = exc.strerror or type(exc).__name__
            _say(f"{what}: {exc.filename}. Check that the path exists and is yours to use.")
        else:  # a timeout, a connection: its own message says what happened
            _say(f"{type(exc).__name__}: {exc}")
        return 1
    except Exception as exc:
        if debug:
            raise
        _say(
            f"internal error ({type(exc).__name__}: {exc}). This is a bug in fedrec, not in "
            "your input; rerun with `fedrec --debug ...` for the traceback and report it."
        )
        return INTERNAL_ERROR
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def main() -> None:
    import warnings

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    sys.exit(run())


if __name__ == "__main__":
    main()
