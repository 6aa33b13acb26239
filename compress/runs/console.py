"""The console: logging set-up, the rich console, and the one-line error exit."""
from __future__ import annotations

import logging
import os
import sys

import click


def _setup_logging(verbose: int, quiet: bool) -> None:
    from rich.logging import RichHandler

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


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)
