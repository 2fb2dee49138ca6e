"""The walkthrough notebook runs headless (quick mode) so it cannot rot."""

import pytest

from benchmarks.notebook import notebook

pytestmark = pytest.mark.slow


def test_walkthrough_executes(smollm2_dir, wikitext):  # the notebook reads ../shared's WikiText-2 when present
    pytest.importorskip("nbclient")
    nb = notebook(quick=True)  # executed in memory; the committed copy keeps the full run
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "quick=True" in text
    assert "quantized 14 linears" in text  # quick mode keeps 2 blocks × 7 linears
    assert text.count("-bit g64:  RTN") == 4
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images == 4  # loss per layer, ppl vs bits, ppl vs group size, size on disk
