"""``pure-lite demo``: serve one web page (Gradio) to restore a photo and see what the model did.

Only the ``demo`` command imports this module, and it imports Gradio only once it has made the
temporary folder that Gradio must use for uploads and served files (Gradio reads the folder's
name when it is imported): ``import pure_lite`` never imports Gradio, and nothing is left behind
when the server stops, on Ctrl-C or SIGTERM. The page itself is pure_lite.demo_page.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import MissingDependencyError

if TYPE_CHECKING:
    from .restorer import Restorer

INSTALL = 'pip install -e ".[demo]"'


def serve(load: Callable[[], Restorer], model: str | None, *, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False) -> None:
    """Load the model once (``load()``; ``model`` names it, None: the shipped PURE-tiny) and serve the page
    until interrupted. A missing Gradio is a MissingDependencyError before the model is loaded."""
    with tempfile.TemporaryDirectory(prefix="pure-lite-demo-") as root:
        os.environ["GRADIO_TEMP_DIR"] = root
        try:
            from .demo_page import launch
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in ("gradio", "gradio_client"):
                raise
            raise MissingDependencyError(f"pure-lite demo needs Gradio, which is not installed: {INSTALL}") from exc
        restorer = load()
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C, so that the folder is removed
        launch(restorer, model, Path(root), host=host, port=port, share=share)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
