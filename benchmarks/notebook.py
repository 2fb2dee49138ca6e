"""Execute notebooks/walkthrough.ipynb in place (``quick=True``: in memory, the test's quick mode)."""

from __future__ import annotations

import os

from benchmarks.common import ROOT


def notebook(quick: bool = False):
    """Run the walkthrough with GPTQ_NOTEBOOK_QUICK set for its kernel; write it back unless ``quick``."""
    # imported here: nbformat and nbclient come with the optional `notebook` extra
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "walkthrough.ipynb"
    nb = nbformat.read(path, as_version=4)
    env_quick = os.environ.get("GPTQ_NOTEBOOK_QUICK")
    os.environ["GPTQ_NOTEBOOK_QUICK"] = "1" if quick else "0"
    try:
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_quick is None:
            os.environ.pop("GPTQ_NOTEBOOK_QUICK", None)
        else:
            os.environ["GPTQ_NOTEBOOK_QUICK"] = env_quick
    if not quick:
        nbformat.write(nb, path)
    return nb
