"""The ``edgec`` command line.

Each sub-command lives in its own module under :mod:`edgec.commands` and defines a click
command named ``command``; they are discovered here and imported only when used, so
``edgec --help`` stays fast and a new command needs no edit of this file.

User mistakes raise :class:`~edgec.errors.EdgecError`; :func:`main` prints them as one line
(``error: ...`` then ``hint: ...``) and exits non-zero, without a traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from edgec import __version__
from edgec.errors import EdgecError

EPILOG = """\b
Examples:
  edgec models
  edgec export mobilenet_v2 -o mnv2.onnx
  edgec inspect mnv2.onnx
  edgec optimize mnv2.onnx -o mnv2.opt.onnx --passes dce,remove-identity,constant-fold
  edgec passes
"""


class LazyGroup(click.Group):
    """A click group whose commands are the modules of :mod:`edgec.commands`."""

    def _modules(self) -> dict[str, str]:
        import edgec.commands as pkg

        found = {}
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                found[info.name.replace("_", "-")] = f"edgec.commands.{info.name}"
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._modules()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        module = self._modules().get(name)
        if module is None:
            return None
        return importlib.import_module(module).command


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgec")
def cli() -> None:
    """edgec: export PyTorch models to ONNX, optimize them, compile them with Apache TVM for
    edge targets and measure their latency on the device."""


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="edgec", standalone_mode=False)
    except EdgecError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
