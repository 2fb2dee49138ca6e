"""llama.cpp runs our GGUF files (``make interop``; built by ``make interop-setup`` from the full
llama.cpp source in llama-cpp-python 0.3.36's sdist).

For each file type: SmolLM2 converted to f16 by llama.cpp's convert_hf_to_gguf.py, llama.cpp's own
quantization of it without and with an importance matrix (llama-imatrix on the same 32 x 512
WikiText-2 valid tokens we calibrate on), and ours; every file scored by llama-perplexity
(-c 2048 --chunks 8 on WikiText-2 test: llama.cpp's protocol, which scores the second half of
each window, so its numbers are not comparable with gptq.eval's).
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from test_interop import WIKI

pytestmark = [pytest.mark.interop, pytest.mark.slow]
SRC = ROOT / ".cache" / "llama.cpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BIN = SRC / "build" / "bin"


def tool(name):
    if not (BIN / name).is_file():
        pytest.skip(f"{BIN / name} is absent: run `make interop-setup` to build llama.cpp")
    return str(BIN / name)


def perplexity(path) -> float:
    r = subprocess.run([tool("llama-perplexity"), "-m", str(path), "-f", str(WIKI / "wiki.test.raw"), "-c", "2048",
                        "--chunks", "8", "-t", "2"], capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert r.returncode == 0 and m, (r.stdout + r.stderr)[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """f16 GGUF of SmolLM2 and its importance matrix, made by llama.cpp's own tools."""
    py = ROOT / ".venv-llamacpp" / "bin" / "python"
    if not py.is_file():
        pytest.skip(".venv-llamacpp is absent: run `make interop-setup`")
    if not (WIKI / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found in {WIKI}")
    d = tmp_path_factory.mktemp("llamacpp")
    f16 = d / "smollm2-f16.gguf"
    subprocess.run([str(py), "convert_hf_to_gguf.py", str(ROOT / ".cache" / "smollm2"), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, cwd=SRC, env={"PYTHONPATH": str(SRC / "gguf-py")},
                   capture_output=True)
    imatrix = d / "imatrix.gguf"
    subprocess.run([tool("llama-imatrix"), "-m", str(f16), "-f", str(WIKI / "valid.tokens.txt"), "-c", "512",
                    "--chunks", "32", "-t", "2", "-o", str(imatrix)], check=True, capture_output=True)
    return d, f16, imatrix


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m", "q3_k_m", "q2_k", "q3_k_s", "q3_k_l", "iq4_nl"])
def test_llama_cpp_runs_our_gguf_below_its_own_imatrix_quantization(reference, tmp_path, ftype):
    """Q4_0 over three calibration draws (GPTQ's rounding cascades: one draw moves the score by
    about 1 %): every one below llama.cpp's importance-matrix file, and their mean by more than 2 %."""
    d, f16, imatrix = reference
    theirs = {}
    for label, extra in (("plain", []), ("imatrix", ["--imatrix", str(imatrix)])):
        path = d / f"smollm2-{ftype}-{label}.gguf"
        subprocess.run([tool("llama-quantize"), *extra, str(f16), str(path), ftype.upper(), "2"], check=True,
                       capture_output=True)
        theirs[label] = (perplexity(path), path.stat().st_size)
    f16_ppl = perplexity(f16) if ftype == "q4_0" else None
    mine = []
    for seed in (0, 1, 2) if ftype == "q4_0" else (0,):
        out = tmp_path / f"ours-{seed}"
        subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                        str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--seed", str(seed),
                        "--format", f"gguf:{ftype}", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
        g = json.loads((out / "quantize_report.json").read_text())["gguf"]
        mine.append(perplexity(out / g["file"]))
        assert abs(g["bytes"] - theirs["imatrix"][1]) / theirs["imatrix"][1] < 0.01
    print(f"\n{ftype}: f16 {f16_ppl}; llama.cpp {theirs['plain'][0]:.4f} ({theirs['plain'][1]} B), with imatrix "
          f"{theirs['imatrix'][0]:.4f} ({theirs['imatrix'][1]} B); ours {[round(m, 4) for m in mine]} ({g['bytes']} B)")
    assert max(mine) < theirs["imatrix"][0]
    if ftype == "q4_0":
        assert sum(mine) / len(mine) < 0.98 * theirs["imatrix"][0]


def relabelled_smollm2(tmp_path, name: str, config_cls, fill=None, **overrides):
    """SmolLM2's weights under another family's config (``config_cls``, SmolLM2's sizes unless
    ``overrides``): parameters of the same name copied, then ``fill(model, smollm2_state)`` for the
    family's own ones; saved with SmolLM2's tokenizer as ``tmp_path / name``."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    src = ROOT / ".cache" / "smollm2"
    smol = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    c = smol.config
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
              rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=True,
              bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**(kw | overrides)), dtype=torch.bfloat16)
    sd = smol.state_dict()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key in sd and sd[key].shape == p.shape:
                p.copy_(sd[key])
        if fill is not None:
            fill(model, sd)
    d = tmp_path / name
    model.save_pretrained(d)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d


def our_gguf(d, tmp_path, ftype: str = "q8_0"):
    """Our GGUF file of the model directory ``d`` (8 x 512 WikiText-2 valid calibration tokens)."""
    out = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(WIKI / "valid.tokens.txt"),
                    "--nsamples", "8", "--seqlen", "512", "--format", f"gguf:{ftype}", "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT)
    return next(out.glob("*.gguf"))


def assert_scores_like_smollm2(ours, f16, label: str):
    """A file of SmolLM2's function in another family's form must score what llama.cpp's own F16
    file of SmolLM2 scores, within 1 %: a wrong row order, a lost tensor or a wrong graph would not."""
    mine, ref = perplexity(ours), perplexity(f16)
    print(f"\nSmolLM2 as {label}: llama.cpp's F16 (llama) {ref:.4f}, our Q8_0 {mine:.4f}")
    assert abs(mine - ref) / ref < 0.01


def test_llama_cpp_runs_our_qwen2_gguf_as_the_model_it_is(reference, tmp_path):
    """SmolLM2 re-labelled as Qwen2 (zero q/k/v biases: the same function), written with the qwen2
    architecture (no rotary permutation, the biases in F32)."""
    from transformers import Qwen2Config

    def zero_biases(model, sd):
        for key, p in model.named_parameters():
            if key.endswith("bias"):
                p.zero_()

    d = relabelled_smollm2(tmp_path, "smol-qwen2", Qwen2Config, zero_biases, use_sliding_window=False)
    assert_scores_like_smollm2(our_gguf(d, tmp_path), reference[1], "Qwen2")


@pytest.mark.parametrize("family", ["qwen3", "phi", "gpt2", "gpt_neox"])
def test_llama_cpp_runs_our_gguf_of_families_smollm2_cannot_become(reference, tmp_path, family):
    """Qwen3 (per-head q/k norms), Phi-2 (LayerNorms, biases, partial rotary, a parallel block),
    GPT-2 (Conv1D linears, learned positions) and GPT-NeoX (fused q/k/v reordered) of SmolLM2's
    widths, partly random: llama.cpp loads and runs our files."""
    from transformers import GPT2Config, GPTNeoXConfig, PhiConfig, Qwen3Config

    def random_norms(model, sd):
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.normal_(1.0, 0.2)

    if family == "qwen3":
        d = relabelled_smollm2(tmp_path, "smol-qwen3", Qwen3Config, random_norms, num_hidden_layers=4, head_dim=64)
    elif family == "phi":
        d = relabelled_smollm2(tmp_path, "smol-phi", PhiConfig, random_norms, num_hidden_layers=4,
                               partial_rotary_factor=0.5, tie_word_embeddings=False)
    elif family == "gpt_neox":
        d = relabelled_smollm2(tmp_path, "smol-neox", GPTNeoXConfig, random_norms, num_hidden_layers=4,
                               tie_word_embeddings=False)
    else:  # GPT-2's own config names; nothing of SmolLM2's but its tokenizer and widths
        import torch
        from transformers import AutoTokenizer, GPT2LMHeadModel

        torch.manual_seed(0)
        d = tmp_path / "smol-gpt2"
        GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=576, n_layer=4, n_head=9, n_positions=2048,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(d)
        AutoTokenizer.from_pretrained(ROOT / ".cache" / "smollm2").save_pretrained(d)
    short_run(our_gguf(d, tmp_path))


def copies_of_the_mlp(model, sd):
    """Fill a Mixtral made from SmolLM2: every expert a copy of the block's MLP, a random router."""
    import torch

    for i, layer in enumerate(model.model.layers):
        mlp = f"model.layers.{i}.mlp."
        n = layer.mlp.experts.gate_up_proj.shape[0]
        gate_up = torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]])
        layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(n, -1, -1))
        layer.mlp.experts.down_proj.copy_(sd[mlp + "down_proj.weight"].expand(n, -1, -1))
        layer.mlp.gate.weight.normal_(0, 0.5)


