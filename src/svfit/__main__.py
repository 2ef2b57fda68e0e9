"""`python -m svfit ...` and the `svfit` command, which is also what `accelerate launch -m svfit train ...` and
`torchrun -m svfit` run. Without the CLI's extras it prints one line naming them instead of a traceback."""

import sys


def main():
    from ._extras import MissingExtraError

    try:
        from .cli import main as cli_main
    except MissingExtraError as exc:
        sys.exit(f"error: {exc}")
    cli_main()


if __name__ == "__main__":
    main()
