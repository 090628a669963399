"""The ``lrwatch`` command line. Formatting lives here; the logic lives in the modules it calls."""

from __future__ import annotations

import click

from ._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrwatch")
def cli() -> None:
    """lrwatch watches models while they train and serve, and acts when something goes wrong.

    \b
    Training:  add lrwatch.Watcher (or the Lightning / HF callback) to your loop.
    Serving:   run `lrwatch daemon` next to your model server.
    Try it:    `lrwatch demo` (add `--inject nan` to see a fault caught).
    """


def main() -> None:
    cli(prog_name="lrwatch")


if __name__ == "__main__":  # pragma: no cover
    main()
