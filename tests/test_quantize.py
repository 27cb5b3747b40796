"""GPTQ onto the nf4 grid (lowalign.quantize): against bitsandbytes' own rounding and packing, against an
independent implementation of GPTQ's update, and on a real bundle (calibration, cache, config errors)."""

import dataclasses

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import lowalign.quantize as Q  # noqa: E402
from lowalign.config import ConfigError, ModelConfig  # noqa: E402


def _inputs(n_in: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (a random mixing of a few strong directions, the same for every ``seed``), as a
    layer's inputs are; ``seed`` draws other tokens of that distribution."""
    basis = torch.randn(8, n_in, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 8, generator=g) @ basis + 0.3 * torch.randn(tokens, n_in, generator=g)


def _dequant(codes, absmax, blocksize=64):
    levels = Q.nf4_levels().double()
    return (levels[codes.long()] * absmax.double().repeat_interleave(blocksize, 1)).float()


def _gptq_by_the_paper(w, h, blocksize=64, damp=0.01, absmax=None, order=None):
    """GPTQ as the paper states it before its Cholesky reformulation (the OBQ update): quantize column j, move
    every column not yet quantized by -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,k, then drop j from H^-1 by Gaussian
    elimination. Columns in ``order`` (default: input order) at fixed ``absmax``, or each block's absmax taken
    when its first column comes up."""
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    levels = Q.nf4_levels().double()
    codes = torch.zeros(w.shape, dtype=torch.long)
    fixed = absmax is not None
    absmax = absmax.double().clone() if fixed else torch.zeros(w.shape[0], w.shape[1] // blocksize, dtype=torch.float64)
    left = list(range(w.shape[1])) if order is None else [int(j) for j in order]
    while left:
        j = left.pop(0)
        if not fixed and j % blocksize == 0:
            absmax[:, j // blocksize] = w[:, j:j + blocksize].abs().amax(1)
        s = absmax[:, j // blocksize]
        codes[:, j] = (w[:, j:j + 1] / s[:, None] - levels).abs().argmin(1)
        err = (w[:, j] - levels[codes[:, j]] * s) / hinv[j, j]
        w[:, left] -= err[:, None] * hinv[j, left][None]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes, absmax.float()


def test_with_a_diagonal_hessian_gptq_is_bitsandbytes_rounding_and_packing():
    import bitsandbytes.functional as F

    w = torch.randn(24, 192)
    codes, absmax = Q.gptq_nf4(w, torch.diag(torch.rand(192) + 0.5))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(Q.pack_nf4(codes), packed)
    torch.testing.assert_close(absmax.reshape(-1), state.absmax, rtol=0, atol=0)


def test_gptq_matches_the_papers_update_and_beats_rounding_on_the_layer_output():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    x = _inputs(128)
    h = x.T @ x
    codes, absmax = Q.gptq_nf4(w, h)
    want_codes, want_absmax = _gptq_by_the_paper(w, h)
    assert (codes.long() == want_codes).float().mean() > 0.99  # a rounding tie may fall the other way
    torch.testing.assert_close(absmax, want_absmax, rtol=1e-6, atol=0)
    rtn_codes, rtn_absmax = Q.gptq_nf4(w, torch.eye(128))
    out_err = (x @ (w - _dequant(codes, absmax)).T).norm()
    rtn_err = (x @ (w - _dequant(rtn_codes, rtn_absmax)).T).norm()
    assert out_err < 0.5 * rtn_err, (out_err, rtn_err)
    # held-out inputs from the same distribution: the gain is not an overfit to the calibration tokens
    xh = _inputs(128, seed=1)
    assert (xh @ (w - _dequant(codes, absmax)).T).norm() < 0.5 * (xh @ (w - _dequant(rtn_codes, rtn_absmax)).T).norm()


def test_act_order_matches_the_papers_update_in_that_order_and_cuts_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    x = _inputs(128) * torch.linspace(0.2, 3, 128)  # inputs of unequal energy: the order matters
    h = x.T @ x
    scales = w.reshape(16, 2, 64).abs().amax(-1)
    codes, absmax = Q.gptq_nf4(w, h, absmax=scales, act_order=True)
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    want, _ = _gptq_by_the_paper(w, h, absmax=scales, order=order)
    assert (codes.long() == want).float().mean() > 0.99
    plain, _ = Q.gptq_nf4(w, h, absmax=scales)
    assert not torch.equal(codes, plain)
    xh = _inputs(128, seed=1) * torch.linspace(0.2, 3, 128)
    err = lambda c: (xh @ (w - _dequant(c, scales)).T).norm()  # noqa: E731
    assert err(codes) < err(plain), (err(codes), err(plain))
    with pytest.raises(ValueError, match="act_order needs fixed absmax"):
        Q.gptq_nf4(w, h, act_order=True)


def test_fixed_scales_and_weights_pushed_past_them():
    w = torch.randn(8, 64)
    x = _inputs(64)
    scales = w.abs().amax(1, keepdim=True) * 0.5  # half the absmax: many weights lie beyond their block's scale
    codes, absmax = Q.gptq_nf4(w, x.T @ x, absmax=scales)
    assert torch.equal(absmax, scales)
    assert set(codes.unique().tolist()) >= {0, 15}  # clipped to the outermost levels


def test_nf4_state_and_set_weight_give_the_kernels_the_codes_and_scales():
    import bitsandbytes.functional as F

    from lowalign.bundle import ModelBundle

    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig(quantization="nf4"))
    layer = next(m for m in b.base.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.quant_state.nested  # double-quantized statistics, as lowalign loads nf4
    n_out, n_in = layer.out_features, layer.in_features
    codes = torch.randint(0, 16, (n_out, n_in), dtype=torch.uint8)
    absmax = torch.rand(n_out, n_in // 64) + 0.1
    Q.set_nf4_weight(layer, Q.pack_nf4(codes), absmax)
    _, used = Q.nf4_state(layer, absmax)
    got = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(got, _dequant(codes, used), rtol=0, atol=1e-7)
    torch.testing.assert_close(used, absmax, rtol=5e-2, atol=0)  # double-quantized statistics: a few % off
    assert not torch.equal(used, absmax)
    x = torch.randn(3, n_in)
    torch.testing.assert_close(layer(x), x @ got.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="codes do not fit"):
        Q.set_nf4_weight(layer, Q.pack_nf4(codes[:8]), absmax)


def _texts(n=16):
    return [f"What is {a} + {b}? {a + b}" for a, b in zip(range(10, 10 + n), range(40, 40 + n))]


def _layer_outputs(b, texts):
    enc = b.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return b.base(**enc, output_hidden_states=True).hidden_states[-1][enc["attention_mask"].bool()]


def test_calibrated_tiny_model_is_closer_to_full_precision_and_cached(tmp_path, monkeypatch):
    from lowalign.bundle import ModelBundle

    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(quantization="nf4", gptq_rows=16)
    full = _layer_outputs(ModelBundle.load(dataclasses.replace(cfg, quantization="none", gptq_rows=0)), _texts(32))
    rtn = ModelBundle.load(cfg)
    gptq = ModelBundle.load(cfg)
    info = gptq.calibrate_nf4(_texts())
    assert info["layers"] == 14 and not info["cached"]  # 2 layers x 7 linears
    err_rtn = (_layer_outputs(rtn, _texts(32)) - full).norm()
    err_gptq = (_layer_outputs(gptq, _texts(32)) - full).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    again = ModelBundle.load(cfg)
    info2 = again.calibrate_nf4(_texts())
    assert info2["cached"] and info2["path"] == info["path"] and info2["tokens"] == info["tokens"] > 0
    for (n, p), q in zip(gptq.base.state_dict().items(), again.base.state_dict().values()):
        assert torch.equal(p, q), n
    other = ModelBundle.load(cfg).calibrate_nf4(_texts()[:8])  # other texts: another cache entry
    assert other["path"] != info["path"]
    # a cache written before the token count was stored with the weights: the count is taken again
    from safetensors.torch import load_file, save_file

    save_file(load_file(info["path"]), info["path"])  # the same tensors, no metadata
    old = ModelBundle.load(cfg).calibrate_nf4(_texts())
    assert old["cached"] and old["tokens"] == info["tokens"]


def test_gptq_needs_an_nf4_base_named_before_loading():
    from lowalign import api

    with pytest.raises(ConfigError, match="model.gptq_rows.*model.quantization is 'none'"):
        api.resolve_config("recipes/grpo_tiny.yaml", ["model.gptq_rows=8"])
    with pytest.raises(ConfigError, match="model.gptq_rows"):
        api.resolve_config("recipes/grpo_tiny.yaml", ["model.gptq_rows=-1"])


def test_calibration_texts_are_the_runs_prompts_with_their_answers():
    from lowalign import api

    cfg, _ = api.resolve_config("recipes/grpo_tiny.yaml", ["model.quantization=nf4", "model.gptq_rows=5"])
    data = api.load_data(cfg, None)
    texts = api.calibration_texts(cfg, data)
    rows = data.batch(0, 5, cfg.seed)
    assert texts == [r["prompt"] + str(r["answer"]) for r in rows]
    assert texts == api.calibration_texts(cfg, api.load_data(cfg, None))  # deterministic: resume and export


def test_gemma3_layers_with_their_own_masks_calibrate(tmp_path, monkeypatch):
    """Gemma 3 gives its sliding-window and global layers different masks and rotary tables: each layer is
    calibrated with its own call's arguments, and the whole model ends closer to full precision than rounding."""
    import transformers

    from lowalign.bundle import ModelBundle
    from lowalign.tiny import byte_tokenizer

    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=256, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    d = tmp_path / "gemma3"
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    mc = ModelConfig(name_or_path=str(d), quantization="nf4", gptq_rows=16)
    texts = [t * 2 for t in _texts(32)]  # longer than the sliding window
    full = _layer_outputs(ModelBundle.load(dataclasses.replace(mc, quantization="none", gptq_rows=0)), texts)
    rtn = ModelBundle.load(mc)
    gptq = ModelBundle.load(mc)
    assert gptq.calibrate_nf4(texts[:16])["layers"] == 21
    assert (_layer_outputs(gptq, texts) - full).norm() < 0.8 * (_layer_outputs(rtn, texts) - full).norm()
