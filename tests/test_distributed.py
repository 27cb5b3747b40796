"""lowalign.distributed's collectives on 2 gloo processes, against the one-process answer, and the row-seeded
sampler that makes a rollout independent of how its rows are split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowalign.distributed import SINGLE, Dist
from lowalign.generation import RowSeededSampler, row_seed


def test_collectives_on_two_gloo_processes(tmp_path):
    """tests/dist_worker.py on 2 torchrun processes; each writes what its collectives returned."""
    script = Path(__file__).with_name("dist_worker.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    r0["bounds"], r1["bounds"] = tuple(r0["bounds"]), tuple(r1["bounds"])
    r0["grads"], r1["grads"] = tuple(r0["grads"]), tuple(r1["grads"])
    assert r0["bounds"] == (0, 3) and r1["bounds"] == (3, 6)
    assert r0["shard"] == list("abc") and r1["shard"] == list("def")
    assert r0["sum"] == r1["sum"] == 4.0 and r0["tsum"] == r1["tsum"] == [2.0, 1.0]
    assert r0["mean"]["x"] == r1["mean"]["x"] == pytest.approx((0 * 1 + 2.0 * 3) / 4)
    assert r0["mean"]["only0"] == r1["mean"]["only0"] == 5.0  # the mean over the ranks that have it
    full = [[0, 1, 0], [2, 3, 0], [10, 11, 12], [13, 14, 15]]  # width 2 padded with zeros to 3
    assert r0["gather"] == r1["gather"] == full
    a = torch.tensor(full, dtype=torch.float32)
    centred, sums = a - a.mean(), a.sum(1)
    assert r0["whole"] == [centred[:2, :2].tolist(), sums[:2].tolist()]  # own rows, own width
    assert r1["whole"] == [centred[2:].tolist(), sums[2:].tolist()]
    assert r0["grads"] == r1["grads"] == ([3.0, 3.0, 3.0], [1.0, 1.0], None)


def test_one_process_is_the_identity():
    t = torch.randn(4, 3)
    assert SINGLE.gather(t) is t and SINGLE.shard([1, 2, 3]) == [1, 2, 3] and SINGLE.sum(2.5) == 2.5
    assert SINGLE.mean({"a": 1.0}) == {"a": 1.0}
    with pytest.raises(ValueError, match="do not split over 3"):
        Dist(0, 3).bounds(4)


# ---- the row-seeded sampler ----------------------------------------------------------------------------------


def _draws(logits: torch.Tensor, n: int, **warp) -> torch.Tensor:
    """Tokens the sampler picks for ``n`` rows of the same logits, each row its own seed."""
    s = RowSeededSampler([row_seed(7, i) for i in range(n)], prompt_len=0, max_new_tokens=1, **warp)
    out = s(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1).clone())
    assert torch.isfinite(out).sum(1).eq(1).all()  # exactly one finite logit per row
    return out.argmax(1)


def test_sampler_frequencies_match_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5])
    n = 40_000
    freq = torch.bincount(_draws(logits, n), minlength=6).float() / n
    p = torch.softmax(logits, 0)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-4).all(), (freq, p)  # 5 standard errors
    assert freq[4] == 0  # probability ~1e-14: never drawn


def test_sampler_applies_temperature_top_k_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    n = 20_000
    hot = torch.bincount(_draws(logits, n, temperature=2.0), minlength=5).float() / n
    p = torch.softmax(logits / 2.0, 0)
    assert ((hot - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()
    assert set(_draws(logits, 2000, top_k=2).tolist()) == {0, 1}
    keep = torch.softmax(logits, 0)  # top_p 0.8: the smallest head of the distribution with mass >= 0.8
    assert keep[:2].sum() >= 0.8 > keep[:1].sum()
    assert set(_draws(logits, 2000, top_p=0.8).tolist()) == {0, 1}


def test_a_row_samples_the_same_whatever_shares_its_batch():
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import generate
    from lowalign.tasks.arithmetic import ArithmeticTask

    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny"))
    b.add_adapter("policy", LoraConfig())
    prompts = [r["prompt"] for r in ArithmeticTask().train_rows(6, seed=3)]
    seeds = [row_seed(11, i) for i in range(12)]
    kw = dict(max_new_tokens=10, num_generations=2, temperature=0.9, top_k=30, top_p=0.95)
    with b.use("policy"):
        whole = generate(b, prompts, row_seeds=seeds, **kw)
        torch.manual_seed(123)  # the global RNG plays no part
        halves = [generate(b, prompts[i:i + 3], row_seeds=seeds[2 * i:2 * i + 6], **kw) for i in (0, 3)]
        other = generate(b, prompts, row_seeds=[row_seed(12, i) for i in range(12)], **kw)
    assert whole.texts == halves[0].texts + halves[1].texts
    assert whole.texts != other.texts  # and the seed does matter
    assert len(set(whole.texts)) > 3  # they are samples, not the greedy completion
