"""What nf4 costs a small model, and where: held-out accuracy of grpo_smollm2's model under several ways of
quantizing it, and whether bitsandbytes' 4-bit path computes what its dequantized weights compute.

    python benchmarks/nf4_error.py                       # every mode below (~10 min on 2 cores)
    python benchmarks/nf4_error.py float32 nf4_torch loftq_64 grads

Modes (greedy accuracy on the first ``--rows`` held-out chat problems of ``recipes/grpo_smollm2.yaml``, one
checker, 16 new tokens; and the per-token KL from the float32 model's next-token distributions over the same
prompts followed by their answers):

* ``float32``: the converted GGUF as loaded.
* ``nf4_torch``: every block linear quantized to nf4 and back in plain torch (``quantize_4bit`` /
  ``dequantize_4bit``, block 64), so no 4-bit kernel runs; ``nf4_torch_block32``: blocks of 32;
  ``nf4_keep_attention`` / ``nf4_keep_down`` / ``nf4_keep_first_last``: those layers left in float32.
* ``nf4_mse``: nf4 with each block's scale searched (0.5-1 x absmax) for the least squared weight error.
* ``nf4_bnb``: loaded with ``model.quantization: nf4`` (bitsandbytes' kernels).
* ``nf4_gptq``: loaded with ``model.quantization: nf4`` and ``model.gptq_rows: 256`` (GPTQ onto the nf4 grid,
  calibrated on 256 training prompts with their answers; ``lowalign.quantize``).
* ``loftq_<r>``: nf4 plus the rank-r LoftQ correction (``lora.init: loftq``'s start, computed in torch);
  ``loftq_64_iter5``: LoftQ's alternation run 5 times (Q = nf4(W - L), L = the rank-r SVD of W - Q);
  ``loftq_<r>_block32``: nf4 in blocks of 32 (the GGUF's Q4_1 blocks) under the correction.
* ``gptq_aware_<r>``: the GPTQ base (as ``nf4_gptq``, put into the float32 model dequantized: the same
  computation, see ``grads``) plus an activation-aware rank-r correction of each linear's error E = W - Q: the
  L of rank r minimizing E_x ||(E - L) x||^2 over the inputs x of 128 training prompts with their answers,
  L = SVD_r(E H^1/2) H^-1/2 with H = E[x x^T] (1% damping); ``gptq_svd_<r>``: the plain rank-r SVD of E
  (``gptq_svd_0``: the GPTQ base alone).
* ``gptq_sensitivity``: the GPTQ base with one decoder layer (each in turn), or one kind of projection in
  every layer, left in float32: the KL to float32 over 64 training prompts with their answers (no accuracy).
* ``--adapter DIR``: accuracy with a trained policy adapter (a run directory's ``adapters/policy``) on each
  base put into the float32 model (every mode but ``nf4_bnb`` and ``nf4_gptq``, which load a bundle of their
  own and stay without it); the KL stays that of the base alone.
* ``grads``: an nf4 bundle with a LoftQ adapter next to a float32 bundle holding the dequantized nf4 weights and
  the same adapter: the largest difference of their log-probs and of the LoRA gradients of a policy-gradient
  loss through lowalign's fused log-prob path (and eval vs train mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = ("float32", "nf4_torch", "nf4_torch_block32", "nf4_mse", "nf4_gptq",
         "gptq_svd_0", "gptq_svd_16", "gptq_aware_16", "gptq_svd_64", "gptq_aware_64", "gptq_sensitivity",
         "nf4_keep_attention", "nf4_keep_down", "nf4_keep_first_last",
         "nf4_bnb", "loftq_16", "loftq_32", "loftq_48", "loftq_64", "loftq_64_iter5", "loftq_64_block32",
         "loftq_16_block32", "grads")


def nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return F.dequantize_4bit(q, st, quant_type="nf4")


def nf4_mse(w: torch.Tensor, blocksize: int = 64, steps: int = 21) -> torch.Tensor:
    """nf4 with each block's scale chosen for the least squared error (a clip search over 0.5-1 of absmax)."""
    blocks = w.reshape(-1, blocksize)
    amax = blocks.abs().amax(1, keepdim=True)
    best, err = None, None
    for c in torch.linspace(0.5, 1.0, steps):
        s = amax * c
        q = nf4(torch.maximum(torch.minimum(blocks, s), -s).reshape(w.shape), blocksize).reshape(blocks.shape)
        e = (q - blocks).pow(2).sum(1, keepdim=True)
        if best is None:
            best, err = q, e
        else:
            take = e < err
            best, err = torch.where(take, q, best), torch.minimum(e, err)
    return best.reshape(w.shape)


