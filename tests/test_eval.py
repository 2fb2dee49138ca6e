"""gptq.eval against a reference: KL divergence, top-1 agreement, Δ perplexity and their
uncertainties; the reference cache; the vocabulary check; GGUF files read back."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import BPE_VOCAB as VOCAB
from conftest import SAMPLE_TEXT, tiny_config

from gptq import QuantConfig, quantize_model, save_checkpoint
from gptq.eval import eval_windows, main, perplexity, score
from gptq.evaluate.score import compare, reference_logprobs, summarize, token_nll
from gptq.pipeline.run import round_to_nearest_model


def tiny(tmp_path, bpe_dir, name="tiny", family="llama", vocab=VOCAB, seed=0):
    """A tiny random model of ``family`` with the BPE tokenizer, saved; returns (model, dir)."""
    import shutil

    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.vocab_size = vocab
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path / name
    model.save_pretrained(d)
    for f in bpe_dir.iterdir():
        shutil.copy(f, d / f.name)
    return model, d


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "eval.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def eval_json(capsys, *args) -> dict:
    assert main([str(a) for a in args] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def gptq_checkpoint(tmp_path, model, d, bits=4):
    m = copy.deepcopy(model)
    cfg = QuantConfig(bits=bits, group_size=32)
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(m, ids, cfg, device="cpu", progress=False)
    return save_checkpoint(tmp_path / "ckpt", m, packed, cfg, source_dir=d)


def test_a_model_against_itself_scores_zero_and_a_checkpoint_is_deterministic(tmp_path, bpe_dir, text, capsys):
    model, d = tiny(tmp_path, bpe_dir)
    common = ["--dataset", text, "--seqlen", 64, "--max-windows", 4, "--device", "cpu"]
    r = eval_json(capsys, d, "--reference", d, *common)
    assert r["windows"] == 4 and r["tokens"] == 4 * 63
    for k in ("kld_mean", "kld_median", "kld_p90", "kld_p99", "kld_p99_9", "kld_max", "delta_perplexity"):
        assert r[k] == 0.0, k
    assert r["top1_agreement"] == 1.0 and r["perplexity"] == r["reference_perplexity"]
    for k in ("perplexity", "perplexity_stderr", "kld_mean", "kld_mean_stderr", "kld_median", "kld_median_stderr",
              "kld_p99", "kld_p99_stderr", "top1_agreement", "top1_agreement_stderr", "delta_perplexity_stderr",
              "reference_perplexity_stderr", "kld_p90_stderr", "kld_p99_9_stderr", "perplexity_stderr_windows"):
        assert k in r, k
    # the GPTQ checkpoint against its source: the same figures on every run
    ck = gptq_checkpoint(tmp_path, model, d)
    a = eval_json(capsys, ck, "--reference", d, *common)
    b = eval_json(capsys, ck, "--reference", d, *common)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert a["kld_mean"] > 0 and a["kld_mean_stderr"] > 0 and 0 < a["top1_agreement"] <= 1
    assert a["kld_median"] <= a["kld_p90"] <= a["kld_p99"] <= a["kld_p99_9"] <= a["kld_max"]
    # the perplexity is the one `perplexity` gives (float64 sums of the same float32 NLLs)
    from transformers import AutoTokenizer

    windows = eval_windows(AutoTokenizer.from_pretrained(d), str(text), 64, 4)
    assert a["reference_perplexity"] == pytest.approx(perplexity(model, windows), rel=1e-5)
    # the human-readable form puts the uncertainty beside every figure
    assert main([str(ck), "--reference", str(d), *map(str, common)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and out.count("±") >= 8 and "top-1 agreement" in out
    assert main([str(ck), *map(str, common[:-4]), "--max-windows", "all"]) == 0
    assert "±" in capsys.readouterr().out


def test_kl_on_a_two_window_toy_matches_a_hand_computation():
    """Vocabulary of 3, two windows of 3 tokens (2 scored positions each): KL(P || Q) = Σ p log(p/q)
    in float64 from the logits, top-1 agreement, both perplexities, their Δ; the float16 stored
    form changes KL by far less than its own size."""
    ref = [torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]]),
           torch.tensor([[-1.0, 3.0, 0.0], [1.0, 1.0, -2.0], [0.0, 0.0, 0.0]])]
    quant = [torch.tensor([[1.5, 1.0, -0.5], [0.4, 0.2, 0.0], [0.0, 0.0, 0.0]]),
             torch.tensor([[0.5, 2.5, 0.0], [1.2, 0.8, -1.0], [0.0, 0.0, 0.0]])]
    tokens = [torch.tensor([0, 1, 2]), torch.tensor([1, 0, 0])]
    hand_kl, hand_top1, nll_q, nll_r = [], [], [], []
    for r, q, t in zip(ref, quant, tokens):
        for pos in range(2):
            p = torch.softmax(r[pos].double(), 0)
            qq = torch.softmax(q[pos].double(), 0)
            hand_kl.append(sum(float(p[v]) * math.log(float(p[v]) / float(qq[v])) for v in range(3)))
            hand_top1.append(float(int(r[pos].argmax()) == int(q[pos].argmax())))
            nll_q.append(-math.log(float(qq[int(t[pos + 1])])))
            nll_r.append(-math.log(float(p[int(t[pos + 1])])))
    from gptq.evaluate.score import Scores

    s = Scores.empty()
    for r, q, t in zip(ref, quant, tokens):
        kld, top1 = compare(reference_logprobs(r), q)
        s.kld.append(kld), s.top1.append(top1), s.nll.append(token_nll(q, t)), s.ref_nll.append(token_nll(r, t))
    got = summarize(s)
    assert torch.cat(s.kld).tolist() == pytest.approx(hand_kl, rel=2e-3, abs=1e-5)
    assert got["kld_mean"] == pytest.approx(np.mean(hand_kl), rel=2e-3)
    assert got["kld_median"] == pytest.approx(np.median(hand_kl), rel=2e-3)
    assert got["kld_mean_stderr"] == pytest.approx(np.std(hand_kl, ddof=1) / 2, rel=5e-3)
    assert got["top1_agreement"] == np.mean(hand_top1) == 0.75
    assert got["perplexity"] == pytest.approx(math.exp(np.mean(nll_q)), rel=1e-6)
    assert got["reference_perplexity"] == pytest.approx(math.exp(np.mean(nll_r)), rel=1e-6)
    assert got["delta_perplexity"] == pytest.approx(math.exp(np.mean(nll_q)) - math.exp(np.mean(nll_r)), rel=1e-5)
    se = math.exp(np.mean(nll_q)) * np.std(nll_q, ddof=1) / 2  # the delta method
    assert got["perplexity_stderr"] == pytest.approx(se, rel=1e-5)
    assert got["kld_median_stderr"] is not None and got["kld_median_stderr"] >= 0  # bootstrap over the 2 windows
    again = summarize(s)
    assert again == got  # the bootstrap's seed is fixed


def test_the_reference_cache_gives_the_same_figures_and_spares_the_source(tmp_path, bpe_dir, text, capsys,
                                                                           monkeypatch):
    from safetensors import safe_open

    model, d = tiny(tmp_path, bpe_dir)
    ck = gptq_checkpoint(tmp_path, model, d)
    cache = tmp_path / "cache"
    common = ["--dataset", text, "--seqlen", 64, "--max-windows", 3, "--device", "cpu"]
    direct = eval_json(capsys, ck, "--reference", d, *common)
    filled = eval_json(capsys, ck, "--reference", d, "--reference-cache", cache, *common)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3 and (cache / "meta.json").is_file() and (cache / "tokenizer").is_dir()
    with safe_open(files[0], "pt") as f:
        assert f.get_slice("logprobs").get_dtype() == "F16" and f.get_slice("logprobs").get_shape() == [63, VOCAB]
    # from the cache alone: the source model is never loaded
    import gptq.runtime.load as load_mod

    real = load_mod.load_any
    monkeypatch.setattr(load_mod, "load_any", lambda p, **kw: (_ for _ in ()).throw(AssertionError(p))
                        if str(p) == str(d) else real(p, **kw))
    cached = eval_json(capsys, ck, "--reference-cache", cache, *common)
    for r in (filled, cached):
        assert {k: v for k, v in r.items() if k not in ("seconds", "reference")} == \
               {k: v for k, v in direct.items() if k not in ("seconds", "reference")}
    # a window the cache lacks, without the source: one clear error
    assert main([str(ck), "--reference-cache", str(cache), *map(str, common[:-4]), "--max-windows", "5"]) == 2
    assert "lacks 2 of these 5 windows" in capsys.readouterr().err
    # another source model: refused, not mixed in
    _, other = tiny(tmp_path, bpe_dir, "other", seed=1)
    other_cfg = json.loads((other / "config.json").read_text())
    other_cfg["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(other_cfg))
    assert main([str(ck), "--reference", str(other), "--reference-cache", str(cache), *map(str, common)]) == 2
    assert "another reference" in capsys.readouterr().err


def test_a_reference_with_another_vocabulary_or_tokenizer_is_refused_before_loading(tmp_path, bpe_dir, text,
                                                                                   capsys, monkeypatch, tiny_model_dir):
    import gptq.runtime.load as load_mod

    monkeypatch.setattr(load_mod, "load_any", lambda *a, **k: pytest.fail("a model was loaded"))
    _, d = tiny(tmp_path, bpe_dir)
    small = tiny_model_dir("llama")  # 256 tokens
    capsys.readouterr()
    assert main([str(small), "--reference", str(d), "--dataset", str(text), "--seqlen", "64"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 256 tokens" in err and f"{VOCAB}" in err and err.count("\n") == 1
    # the same size, another tokenizer: two tokens swapped
    _, swapped = tiny(tmp_path, bpe_dir, "swapped")
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    capsys.readouterr()
    assert main([str(swapped), "--reference", str(d), "--dataset", str(text), "--seqlen", "64"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers: 2 of 320 token ids differ" in err
    with pytest.raises(SystemExit):
        main([str(d), "--max-windows", "some"])


def test_paired_scores_give_the_exact_differences_with_smaller_errors(tmp_path, bpe_dir, text, capsys):
    """--save-scores then --paired: the differences are those of the two runs' own figures, their
    errors are the paired per-token ones (by hand from the saved files) and smaller than the two
    figures' own errors combined; a file against itself differs by exactly 0; other windows, a file
    that is not a scores file and an unwritable path are refused before any model is loaded."""
    from gptq.evaluate.score import load_scores

    model, d = tiny(tmp_path, bpe_dir)
    ck4 = gptq_checkpoint(tmp_path / "q4", model, d, bits=4)
    ck3 = gptq_checkpoint(tmp_path / "q3", model, d, bits=3)
    common = ["--reference", d, "--dataset", text, "--seqlen", 64, "--max-windows", 4, "--device", "cpu"]
    sa, sb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a = eval_json(capsys, ck4, *common, "--save-scores", sa)
    b = eval_json(capsys, ck3, *common, "--save-scores", sb, "--paired", sa)
    p = b["paired"]
    assert p["tokens"] == 4 * 63
    assert p["delta_kld_mean"] == pytest.approx(b["kld_mean"] - a["kld_mean"], rel=1e-9, abs=1e-12)
    assert p["delta_top1_agreement"] == pytest.approx(b["top1_agreement"] - a["top1_agreement"], abs=1e-12)
    assert p["delta_nll_mean"] == pytest.approx(math.log(b["perplexity"]) - math.log(a["perplexity"]), rel=1e-9)
    (la, _), (lb, meta) = load_scores(sa), load_scores(sb)
    diff = (torch.stack(lb.kld) - torch.stack(la.kld)).double().numpy().ravel()
    assert p["delta_kld_mean_stderr"] == pytest.approx(diff.std(ddof=1) / math.sqrt(diff.size), rel=1e-9)
    assert p["delta_kld_mean_stderr"] < math.hypot(a["kld_mean_stderr"], b["kld_mean_stderr"])
    assert p["delta_kld_mean_stderr_windows"] > 0 and meta["model"] == str(ck3)
    assert torch.stack(la.top1).dtype == torch.bool
    assert torch.stack(la.top1).double().mean().item() == pytest.approx(a["top1_agreement"], abs=1e-12)
    same = eval_json(capsys, ck4, *common, "--paired", sa)["paired"]
    assert same["delta_kld_mean"] == same["delta_nll_mean"] == same["delta_top1_agreement"] == 0.0
    # refused, one line each, before any model is loaded
    for extra, words in ((["--paired", sa, "--max-windows", 3], "other windows"),
                         (["--paired", text], "not a scores file"),
                         (["--save-scores", tmp_path / "nowhere" / "s.safetensors"], "does not exist")):
        args = [str(x) for x in [ck4, *common, *extra]]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_round_to_nearest_has_a_higher_mean_kld_than_gptq(tmp_path, bpe_dir):
    """On a tiny random model at 4 bits g32 (the gap is ~20 standard errors); the real model in
    the slow tier below."""
    ref, _ = tiny(tmp_path, bpe_dir)
    g = torch.Generator().manual_seed(0)
    calib, windows = torch.randint(0, VOCAB, (16, 64), generator=g), torch.randint(0, VOCAB, (8, 64), generator=g)
    cfg = QuantConfig(bits=4, group_size=32)
    q = copy.deepcopy(ref)
    quantize_model(q, calib, cfg, device="cpu", progress=False)
    rtn = round_to_nearest_model(copy.deepcopy(ref), cfg)
    a, b = summarize(score(q, windows, ref)), summarize(score(rtn, windows, ref))
    assert b["kld_mean"] - a["kld_mean"] > 5 * math.hypot(a["kld_mean_stderr"], b["kld_mean_stderr"])


class Remembered(dict):
    """``score``'s reference cache, in memory."""

    def get(self, tokens):
        return super().get(tuple(tokens.tolist()))

    def put(self, tokens, logprobs, nll):
        self[tuple(tokens.tolist())] = (logprobs, nll)


