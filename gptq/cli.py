"""What the commands (quantize, eval, generate, inspect, assets) share: how warnings print.

Imports nothing heavy, so a command installs it before torch or transformers are loaded.
"""

from __future__ import annotations

import sys
import warnings


def plain_warnings() -> None:
    """Python warnings (ours and the libraries') print as one plain "warning: ..." line on stderr,
    each text once, without the "file.py:303: UserWarning" and source lines Python adds. Every
    command's main installs it."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show