def kl_from(reference, rows: list[dict], batch: int = 25):
    """A function of a bundle: its KL from ``reference`` (KL(reference || bundle), nats per token) over the
    next-token distributions of ``rows``' prompts (rendered already) followed by their answers, adapters off.
    A finer measure than greedy accuracy, which moves by 1 / len(rows) per problem."""
    texts = [r["prompt"] + str(r["answer"]) for r in rows]
    encs = [reference.tokenizer(texts[s:s + batch], return_tensors="pt", padding=True)
            for s in range(0, len(texts), batch)]

    @torch.no_grad()
    def logps(bundle) -> list[torch.Tensor]:
        return [torch.log_softmax(bundle.base(**e).logits.float(), -1)[e["attention_mask"].bool()] for e in encs]

    ref = logps(reference)
    tokens = sum(len(r) for r in ref)
    return lambda bundle: sum((r.exp() * (r - q)).sum().item() for r, q in zip(ref, logps(bundle))) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--adapter", help="a trained policy adapter folder: accuracy with it on each base")
    args = ap.parse_args()

    from lowalign import api
    from lowalign.bundle import ModelBundle
    from lowalign.data import prepare_prompts
    from lowalign.evaluation import heldout_eval

    cfg = api.load_config(REPO / "recipes" / "grpo_smollm2.yaml")
    data = api.load_data(cfg, None)
    b = ModelBundle.load(cfg.model)
    prepare_prompts(data, b.tokenizer, cfg.data)
    rows = data.eval_rows_all[:args.rows]  # prepare_prompts rendered them (the chat template) already
    params = dict(b.base.named_parameters())
    orig = {n: p.detach().clone() for n, p in params.items()}
    linears = [(n, m) for n, m in b.base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    last = b.base.config.num_hidden_layers - 1

    kl = kl_from(b, rows)
    gptq = GptqBase(cfg, data, b, orig) if any(m.startswith("gptq") for m in args.modes) else None
    role = "reference"
    if args.adapter:  # after the inputs were recorded (adapters off)
        from lowalign.bundle import saved_lora_config

        b.add_adapter("policy", saved_lora_config(args.adapter), init_from=args.adapter)
        role = "policy"

    def accuracy(bundle) -> str:
        acc = heldout_eval(bundle, rows, checker=data.checker, batch_size=100, max_new_tokens=16,
                           role=role if bundle is b else "reference")["accuracy"]
        with bundle.use("reference"):
            return f"{acc:.3f} | {kl(bundle):.4f}"

    @torch.no_grad()
    def set_weights(fn) -> None:
        for n, p in params.items():  # taken before any adapter wrapped the modules (the same tensors)
            p.copy_(orig[n])
        for n, m in linears:
            m.weight.copy_(fn(n, orig[n + ".weight"]))

    def loftq(r: int, iters: int = 1, blocksize: int = 64):
        def fn(n, w):
            low = torch.zeros_like(w)
            for _ in range(iters):  # LoftQ's alternation: Q = nf4(W - L), L = the rank-r SVD of W - Q
                q = nf4(w - low, blocksize)
                u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
                low = (u[:, :r] * s[:r]) @ vh[:r]
            return q + low
        return fn

    keep = {"nf4_keep_attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "nf4_keep_down": ("down_proj",),
            "nf4_keep_first_last": ("layers.0.", f"layers.{last}.")}
    print("| mode | held-out accuracy | KL to float32, nats/token | s |\n|---|---|---|---|")
    for mode in args.modes:
        t0 = time.time()
        if mode == "grads":
            grads(cfg, data)
            continue
        if mode == "gptq_sensitivity":
            gptq.sensitivity(b, set_weights)
            continue
        if mode == "nf4_bnb":
            acc = accuracy(ModelBundle.load(dataclasses.replace(cfg.model, quantization="nf4")))
        elif mode == "nf4_gptq":  # what model.gptq_rows: 256 loads (lowalign.quantize; cached after the first)
            gcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="nf4", gptq_rows=256))
            acc = accuracy(api.load_bundle(gcfg, b.tokenizer, data))
        else:
            if mode == "float32":
                set_weights(lambda n, w: w)
            elif mode == "nf4_torch":
                set_weights(lambda n, w: nf4(w))
            elif mode == "nf4_mse":
                set_weights(lambda n, w: nf4_mse(w))
            elif mode == "nf4_torch_block32":
                set_weights(lambda n, w: nf4(w, 32))
            elif mode.startswith("gptq_"):
                r = int(mode.rsplit("_", 1)[1])
                corr = gptq.aware if "aware" in mode else gptq.svd
                set_weights(lambda n, w, r=r, corr=corr: gptq.q[n] + corr(n, r))  # n: the module
            elif mode in keep:
                set_weights(lambda n, w, k=keep[mode]: w if any(x in n for x in k) else nf4(w))
            else:
                opts = {m[1]: int(m[2]) for m in re.finditer(r"_(iter|block)(\d+)", mode)}
                set_weights(loftq(int(mode.split("_")[1]), opts.get("iter", 1), opts.get("block", 64)))
            acc = accuracy(b)
        print(f"| {mode} | {acc} | {time.time() - t0:.0f} |", flush=True)


