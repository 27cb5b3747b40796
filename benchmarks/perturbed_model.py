"""SmolLM2 in float32 with random noise on its block linears, as far from the float32 model (KL per token) as
the GPTQ-calibrated nf4 model: does training suffer from nf4's error, or from any error of that size?

    python benchmarks/perturbed_model.py --out /tmp/smollm2_noisy      # ~3 min on 2 cores
    lowalign run recipes/grpo_smollm2.yaml model.name_or_path=/tmp/smollm2_noisy seed=N

Each layer's noise is Gaussian with std proportional to that layer's nf4 GPTQ error (``recipes/
grpo_smollm2_nf4.yaml``'s base, from the cache after its first run), scaled until the KL from the float32 model
over the first 200 held-out prompts and their answers equals the nf4 model's. Results: benchmarks/RESULTS.md,
"nf4 calibrated by GPTQ".
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from nf4_error import kl_from  # benchmarks/, this script's folder
    from safetensors.torch import load_file

    from lowalign import api
    from lowalign.bundle import ModelBundle
    from lowalign.data import prepare_prompts

    cfg = api.load_config(REPO / "recipes" / "grpo_smollm2_nf4.yaml")
    data = api.load_data(cfg, None)
    fp = ModelBundle.load(dataclasses.replace(cfg.model, quantization="none", gptq_rows=0))
    prepare_prompts(data, fp.tokenizer, cfg.data)
    nf4 = api.load_bundle(cfg, fp.tokenizer, data)
    full = load_file(str(Path(fp.source) / "model.safetensors"))
    std = {n + ".weight": (F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                           - full[n + ".weight"]).std().item()
           for n, m in nf4.base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    kl = kl_from(fp, data.eval_rows_all[:200])
    target = kl(nf4)
    g = torch.Generator().manual_seed(args.seed)
    noise = {k: torch.randn(full[k].shape, generator=g) * s for k, s in std.items()}
    params = dict(fp.base.named_parameters())

    @torch.no_grad()
    def perturb(scale: float) -> float:
        for k, z in noise.items():
            params[k].copy_(full[k] + scale * z)
        return kl(fp)

    scale = 1.0
    print(f"nf4 GPTQ: KL {target:.4f} nats/token")
    for _ in range(3):  # KL grows about as scale^2
        got = perturb(scale)
        print(f"noise x {scale:.4f} of the GPTQ error's std: KL {got:.4f}", flush=True)
        scale *= (target / got) ** 0.5
    print(f"noise x {scale:.4f}: KL {perturb(scale):.4f} -> {args.out}")
    shutil.rmtree(args.out, ignore_errors=True)
    fp.base.save_pretrained(args.out)
    fp.tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
