"""The ``fedrec`` command line: one typer app; each module in :data:`COMMAND_MODULES` adds its
commands through a ``register(app)`` function. Heavy imports stay inside the commands so that
``fedrec --help`` is instant.
"""

from __future__ import annotations

import importlib

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
    "fedrec.serving.recommend",  # fedrec recommend
    "fedrec.deploy.cli",  # fedrec deploy certs|local|superlink|node
    "fedrec.audit.cli",  # fedrec audit
)


@app.callback()
def _root() -> None:
    """Federated, privacy-preserving, cross-platform recommender."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


# Known, understood library warnings that would bury the command's own output (the command
# line only; libraries and apps keep every warning).
QUIET = (
    r"Secure RNG turned off",  # Opacus: OS-entropy-seeded noise (DPSession.noise_seed)
    r"Full backward hook is firing",  # Opacus ghost clipping's second backward pass
    r"Optimal order is the largest alpha",  # RDP: ε is still a valid (looser) upper bound
)


def main() -> None:
    import warnings

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    app()


if __name__ == "__main__":
    main()