class GptqBase:
    """The GPTQ-calibrated nf4 weights of ``model.gptq_rows: 256`` (dequantized, by module name) and the
    float32 model's input second moments of each block linear over 128 calibration texts; ``orig``: the float32
    model's parameters by name (the copy ``main`` keeps)."""

    def __init__(self, cfg, data, b, orig: dict):
        import bitsandbytes as bnb

        from lowalign import api

        gcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="nf4", gptq_rows=256))
        g = api.load_bundle(gcfg, b.tokenizer, data)
        self.q = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                  for n, m in g.base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        del g
        lin = {n: m for n, m in b.base.named_modules() if n in self.q}  # by module name
        self.w = {n: orig[n + ".weight"] for n in lin}
        texts = api.calibration_texts(gcfg, data)
        self.train_rows = [{"prompt": t, "answer": ""} for t in texts[128:192]]  # for sensitivity: not the H's
        self.h = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lin.items()}
        real = None

        def add(n, x):
            x = x[real].double()
            self.h[n].addmm_(x.T, x)

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: add(n, a[0])) for n, m in lin.items()]
        with torch.no_grad():
            for s in range(0, 128, 16):
                enc = b.tokenizer(texts[s:s + 16], return_tensors="pt", padding=True)
                real = enc["attention_mask"].bool()
                b.base(**enc)
        for h in hooks:
            h.remove()

    def svd(self, n: str, r: int) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(self.w[n] - self.q[n], full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]

    def aware(self, n: str, r: int, damp: float = 0.01) -> torch.Tensor:
        h = self.h[n]
        h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        ev, vec = torch.linalg.eigh(h)
        root, inv = (vec * ev.clamp_min(0).sqrt()) @ vec.T, (vec * ev.clamp_min(1e-12).rsqrt()) @ vec.T
        u, s, vh = torch.linalg.svd((self.w[n] - self.q[n]).double() @ root, full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r] @ inv).float()

    def sensitivity(self, b, set_weights) -> None:
        set_weights(lambda n, w: w)  # the reference: float32, adapters off
        with b.use("reference"):
            kl = kl_from(b, self.train_rows, batch=16)
        layers = sorted({int(re.search(r"layers\.(\d+)\.", n)[1]) for n in self.q})
        kinds = sorted({n.split(".")[-1] for n in self.q})
        print("| left in float32 | KL to float32 over training texts |\n|---|---|")
        for what, keep in ([("nothing", lambda n: False)]
                           + [(f"layer {i}", lambda n, i=i: f"layers.{i}." in n) for i in layers]
                           + [(f"every {k}", lambda n, k=k: n.split(".")[-1] == k) for k in kinds]):
            set_weights(lambda n, w, keep=keep: w if keep(n) else self.q[n])
            with b.use("reference"):
                print(f"| {what} | {kl(b):.4f} |", flush=True)


def grads(cfg, data) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig
    from lowalign.data import prepare_prompts
    from lowalign.generation import generate, row_seed
    from lowalign.logprobs import token_logprobs

    bq = ModelBundle.load(dataclasses.replace(cfg.model, quantization="nf4"))
    bq.add_adapter("policy", LoraConfig(r=16, alpha=32, init="loftq"))
    bf = ModelBundle.load(cfg.model)
    bf.add_adapter("policy", LoraConfig(r=16, alpha=32))
    quantized = dict(bq.base.named_modules())
    with torch.no_grad():
        for n, m in bf.base.named_modules():
            if isinstance(m, torch.nn.Linear) and isinstance(quantized.get(n), bnb.nn.Linear4bit):
                m.weight.copy_(F.dequantize_4bit(quantized[n].weight.data, quantized[n].weight.quant_state).float())
        pq = dict(bq.base.named_parameters())
        for n, p in bf.base.named_parameters():
            if "lora_" in n:
                p.copy_(pq[n])
    prepare_prompts(data, bq.tokenizer, cfg.data)
    rows = data.eval_rows_all[:8]
    with bq.use("policy"):
        roll = generate(bq, [r["prompt"] for r in rows], max_new_tokens=16, num_generations=4,
                        row_seeds=[row_seed(0, i) for i in range(32)])
    adv = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    lps, gs = [], []
    for b in (bq, bf):
        b.base.train()
        with b.use("policy"):
            lp = token_logprobs(b, roll.input_ids, roll.attention_mask, roll.target_mask).logps
            (-(lp * adv).sum() / roll.target_mask.sum()).backward()
        lps.append(lp.detach())
        gs.append({n: p.grad.clone() for n, p in b.base.named_parameters() if p.grad is not None})
    with bq.use("policy"), bq.eval_mode(), torch.no_grad():
        ev = token_logprobs(bq, roll.input_ids, roll.attention_mask, roll.target_mask).logps
    worst = max(((gs[0][n] - gs[1][n]).norm() / (gs[1][n].norm() + 1e-12)).item() for n in gs[1])
    print(f"\ngrads: nf4 vs float32 with the dequantized weights: log-prob max |diff| "
          f"{(lps[0] - lps[1]).abs().max().item():.3g}, LoRA gradients worst relative difference {worst:.3g} over "
          f"{len(gs[1])} tensors; nf4 eval vs train mode log-probs max |diff| {(ev - lps[0]).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