@pytest.mark.slow
def test_round_to_nearest_has_a_higher_mean_kld_than_gptq_on_smollm2(smollm2_setup, smollm2_4bit):
    """4 bits g64, 16 x 256 calibration windows, 4 x 512 evaluation windows (the real-model tests'
    shared setup and solve)."""
    ref, _, _, windows = smollm2_setup
    q, cfg = smollm2_4bit[0], smollm2_4bit[3]
    cache = Remembered()  # the reference runs once for both models
    a = summarize(score(q, windows, ref, cache))
    b = summarize(score(round_to_nearest_model(copy.deepcopy(ref), cfg), windows, cache=cache))
    assert len(cache) == len(windows)
    assert b["kld_mean"] - a["kld_mean"] > 3 * math.hypot(a["kld_mean_stderr"], b["kld_mean_stderr"])
    assert a["top1_agreement"] > b["top1_agreement"]


def write_tiny_gguf(tmp_path, model, d, ftype="q4_0"):
    """Quantize ``model`` in place to a GGUF type, write the .gguf; the model then holds the solved
    weights (our dequantized model)."""
    from gptq.formats.gguf.writer import write_gguf

    cfg = QuantConfig(format=f"gguf:{ftype}")
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(model, ids, cfg, device="cpu", progress=False)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfg, source_dir=d)
    out = tmp_path / f"m-{ftype}.gguf"
    write_gguf(stage, out, ftype, d)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_our_gguf_reads_back_with_the_perplexity_of_our_dequantized_model(tmp_path, bpe_dir, text, capsys,
                                                                          monkeypatch, family):
    from gptq.runtime.load import load_any

    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the test tokenizer is none llama.cpp knows
    model, d = tiny(tmp_path, bpe_dir, family=family)
    source = copy.deepcopy(model)
    gguf = write_tiny_gguf(tmp_path, model, d)
    r = eval_json(capsys, gguf, "--dataset", text, "--seqlen", 64, "--max-windows", 4)
    _, tok = load_any(gguf, device="cpu")
    windows = eval_windows(tok, str(text), 64, 4)
    # only the embeddings / head differ (Q8_0 / Q4_0 in the file, float in our model)
    assert r["perplexity"] == pytest.approx(perplexity(model, windows), rel=0.01)
    assert r["perplexity_stderr"] > 0
    # against its source, through a directory holding the one .gguf
    solo = tmp_path / "solo"
    solo.mkdir()
    gguf.rename(solo / gguf.name)
    k = eval_json(capsys, solo, "--reference", d, "--dataset", text, "--seqlen", 64, "--max-windows", 4)
    assert k["kld_mean"] > 0 and k["top1_agreement"] > 0.5
    assert k["reference_perplexity"] == pytest.approx(perplexity(source, windows), rel=1e-5)
    from gptq.generate import main as generate

    assert generate([str(solo / gguf.name), "--prompt", "The quick", "--max-new-tokens", "3"]) == 0
    assert "Time for inference" in capsys.readouterr().out


def _gguf(path, arch, tensors, **fields):
    import gguf as gg

    w = gg.GGUFWriter(str(path), arch)
    for k, v in fields.items():
        w.add_uint32(f"{arch}.{k}", v)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_architectures_and_types_it_cannot_read_are_refused_from_the_header(tmp_path, capsys):
    import gguf as gg

    f32 = (np.zeros((4, 32), np.float32), None)
    cases = [
        (_gguf(tmp_path / "phi2.gguf", "phi2", {"a.weight": f32}), "architecture 'phi2' cannot be read"),
        (_gguf(tmp_path / "neox.gguf", "gptneox", {"a.weight": f32}), "architecture 'gptneox'"),
        (_gguf(tmp_path / "moe.gguf", "llama", {"a.weight": f32}, expert_count=4), "merged experts"),
        (_gguf(tmp_path / "q81.gguf", "llama", {"a.weight": (np.zeros((4, 40), np.uint8),
                                                             gg.GGMLQuantizationType.Q8_1)}),
         "tensor type(s) Q8_1 cannot be dequantized"),
    ]
    for path, msg in cases:
        assert main([str(path), "--dataset", "wikitext2"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main([str(tmp_path / "absent.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
