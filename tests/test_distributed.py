"""Several ranks (torchrun, gloo on CPU): the same bytes as one process, whatever the number of
ranks; a killed rank stops the others with a message; --resume continues with any number of ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_module
from faults import KILL, RANK
from test_stream import calib_text, sharded_tiny

from gptq.core.config import ConfigError
from gptq.core.hessian import HessianAccumulator
from gptq.pipeline.distributed import World, my_batches, owners, rounds, solve_cost

ONE_THREAD = {"OMP_NUM_THREADS": "1", "GPTQ_DIST_TIMEOUT": "60"}  # the same threads per process in every run


def test_owners_balance_a_skewed_set_of_layers():
    """Longest first onto the least loaded rank: within 4/3 of the best split (LPT's bound), here
    the best itself, and the same answer on every rank (deterministic)."""
    costs = [solve_cost(r, c) for r, c in [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 14336), (14336, 4096),
                                           (4096, 4096), (512, 512), (512, 512)]]
    for size in (2, 3, 4):
        own = owners(costs, size)
        load = [sum(c for c, o in zip(costs, own) if o == r) for r in range(size)]
        assert max(load) <= 4 / 3 * max(max(costs), sum(costs) / size)
        assert own == owners(costs, size)
    own = owners([8.0, 7.0, 6.0, 5.0, 4.0], 2)  # 8+5+4 = 17 against 7+6 = 13: longest-first's answer
    assert own == [0, 1, 1, 0, 0]
    assert owners([1.0, 2.0], 1) == [0, 0]


def test_batches_are_dealt_round_robin():
    assert my_batches(7, World(0, 3)) == [0, 3, 6] and my_batches(7, World(2, 3)) == [2, 5]
    assert rounds(7, World(1, 3)) == 3 and my_batches(4, World(0, 1)) == [0, 1, 2, 3]
    assert my_batches(3, World(2, 3)) == [2]  # as many batches as ranks: one each


@pytest.mark.parametrize("rank", [0, 2, 3])  # ranks with a batch refuse too: all stop together, none waits
def test_fewer_batches_than_ranks_is_refused_on_every_rank_with_the_fix(rank):
    with pytest.raises(ConfigError) as e:
        my_batches(3, World(rank, 4, True))
    msg = str(e.value)
    assert "3 batch(es)" in msg and "4 ranks" in msg
    assert "--nsamples" in msg and "--batch-size" in msg and "at most 3 rank(s)" in msg


def test_partials_added_in_batch_order_are_the_local_sum_bit_for_bit():
    """One process adds each batch's XᵀX to the sum; ranks compute the same partials (staged) and
    the owner adds them in batch order: the same H, exactly."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(37, 300, generator=g) * (k + 1) for k in range(5)]
    local = HessianAccumulator(300)
    for x in batches:
        local.add(x)
    owner = HessianAccumulator(300)
    for x in batches:  # each partial as another rank would compute it
        rank = HessianAccumulator(300, staged=True)
        rank.add(x)
        owner.add_partial(*rank.take_staged())
    assert rank.take_staged() == (None, 0)
    assert torch.equal(local.hessian(), owner.hessian())


def torchrun(n: int, *args, env=None):
    """``torchrun --standalone`` (a free port of its own) with n ranks of ``python -m gptq.quantize``
    (of tests/faults.py where ``env`` injects a fault)."""
    entry = [str(ROOT / "tests" / "faults.py")] if env and KILL in env else ["-m", "gptq.quantize"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           *entry, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **ONE_THREAD, **(env or {})})