def test_llama_cpp_runs_our_mixtral_gguf_as_the_model_it_is(reference, tmp_path):
    """SmolLM2 as a 4-expert Mixtral: every expert a copy of its MLP, a random router. With top-2
    routing and the top-2 weights renormalised (Mixtral's rule, and llama.cpp's) that is SmolLM2's
    function whatever the router picks; our file solves each expert on the tokens routed to it and
    merges a layer's experts. A wrong expert order, a lost router or unnormalised routing would not
    score like SmolLM2."""
    from transformers import MixtralConfig

    d = relabelled_smollm2(tmp_path, "smol-mixtral", MixtralConfig, copies_of_the_mlp, num_local_experts=4,
                           num_experts_per_tok=2, head_dim=64, sliding_window=None)
    assert_scores_like_smollm2(our_gguf(d, tmp_path), reference[1], "a 4-expert Mixtral")


def test_llama_cpp_runs_our_phi3_gguf_as_the_model_it_is(reference, tmp_path):
    """SmolLM2 as Phi-3: q/k/v fused into qkv_proj and gate/up into gate_up_proj (Phi-3's only
    differences from Llama), written with the phi3 architecture; a wrong row order in a fused
    tensor, or gate and up swapped, would not score like SmolLM2."""
    import torch
    from transformers import Phi3Config

    def fused(model, sd):
        for i, layer in enumerate(model.model.layers):
            pre = f"model.layers.{i}."
            layer.self_attn.qkv_proj.weight.copy_(torch.cat([sd[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
            layer.mlp.gate_up_proj.weight.copy_(torch.cat([sd[pre + "mlp.gate_proj.weight"],
                                                           sd[pre + "mlp.up_proj.weight"]]))

    # not named "phi3": llama.cpp marks Phi-3's </s>, <unk>, <s> tokens when the model's name says
    # phi-3 / phi3 (llama-vocab.cpp), and SmolLM2's vocabulary has none of them
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(ROOT / ".cache" / "smollm2").max_position_embeddings
    d = relabelled_smollm2(tmp_path, "smol-fused", Phi3Config, fused, pad_token_id=None, sliding_window=None,
                           original_max_position_embeddings=context)
    assert_scores_like_smollm2(our_gguf(d, tmp_path), reference[1], "Phi-3")


def fused_qkv_model(family: str, d, tokenizer_dir, layers: int = 12):
    """A random model of a family with fused q/k/v, rows of 256 (K-quants everywhere), ``layers``
    blocks (so that use_more_bits differs between blocks), saved with the tokenizer."""
    import shutil

    import torch
    from conftest import BPE_VOCAB
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, Phi3Config

    cfg = {"phi3": lambda: Phi3Config(vocab_size=BPE_VOCAB, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "gpt2": lambda: GPT2Config(vocab_size=BPE_VOCAB, n_embd=256, n_layer=layers, n_head=4, n_positions=256,
                                      bos_token_id=0, eos_token_id=0),
           "gpt_neox": lambda: GPTNeoXConfig(vocab_size=BPE_VOCAB, hidden_size=256, num_attention_heads=4,
                                             num_hidden_layers=layers, intermediate_size=1024,
                                             max_position_embeddings=256)}[family]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox"])
def test_llama_quantize_types_every_tensor_of_a_fused_qkv_model_as_we_do(tmp_path, bpe_dir, monkeypatch, family):
    """Our Q4_K_M and Q5_K_M files of a 12-block model with fused q/k/v hold, tensor by tensor, the
    types llama-quantize itself picks when it requantizes our Q8_0 file of the same model to that
    file type (llama-quant.cpp: attn_qkv takes attn_v's rules, Q6_K in the use_more_bits blocks)."""
    from conftest import SAMPLE_TEXT, run_module
    from gguf import GGUFReader

    quantize = tool("llama-quantize")
    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the test vocabulary is none llama.cpp knows by name
    model = fused_qkv_model(family, tmp_path / family, bpe_dir)
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)

    def ours(ftype):
        out = tmp_path / f"ours-{ftype}"
        r = run_module("gptq.quantize", [model, "--dataset", text, "--nsamples", "4", "--seqlen", "32", "--format",
                                         f"gguf:{ftype}", "--out", out, "--quiet"])
        assert r.returncode == 0, r.stderr
        return next(out.glob("*.gguf"))

    def types(path):
        return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}

    q8 = ours("q8_0")
    for ftype in ("q4_k_m", "q5_k_m"):
        theirs = tmp_path / f"theirs-{ftype}.gguf"
        r = subprocess.run([quantize, "--allow-requantize", str(q8), str(theirs), ftype.upper(), "2"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        want, got = types(theirs), types(ours(ftype))
        assert got == want, {n: (got.get(n), t) for n, t in want.items() if got.get(n) != t}
        qkv = [want[f"blk.{i}.attn_qkv.weight"] for i in range(12)]
        assert "Q6_K" in qkv and len(set(qkv)) == 2, qkv  # the rule really differs between blocks


def test_llama_cpp_tokenizes_our_sentencepiece_style_vocabulary_as_transformers_does(reference, tmp_path):
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback, trained here on WikiText-2
    valid) written by us as a llama vocabulary: llama.cpp's tokenizer gives the token ids
    transformers gives, byte fallback and the leading space included."""
    import torch
    from conftest import spm_style_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "spm-llama"
    tok = spm_style_tokenizer((WIKI / "valid.tokens.txt").read_text()[:300000], d, vocab_size=800)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(d)
    out = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(WIKI / "valid.tokens.txt"),
                    "--nsamples", "4", "--seqlen", "64", "--format", "gguf:q8_0", "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT)
    ours = next(out.glob("*.gguf"))
    for text in ("Hello world, the quick brown fox.", "naïve café ☃ 123 — déjà vu", "  two  spaces\tand a tab"):
        r = subprocess.run([tool("llama-completion"), "-m", str(ours), "-p", text, "-n", "1", "--verbose-prompt",
                            "--no-warmup", "-t", "2"], capture_output=True, text=True, errors="replace",
                           timeout=300)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-3000:]
        block = log[log.index("number of tokens in prompt"):]
        ids = [int(m) for m in re.findall(r"^\S*\s+I\s+(\d+) -> '", block, flags=re.M)]
        assert ids == tok(text).input_ids, (text, ids, tok(text).input_ids)


def llama_kl(path, base) -> tuple[float, float]:
    """llama-perplexity --kl-divergence of ``path`` against the logits saved in ``base``: (mean KLD,
    share of positions whose top token is the source's)."""
    r = subprocess.run([tool("llama-perplexity"), "-m", str(path), "-f", str(WIKI / "wiki.test.raw"), "-c", "2048",
                        "--chunks", "8", "-t", "2", "--kl-divergence-base", str(base), "--kl-divergence"],
                       capture_output=True, text=True, timeout=1800)
    log = r.stdout + r.stderr
    kl, top = re.search(r"Mean\s+KLD:\s+([0-9.]+)", log), re.search(r"Same top p:\s+([0-9.]+)", log)
    assert r.returncode == 0 and kl and top, log[-3000:]
    return float(kl.group(1)), float(top.group(1)) / 100


@pytest.fixture(scope="module")
def kl_base(reference, tmp_path_factory):
    """llama-perplexity's saved logits of its F16 file on the 8 x 2048 windows, for --kl-divergence."""
    f16 = reference[1]
    base = tmp_path_factory.mktemp("kl") / "f16.kld"
    subprocess.run([tool("llama-perplexity"), "-m", str(f16), "-f", str(WIKI / "wiki.test.raw"), "-c", "2048",
                    "--chunks", "8", "-t", "2", "--kl-divergence-base", str(base)], check=True, capture_output=True)
    return base


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])
def test_llama_cpp_runs_a_rotated_gguf_closer_to_the_source_than_the_unrotated_file(kl_base, tmp_path, ftype):
    """`--rotate hadamard` (residual stream and heads, the tied head untied): llama.cpp loads the
    file with no change, and by its own --kl-divergence against its F16 file the rotated file is
    closer to the source than our unrotated file of the same type (lower mean KLD, more top tokens
    the same). Perplexity is printed beside it: over these 8 windows it moves within its noise
    (llama-perplexity's ± is about 0.6), either way."""
    scores = {}
    for rotate in ("none", "hadamard"):
        out = tmp_path / f"ours-{rotate}"
        subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                        str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--rotate", rotate,
                        "--format", f"gguf:{ftype}", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
        g = json.loads((out / "quantize_report.json").read_text())["gguf"]
        scores[rotate] = (*llama_kl(out / g["file"], kl_base), perplexity(out / g["file"]), g["bytes"])
    for rotate, (kld, top, ppl, size) in scores.items():
        print(f"\n{ftype} {rotate}: KLD {kld:.6f}, same top {100 * top:.2f} %, PPL {ppl:.4f} ({size} B)")
    assert scores["hadamard"][0] < scores["none"][0]
    assert scores["hadamard"][1] > scores["none"][1]


def test_llama_cpp_runs_a_learned_rotation_q3_k_m_closer_to_the_source_than_hadamard_or_none(kl_base, tmp_path):
    """`--rotate learned --format gguf:q3_k_m`: llama.cpp loads it unchanged, and by its own
    --kl-divergence against its F16 file it is closer to the source than our unrotated and our
    Hadamard-rotated files of the same type (docs/results.md, "Rotated GGUF files": by our evaluator
    the Hadamard rotation alone does not pay at this type, where the untied embeddings fall from the
    head's Q8_0 to Q4_0, and the learned one does)."""
    scores = {}
    for rotate in ("none", "hadamard", "learned"):
        out = tmp_path / f"ours-{rotate}"
        subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                        str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--rotate", rotate,
                        "--format", "gguf:q3_k_m", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
        g = json.loads((out / "quantize_report.json").read_text())["gguf"]
        scores[rotate] = (*llama_kl(out / g["file"], kl_base), perplexity(out / g["file"]), g["bytes"])
    for rotate, (kld, top, ppl, size) in scores.items():
        print(f"\nq3_k_m {rotate}: KLD {kld:.6f}, same top {100 * top:.2f} %, PPL {ppl:.4f} ({size} B)")
    assert scores["learned"][0] < min(scores["none"][0], scores["hadamard"][0])


def budget_against_llama_cpp(reference, tmp_path, ftype: str, fraction: float):
    """llama.cpp's own ``ftype`` file of SmolLM2 made with the importance matrix, and ours from
    ``--format gguf --max-size`` at ``fraction`` of its bytes; returns (budget, their bytes, our
    bytes, their perplexity, ours) after printing both with our file's tensor types."""
    d, f16, imatrix = reference
    theirs = d / f"smollm2-{ftype.lower()}-imatrix-budget.gguf"
    subprocess.run([tool("llama-quantize"), "--imatrix", str(imatrix), str(f16), str(theirs), ftype, "2"],
                   check=True, capture_output=True)
    budget = int(fraction * theirs.stat().st_size)
    out = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--format", "gguf",
                    "--max-size", str(budget), "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    mine = next(out.glob("*.gguf"))
    p_theirs, p_mine = perplexity(theirs), perplexity(mine)
    types = json.loads((out / "quantize_report.json").read_text())["gguf"]["tensor_types"]
    print(f"\nllama.cpp {ftype} + imatrix {p_theirs:.4f} ({theirs.stat().st_size} B); ours at {fraction:.0%} "
          f"{p_mine:.4f} ({mine.stat().st_size} B, {types})")
    return budget, theirs.stat().st_size, mine.stat().st_size, p_theirs, p_mine


def test_llama_cpp_runs_our_budget_gguf_at_92_percent_of_its_q4_k_m(reference, tmp_path):
    """--format gguf --max-size at 92 % of the bytes of llama.cpp's own Q4_K_M made with the importance
    matrix (issue 24): the file is no larger than that and scores no higher perplexity in llama-perplexity.
    llama.cpp loads a file whose tensor types are chosen one by one."""
    budget, _, size, p_theirs, p_mine = budget_against_llama_cpp(reference, tmp_path, "Q4_K_M", 0.92)
    assert size <= budget
    assert p_mine <= p_theirs


def test_llama_cpp_runs_our_budget_gguf_at_the_size_of_its_q3_k_m(reference, tmp_path):
    """--format gguf --max-size at the bytes of llama.cpp's own Q3_K_M made with the importance matrix:
    the file is no larger and scores a lower perplexity in llama-perplexity. (SmolLM2's rows of 576 are
    not multiples of 256, so llama.cpp's Q3_K_M falls back to Q4_0 / Q5_0 / Q5_1 there and keeps
    Q4_K / Q5_K for ffn_down; the budget may pick any type we write, IQ4_NL included, above its floor: a
    uniform Q4_0 file fits this size, so Q2_K and Q3_K are left out.)"""
    budget, theirs, size, p_theirs, p_mine = budget_against_llama_cpp(reference, tmp_path, "Q3_K_M", 1.0)
    assert budget == theirs and size <= budget
    assert p_mine < p_theirs


def test_llama_cpp_dequantizes_our_q2_k_q3_k_and_iq4_nl_blocks_bit_for_bit(tmp_path):
    """A small Llama whose rows are multiples of 256 (so Q2_K and Q3_K are stored, not their
    fallbacks) written by us as Q2_K, Q3_K_M and IQ4_NL files; llama-quantize --allow-requantize turns
    each into F32 with ggml's own dequantizers, and every tensor equals the gguf package's
    dequantization of our blocks (the solver's weights, tests/test_ggml_kquants.py) bit for bit.
    llama-perplexity runs each file."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (WIKI / "valid.tokens.txt").is_file():
        pytest.skip(f"WikiText-2 not found in {WIKI}")
    torch.manual_seed(0)
    d = tmp_path / "llama-256"
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False, initializer_range=0.1)).save_pretrained(d)
    AutoTokenizer.from_pretrained(ROOT / ".cache" / "smollm2").save_pretrained(d)
    for ftype, block in (("q2_k", "Q2_K"), ("q3_k_m", "Q3_K"), ("iq4_nl", "IQ4_NL")):
        out = tmp_path / f"ours-{ftype}"
        subprocess.run([sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(WIKI / "valid.tokens.txt"),
                        "--nsamples", "4", "--seqlen", "64", "--format", f"gguf:{ftype}", "--out", str(out),
                        "--quiet"], check=True, cwd=ROOT, capture_output=True)
        ours = next(out.glob("*.gguf"))
        types = set(dequantized_as_we_do(ours, tmp_path).values())
        assert block in types, (ftype, types)
        print(f"\n{ftype}: {sorted(types)}, every tensor as ggml dequantizes it; llama-perplexity {short_run(ours)}")


def dequantized_as_we_do(ours, tmp_path) -> dict[str, str]:
    """llama-quantize --allow-requantize turns our file into F32 with ggml's own dequantizers: every
    tensor must equal the gguf package's dequantization of our blocks bit for bit. Returns each
    tensor's type in our file."""
    import numpy as np
    from gguf import GGUFReader, quants

    f32 = tmp_path / f"{ours.stem}-f32.gguf"
    subprocess.run([tool("llama-quantize"), "--allow-requantize", str(ours), str(f32), "F32", "2"], check=True,
                   capture_output=True)
    theirs = {t.name: t for t in GGUFReader(f32).tensors}
    types = {}
    for t in GGUFReader(ours).tensors:
        types[t.name] = t.tensor_type.name
        mine = np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)).reshape(-1)
        assert theirs[t.name].tensor_type.name == "F32"
        assert np.array_equal(mine, np.asarray(theirs[t.name].data).reshape(-1)), (ours.name, t.name)
    f32.unlink()
    return types


def short_run(path) -> float:
    """llama-perplexity on 2 windows of 128 tokens: the file loads and runs (a finite perplexity)."""
    r = subprocess.run([tool("llama-perplexity"), "-m", str(path), "-f", str(WIKI / "wiki.test.raw"), "-c", "128",
                        "--chunks", "2", "-t", "2"], capture_output=True, text=True, timeout=600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert r.returncode == 0 and m and float(m.group(1)) > 1, (r.stdout + r.stderr)[-3000:]
    return float(m.group(1))


def test_llama_cpp_reads_our_budget_gguf_of_a_mixtral_type_by_type(tmp_path):
    """--format gguf --max-size of SmolLM2 as a 4-expert Mixtral (its first 4 blocks, every expert a
    copy of the MLP, a random router) at the middle of the feasible range a refused budget names:
    each block's experts take one type (the merged ffn_*_exps tensors), chosen block by block.
    llama-quantize dequantizes every tensor of the file as we do, so llama.cpp reads each merged
    tensor's own type; the file is no larger than the budget and llama-perplexity runs it (4 blocks of
    30 are not a language model: its perplexity only shows that the file runs)."""
    if not (WIKI / "valid.tokens.txt").is_file():
        pytest.skip(f"WikiText-2 not found in {WIKI}")
    from transformers import MixtralConfig

    d = relabelled_smollm2(tmp_path, "smol-mixtral-4", MixtralConfig, copies_of_the_mlp, num_local_experts=4,
                           num_experts_per_tok=2, head_dim=64, sliding_window=None, num_hidden_layers=4)
    out = tmp_path / "ours"
    cmd = [sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(WIKI / "valid.tokens.txt"), "--nsamples",
           "8", "--seqlen", "256", "--format", "gguf", "--candidates", "q4_0,q5_0,q8_0,q4_k,q6_k", "--out", str(out)]
    r = subprocess.run([*cmd, "--max-size", "1"], capture_output=True, text=True, cwd=ROOT)
    lo, hi = map(int, re.search(r"\((\d+) to (\d+) bytes\)", r.stderr).groups())
    budget = (lo + hi) // 2
    subprocess.run([*cmd, "--max-size", str(budget), "--quiet"], check=True, cwd=ROOT)
    ours = next(out.glob("*.gguf"))
    assert ours.stat().st_size <= budget
    types = dequantized_as_we_do(ours, tmp_path)
    experts = {n: t for n, t in types.items() if "_exps" in n}
    assert len(experts) == 4 * 3 and all(t == types[f"blk.{n.split('.')[1]}.ffn_up_exps.weight"]
                                         for n, t in experts.items())
    assert len(set(types[n] for n in types if n.startswith("blk."))) > 1  # a mix
    print(f"\nbudget {budget} B (feasible {lo} to {hi}); ours {ours.stat().st_size} B; experts: "
          f"{ {n: t for n, t in sorted(experts.items()) if 'up' in n} }; llama-perplexity {short_run(ours)}")


def test_our_eval_ranks_two_q4_0_files_as_llama_perplexity_kl_divergence_does(reference, kl_base, tmp_path):
    """Our Q4_0 and llama.cpp's importance-matrix Q4_0 of SmolLM2, compared against the source by our
    eval (`--reference`, KL over whole 2048-token windows) and by llama-perplexity --kl-divergence
    (against its F16 file, second half of each window): both put the two files in the same order."""
    d, f16, imatrix = reference
    files = {"llama.cpp imatrix": d / "smollm2-q4_0-imatrix-kl.gguf"}
    subprocess.run([tool("llama-quantize"), "--imatrix", str(imatrix), str(f16), str(files["llama.cpp imatrix"]),
                    "Q4_0", "2"], check=True, capture_output=True)
    out = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--format", "gguf:q4_0",
                    "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    files["ours"] = next(out.glob("*.gguf"))
    cache = tmp_path / "reference-cache"
    theirs_view, our_view = {}, {}
    for label, path in files.items():
        theirs_view[label] = llama_kl(path, kl_base)
        r = subprocess.run([sys.executable, "-m", "gptq.eval", str(path), "--reference", str(ROOT / ".cache" / "smollm2"),
                            "--reference-cache", str(cache), "--dataset", str(WIKI / "wiki.test.raw"),
                            "--max-windows", "8", "--json"], check=True, cwd=ROOT, capture_output=True, text=True)
        j = json.loads(r.stdout.strip().splitlines()[-1])
        our_view[label] = (j["kld_mean"], j["kld_mean_stderr"], j["top1_agreement"])
    for label in files:
        (lk, lt), (ok, ose, ot) = theirs_view[label], our_view[label]
        print(f"\n{label} Q4_0: llama-perplexity KLD {lk:.6f}, same top {100 * lt:.2f} %; "
              f"gptq.eval KLD {ok:.6f} ± {ose:.6f}, top-1 {100 * ot:.2f} %")
    llama_order = theirs_view["ours"][0] < theirs_view["llama.cpp imatrix"][0]
    our_order = our_view["ours"][0] < our_view["llama.cpp imatrix"][0]
    assert llama_order == our_order
    assert (theirs_view["ours"][1] > theirs_view["llama.cpp imatrix"][1]) == \
        (our_view["ours"][2] > our_view["llama.cpp imatrix"][2])
