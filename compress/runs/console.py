"""The console: logging set-up, the rich console, and the one-line error exit."""
from __future__ import annotations

import logging
import os
import sys

import click

# set by the CLI's --verbose: a failure prints its traceback after the one line
_STATE = {"verbose": 0}


def _setup_logging(verbose: int, quiet: bool) -> None:
    from rich.logging import RichHandler

    _STATE["verbose"] = verbose

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = RichHandler(show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("compress").setLevel(level)
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "httpx", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # read by transformers and huggingface_hub when they are imported (later, by the command that needs them), so
    # that setting up the console imports neither
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    if "transformers" in sys.modules:  # already imported (e.g. by a caller of the Python API)
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


def _console():
    import shutil

    from rich.console import Console

    width = shutil.get_terminal_size((140, 40)).columns if sys.stdout.isatty() else 140
    return Console(stderr=False, width=width)


def _fail(e: BaseException | str, code: int = 2) -> None:
    """One line on stderr naming what is wrong, then exit `code` (2: bad input, 1: an internal error, 130: Ctrl-C);
    with --verbose the traceback of the exception being handled follows the line."""
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    click.echo(text if text.startswith(("error:", "interrupted")) else f"error: {text}", err=True)
    if _STATE["verbose"]:
        import traceback

        exc = e if isinstance(e, BaseException) else sys.exc_info()[1]
        if exc is not None:
            click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(), err=True)
    sys.exit(code)