def single(*args):
    """One process with one thread, as each rank has: the command in this process (``run_module``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_module("gptq.quantize", args)
    finally:
        torch.set_num_threads(threads)


def same_checkpoint(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "quantize_report.json":  # holds timings
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture
def calib(tmp_path, tiny_tokenizer_dir):
    return sharded_tiny(tmp_path, tiny_tokenizer_dir), calib_text(tmp_path)


def args(model, text, out, *extra):
    return [model, "--dataset", text, "--nsamples", "7", "--seqlen", "32", "--group-size", "32", "--batch-size", "2",
            "--out", out, "--quiet", *extra]


def test_two_and_three_ranks_write_the_bytes_one_process_writes(tmp_path, calib):
    """7 windows in batches of 2 (the last one short): 4 batches dealt to 1, 2 and 3 ranks (one
    rank idle in the last round); every tensor, config and index equal to one process's."""
    model, text = calib
    r = single(*args(model, text, tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    for n in (1, 2, 3):  # 1: one rank forced through every collective (GPTQ_DISTRIBUTED=1)
        r = torchrun(n, *args(model, text, tmp_path / f"n{n}"), env={"GPTQ_DISTRIBUTED": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        same_checkpoint(tmp_path / "one", tmp_path / f"n{n}")
        assert not (tmp_path / f"n{n}.partial").exists()


def test_a_killed_rank_stops_the_others_and_resume_is_identical(tmp_path, calib):
    """Rank 1 is SIGKILLed right after block 0 is saved: rank 0 stops with a message (not a hang),
    the progress stays; resuming with 2 ranks, or with 1 process, writes the same bytes."""
    model, text = calib
    r = single(*args(model, text, tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    killed = torchrun(2, *args(model, text, tmp_path / "k"), env={KILL: "0",
                                                                   RANK: "1"})
    assert killed.returncode != 0
    # whoever notices first: rank 0 loses contact in a collective, or torchrun's launcher stops it
    # with SIGTERM; either way it says how to resume
    assert "lost contact with another rank" in killed.stderr or "stopped by torchrun" in killed.stderr
    assert "rerun the same command with --resume" in killed.stderr
    assert (tmp_path / "k.partial" / "progress.json").is_file() and not (tmp_path / "k").exists()
    for n, out in ((2, "k"), (1, "k1")):
        if n == 1:  # a second killed run, resumed by a single process
            killed = torchrun(2, *args(model, text, tmp_path / out), env={KILL: "1",
                                                                           RANK: "0"})
            assert killed.returncode != 0 and (tmp_path / f"{out}.partial" / "progress.json").is_file()
            r = single(*args(model, text, tmp_path / out, "--resume"))
        else:
            r = torchrun(2, *args(model, text, tmp_path / out, "--resume"))
        assert r.returncode == 0, r.stderr[-3000:]
        same_checkpoint(tmp_path / "one", tmp_path / out)


def test_a_rank_stopped_by_sigterm_says_how_to_resume_and_resume_is_identical(tmp_path, calib):
    """SIGTERM reaches rank 0 right after block 0 is saved, as torchrun's launcher sends it to the
    survivors when another rank fails (or a job scheduler to all): it says that progress is kept
    and how to resume, exits non-zero, and resuming writes the bytes one process writes."""
    model, text = calib
    r = single(*args(model, text, tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    stopped = torchrun(2, *args(model, text, tmp_path / "t"), env={KILL: "term:0", RANK: "0"})
    assert stopped.returncode != 0
    assert "stopped by torchrun (SIGTERM)" in stopped.stderr, stopped.stderr[-3000:]
    assert "Progress is kept in t.partial: rerun the same command with --resume" in stopped.stderr
    r = torchrun(2, *args(model, text, tmp_path / "t", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "t")


def test_no_stream_under_torchrun_is_refused(tmp_path, calib):
    model, text = calib
    r = torchrun(2, *args(model, text, tmp_path / "o", "--no-stream"))
    assert r.returncode != 0 and "drop --no-stream" in r.stderr


def test_grids_with_a_state_across_rows_are_solved_by_an_owner(tmp_path, calib):
    """bitsandbytes double quantization keeps per-matrix state (absmax blocks across rows): such
    solves are not split by rows but done whole by an owner rank and broadcast; same bytes."""
    model, text = calib
    fmt = ["--format", "bnb-nf4", "--double-quant", "--group-size", "64"]
    r = single(*args(model, text, tmp_path / "one", *fmt))
    assert r.returncode == 0, r.stderr
    r = torchrun(2, *args(model, text, tmp_path / "two", *fmt))
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_moe_models_under_torchrun_write_the_same_bytes(tmp_path, tiny_tokenizer_dir):
    """A Mixtral (8 experts): attention and Hessians shared out as for dense models; the experts'
    recorded inputs are gathered in batch order and every rank solves them as one process does."""
    from test_moe import moe_dir

    d, text = moe_dir(tmp_path, tiny_tokenizer_dir, layers=2)
    r = single(*args(d, text, tmp_path / "one", "--expert-tokens", "routed", "--expert-min-tokens", "4"))
    assert r.returncode == 0, r.stderr
    for out, extra in (("two", []), ("spilled", ["--max-memory", "0"])):  # each rank spills to its own folder
        r = torchrun(2, *args(d, text, tmp_path / out, "--expert-tokens", "routed", "--expert-min-tokens", "4", *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        same_checkpoint(tmp_path / "one", tmp_path / out)


def test_a_moe_size_budget_under_torchrun_is_one_process_plan_and_bytes(tmp_path, tiny_tokenizer_dir):
    """--bits-per-weight on a Mixtral under torchrun: the experts' routing is gathered in batch order for
    the measuring pass as for the solve, so the plan (its estimated errors to the bit) and the bytes are
    one process's."""
    from test_moe import moe_dir

    d, text = moe_dir(tmp_path, tiny_tokenizer_dir, layers=2)
    budget = ["--candidates", "2g32,4g32,8g32", "--bits-per-weight", "4.5", "--expert-tokens", "routed",
              "--expert-min-tokens", "4"]
    r = single(*args(d, text, tmp_path / "one", *budget))
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "one" / "quantize_report.json").read_text())["mix"]
    assert len({u["choice"] for u in plan["units"]}) > 1
    r = torchrun(2, *args(d, text, tmp_path / "two", *budget))
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "quantize_report.json").read_text())["mix"] == plan


def test_fp_target_under_torchrun_writes_the_bytes_one_process_writes(tmp_path, calib):
    """The cross terms are exchanged like the Hessians (partials added in batch order)."""
    model, text = calib
    r = single(*args(model, text, tmp_path / "one", "--fp-target", "0.25"))
    assert r.returncode == 0, r.stderr
    r = torchrun(2, *args(model, text, tmp_path / "n2", "--fp-target", "0.25"), env={"GPTQ_DISTRIBUTED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "n2")


def test_a_learned_rotation_under_torchrun_is_one_process_rotation_and_bytes(tmp_path, calib):
    """--rotate learned: the statistics pass shared out like the main one (partials added in batch order),
    the terms dealt to the ranks, each computing its own gradients (summed by all_reduce); the checkpoint is
    the one one process writes. The two ranks also spill (--max-memory 0: activations and inverse
    Hessians on disk), which changes nothing either."""
    model, text = calib
    flags = ("--rotate", "learned", "--rotate-steps", "5", "--bits", "3")
    r = single(*args(model, text, tmp_path / "one", *flags))
    assert r.returncode == 0, r.stderr
    r = torchrun(2, *args(model, text, tmp_path / "n2", *flags, "--max-memory", "0"), env={"GPTQ_DISTRIBUTED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "n2")
    assert json.loads((tmp_path / "n2" / "config.json").read_text())["gptq_rotation"]["kind"] == "learned"


def test_a_rank_failing_while_learning_the_rotation_stops_the_others(tmp_path, calib):
    """An error on rank 1 in the middle of --rotate learned's steps (its 20th term evaluation): rank 1
    reports it, rank 0 stops with a message (not a wait for the collective's timeout) and nothing is
    written."""
    model, text = calib
    flags = ("--rotate", "learned", "--rotate-steps", "30", "--bits", "3")
    r = torchrun(2, *args(model, text, tmp_path / "n2", *flags), env={KILL: "learn:20", RANK: "1"})
    assert r.returncode != 0
    assert "error: injected: a learning term failed" in r.stderr
    assert "lost contact with another rank" in r.stderr or "stopped by torchrun" in r.stderr
    assert not (tmp_path / "n2").exists()


def test_a_size_budget_under_torchrun_is_one_process_plan_and_bytes_also_resumed(tmp_path, calib):
    """--bits-per-weight under torchrun: the measuring pass is shared out like the main one (5 windows:
    3 batches, rank 1 idle in the last round; the "/block" estimate also gathers per-batch sums), and
    the plan (its estimated errors to the bit) and the bytes are one process's; rank 1 killed after
    block 0, --resume reads the kept plan back on every rank and writes the same bytes."""
    model, text = calib
    budget = ["--nsamples", "5", "--candidates", "2g32,4g32,8g32", "--bits-per-weight", "4.5",
              "--sensitivity", "hessian/block"]
    r = single(*args(model, text, tmp_path / "one", *budget))
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "one" / "quantize_report.json").read_text())["mix"]
    assert len({u["choice"] for u in plan["units"]}) > 1  # a mix, not one grid everywhere
    r = torchrun(2, *args(model, text, tmp_path / "two", *budget))
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "quantize_report.json").read_text())["mix"] == plan
    killed = torchrun(2, *args(model, text, tmp_path / "k", *budget), env={KILL: "0", RANK: "1"})
    assert killed.returncode != 0 and (tmp_path / "k.partial" / "mix.json").is_file()
    r = torchrun(2, *args(model, text, tmp_path / "k", *budget, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_checkpoint(tmp_path / "one", tmp_path / "k")
    assert json.loads((tmp_path / "k" / "quantize_report.json").read_text())["mix"] == plan
