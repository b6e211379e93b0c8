"""The ``fedrec`` command line: one typer app; each module under ``simulations/`` adds its
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
    "simulations.world",  # fedrec world
    "simulations.encode",  # fedrec encode
    "simulations.simulate",  # fedrec simulate
    "simulations.recommend",  # fedrec recommend
    "simulations.audit.cli",  # fedrec audit
)

@app.callback()
def _root() -> None:
    """Federated, privacy-preserving, cross-platform recommender."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
