"""``python -m gptq.quantize`` with a fault injected, for the tests (the library reads no test hook):

    GPTQ_TEST_KILL_AFTER_BLOCK=k      SIGKILL right after block k is saved
    GPTQ_TEST_KILL_AFTER_BLOCK=int:k  interrupt (as Ctrl-C) right after block k is saved
    GPTQ_TEST_KILL_AFTER_BLOCK=term:k SIGTERM to itself (as a launcher or scheduler sends) after block k
    GPTQ_TEST_KILL_AFTER_BLOCK=regroup  SIGKILL while the final shards are written
    GPTQ_TEST_KILL_AFTER_BLOCK=learn:n  raise an error in --rotate learned's n-th term evaluation
    GPTQ_TEST_KILL_RANK=r             under torchrun, only rank r obeys

    python tests/faults.py MODEL [quantize options]
"""

import functools
import os
import signal
import sys

from gptq import quantize

KILL = "GPTQ_TEST_KILL_AFTER_BLOCK"
RANK = "GPTQ_TEST_KILL_RANK"


def obeys(rank: int | str) -> bool:
    """Whether the fault applies on ``rank``: the one ``RANK`` names, or every rank without it."""
    return os.environ.get(RANK, str(rank)) == str(rank)


def on_event(event: str, rank: int) -> None:
    spec = os.environ.get(KILL, "")
    if not obeys(rank):
        return
    if event in (f"saved:{spec}", spec) and spec:  # "saved:k" for k, "regroup" for regroup
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.startswith("int:") and event == f"saved:{spec[4:]}":
        raise KeyboardInterrupt
    if spec.startswith("term:") and event == f"saved:{spec[5:]}":
        os.kill(os.getpid(), signal.SIGTERM)


def fail_learning(n: int) -> None:
    """The n-th evaluation of a learning term (``reader_error``) raises, as a failing disk read or a
    non-finite term would, on the ranks ``RANK`` names (all without it)."""
    import gptq.core.learned_rotation as learned

    error, calls = learned.reader_error, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= n:
            raise RuntimeError("injected: a learning term failed")
        return error(*args, **kwargs)

    learned.reader_error = failing


if __name__ == "__main__":
    quantize.quantize_streaming = functools.partial(quantize.quantize_streaming, on_event=on_event)
    spec = os.environ.get(KILL, "")
    if spec.startswith("learn:") and obeys(os.environ.get("RANK", "0")):
        fail_learning(int(spec[6:]))
    sys.exit(quantize.main(sys.argv[1:]))
