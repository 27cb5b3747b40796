"""lowalign.api: what ``complete`` loads for a trained adapter."""

import pytest
import torch

from lowalign import api

from .test_exporter import _fake_run, _logits


def _completing_bundle(monkeypatch, **kw):
    """The bundle (with the policy adapter active) that ``api.complete`` generates from, and its greedy texts."""
    import lowalign.generation as G

    seen = {}
    real = G.generate

    def spy(bundle, prompts, **gkw):
        with torch.no_grad():
            seen["logits"] = _logits(bundle.base)
        return real(bundle, prompts, **gkw)

    monkeypatch.setattr(G, "generate", spy)
    texts = api.complete("builtin:tiny", ["12+7=", "3+40="], temperature=0, max_new_tokens=4, **kw)
    return seen["logits"], texts


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_complete_loads_a_calibrated_nf4_run_as_it_trained(where, tmp_path, monkeypatch):
    """An adapter trained on a GPTQ-calibrated nf4 base is completed on that base (not on plain rounding, nor
    in float32) by default, found from the run directory or one of its checkpoints."""
    import shutil

    from lowalign.tiny import resolve_builtin

    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    b = _fake_run(run, resolve_builtin("builtin:tiny"), quantization="nf4", noise=0.02, gptq_rows=16)
    with torch.no_grad(), b.use("policy"):
        want = _logits(b.base)
    adapter = run
    if where == "checkpoint":
        adapter = run / "checkpoints" / "step_2"
        shutil.copytree(run / "adapters", adapter / "adapters")
        shutil.rmtree(run / "adapters")
    got, texts = _completing_bundle(monkeypatch, adapter=str(adapter))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(texts) == 2 and all(len(t) == 1 for t in texts)
    # what an explicit choice loads instead: float32 differs from the model the adapter was trained on
    other, _ = _completing_bundle(monkeypatch, adapter=str(adapter), quantization="none")
    assert (other - want).abs().max() > 1e-2


def test_complete_without_a_run_loads_full_precision(tmp_path, monkeypatch):
    from lowalign.tiny import resolve_builtin

    run = tmp_path / "run"
    b = _fake_run(run, resolve_builtin("builtin:tiny"), noise=0.02)
    with torch.no_grad(), b.use("policy"):
        want = _logits(b.base)
    got, _ = _completing_bundle(monkeypatch, adapter=str(run / "adapters" / "policy"))  # a bare adapter folder
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
