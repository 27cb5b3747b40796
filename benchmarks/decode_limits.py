"""How far a CPU decode step of SmolLM2's size can go below lowalign's rollout: three measurements that bound it.

    python benchmarks/decode_limits.py                       # all three parts
    python benchmarks/decode_limits.py --parts matmul attention

``matmul``: the block projections of one decode step (64 rows, 30 layers of SmolLM2's shapes, random float32
weights) as separate matmuls and with q/k/v and gate/up fused into one weight each, cycling through all 30
layers' weights as a decode step does; then one shape with its weight in cache, and the same in bfloat16 (what
AMX would give, at other numerics).

``attention``: one decode step's attention (64 rows = 8 prompts x 8 completions, 9 query heads on 3 KV heads,
head dim 64, 47 prompt + 13 generated keys) through ``scaled_dot_product_attention`` on each row's whole cache
(what the rollout does: the prompt's keys repeated to its 8 rows), and through a shared-prompt form: each
prompt's keys once, the group's 8 x 3 queries per KV head against them in one product, the generated keys per
row, one softmax over both.

``loop``: lowalign's ``generate`` on SmolLM2 (the rollout of ``bench_rollout.py``: 8 chat prompts x 8, 16
tokens, EOS forbidden, greedy, LoRA r16 with non-zero B) against a lean decode loop over the same modules
after the same prefill: the decoder layers called by hand (RMSNorm, rotary, SDPA on the cache buffers, the
LoRA projections and MLP as modules), none of transformers' per-step mask, cache or output machinery. Prints
the time of each and whether the greedy tokens are equal.

Each part alternates its variants and prints the median. The shared-prompt attention is what
``lowalign.generation.GroupedPrompt`` now does in the rollout; the fused projections and the lean loop were
measured and not built (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

LAYERS, D, KV, INTER, ROWS = 30, 576, 192, 1536, 64


def _time(fns: dict, reps: int, inner: int = 1) -> dict:
    """Median seconds per call of each callable, alternating between them."""
    out = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in out.items()}


def part_matmul(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = dict(q=(D, D), k=(KV, D), v=(KV, D), o=(D, D), gate=(INTER, D), up=(INTER, D), down=(D, INTER))
    layers = [{n: torch.randn(*s, generator=g) for n, s in shapes.items()} for _ in range(LAYERS)]
    for w in layers:
        w["qkv"], w["gate_up"] = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["gate"], w["up"]])
    x, xi = torch.randn(ROWS, D, generator=g), torch.randn(ROWS, INTER, generator=g)

    def separate():
        for w in layers:
            for n in ("q", "k", "v", "o", "gate", "up"):
                F.linear(x, w[n])
            F.linear(xi, w["down"])

    def fused():
        for w in layers:
            for n in ("qkv", "o", "gate_up"):
                F.linear(x, w[n])
            F.linear(xi, w["down"])

    w0 = layers[0]["gate"]
    xb, wb = x.bfloat16(), w0.bfloat16()
    t = _time({"separate": separate, "fused": fused}, reps)
    c = _time({"cycling": lambda: [F.linear(x, w["gate"]) for w in layers],
               "cached": lambda: [F.linear(x, w0) for _ in layers],
               "cached_bf16": lambda: [F.linear(xb, wb) for _ in layers]}, reps)
    flop = 2 * ROWS * D * INTER
    print("\n**matmul**: one decode step's block projections, 64 rows, 30 layers\n")
    print("| variant | ms per step | GFLOP/s |\n|---|---|---|")
    step_flop = 2 * ROWS * sum(a * b for a, b in shapes.values()) * LAYERS
    for k, v in t.items():
        print(f"| {k} (q/k/v, o, gate/up, down) | {v * 1e3:.1f} | {step_flop / v / 1e9:.0f} |")
    for k, v in c.items():
        print(f"| gate_proj 64 x {D} @ {D} x {INTER}, {k} | {v / LAYERS * 1e6:.0f} us per call | "
              f"{flop * LAYERS / v / 1e9:.0f} |")


def part_attention(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, G, H, R, Dh, P, T = 8, 8, 3, 3, 64, 47, 13
    q = torch.randn(B * G, H, R, Dh, generator=g)
    pad = torch.zeros(B, P, dtype=torch.bool)
    pad[0, :5] = True  # left padding of one prompt
    kp = [torch.randn(B, H, P, Dh, generator=g) for _ in range(LAYERS)]  # each prompt's keys once
    vp = [torch.randn(B, H, P, Dh, generator=g) for _ in range(LAYERS)]
    kg = [torch.randn(B * G, H, T, Dh, generator=g) for _ in range(LAYERS)]  # each row's generated keys
    vg = [torch.randn(B * G, H, T, Dh, generator=g) for _ in range(LAYERS)]
    whole_k = [torch.cat([p.repeat_interleave(G, 0), x], 2) for p, x in zip(kp, kg)]  # the rollout's cache
    whole_v = [torch.cat([p.repeat_interleave(G, 0), x], 2) for p, x in zip(vp, vg)]
    keep = torch.cat([~pad.repeat_interleave(G, 0), torch.ones(B * G, T, dtype=torch.bool)], 1)[:, None, None]
    bias = torch.zeros(B, 1, 1, P).masked_fill_(pad[:, None, None], float("-inf"))
    scale = Dh ** -0.5

    def whole():
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
                for k, v in zip(whole_k, whole_v)]

    def shared():
        out = []
        for i in range(LAYERS):
            qq = q.view(B, G, H, R, Dh).transpose(1, 2).reshape(B, H, G * R, Dh)
            sp = torch.matmul(qq, kp[i].transpose(-1, -2)).mul_(scale).add_(bias)
            sp = sp.view(B, H, G, R, P).transpose(1, 2).reshape(B * G, H, R, P)
            sg = torch.matmul(q, kg[i].transpose(-1, -2)).mul_(scale)
            p = torch.softmax(torch.cat([sp, sg], -1), -1)
            pp = p[..., :P].reshape(B, G, H, R, P).transpose(1, 2).reshape(B, H, G * R, P)
            o = torch.matmul(pp, vp[i]).view(B, H, G, R, Dh).transpose(1, 2).reshape(B * G, H, R, Dh)
            out.append(o + torch.matmul(p[..., P:], vg[i]))
        return out

    err = max((a - b).abs().max().item() for a, b in zip(whole(), shared()))
    t = _time({"whole": whole, "shared": shared}, reps, inner=5)
    print(f"\n**attention**: one decode step, {B * G} rows, {P} prompt + {T} generated keys, 30 layers "
          f"(max difference {err:.1e})\n")
    print("| variant | us per layer | KV read per layer, MiB |\n|---|---|---|")
    print(f"| SDPA on each row's whole cache | {t['whole'] / LAYERS * 1e6:.0f} | "
          f"{2 * B * G * H * (P + T) * Dh * 4 / 2**20:.1f} |")
    print(f"| shared prompt, then each row's own keys | {t['shared'] / LAYERS * 1e6:.0f} | "
          f"{2 * (B * P + B * G * T) * H * Dh * 4 / 2**20:.1f} |")


def part_loop(reps: int) -> None:
    import bench_rollout as br

    from lowalign.bundle import position_ids_from_mask
    from lowalign.generation import encode_prompts, generate, rollout_cache
    from lowalign.models import resolve_path

    name = "package:smollm2-135m-instruct"
    b = br.load_policy(Path(resolve_path(name)), "none")
    texts = br.chat_prompts(name, 8)
    lm = b.causal_lm
    m = lm.model
    cfg = m.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    eos = b.tokenizer.eos_token_id

    def rms(norm, h):  # transformers' LlamaRMSNorm, op for op
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def lean(ids, mask, groups, steps):
        cache = rollout_cache(cfg, steps)
        pos = position_ids_from_mask(mask)
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache,
                    logits_to_keep=torch.tensor([ids.shape[1] - 1])).logits[:, -1]
        cache.batch_repeat_interleave(groups)
        logits, mask, last = (x.repeat_interleave(groups, 0) for x in (logits, mask, pos[:, -1]))
        n, length = mask.shape[0], ids.shape[1]
        kbuf, vbuf = [x.k_buf for x in cache.layers], [x.v_buf for x in cache.layers]
        keep = torch.cat([mask.bool(), torch.ones(n, steps, dtype=torch.bool)], 1)
        out = torch.empty(n, steps, dtype=torch.long)
        for t in range(steps):
            scores = logits.float()
            scores[:, eos] = float("-inf")
            out[:, t] = nxt = scores.argmax(-1)
            if t == steps - 1:
                break
            last = last + 1
            h = m.embed_tokens(nxt)
            cos, sin = (x[:, None] for x in m.rotary_emb(h[:, None], last[:, None]))
            bias = keep[:, None, None, :length + 1]
            for i, layer in enumerate(m.layers):
                a = layer.self_attn
                x = rms(layer.input_layernorm, h)
                q = rotate(a.q_proj(x).view(n, heads, 1, hd), cos, sin)
                kbuf[i][:, :, length] = rotate(a.k_proj(x).view(n, kv_heads, 1, hd), cos, sin)[:, :, 0]
                vbuf[i][:, :, length] = a.v_proj(x).view(n, kv_heads, hd)
                o = F.scaled_dot_product_attention(q.view(n, kv_heads, heads // kv_heads, hd),
                                                   kbuf[i][:, :, :length + 1], vbuf[i][:, :, :length + 1],
                                                   attn_mask=bias, scale=a.scaling)
                h = h + a.o_proj(o.reshape(n, heads * hd))
                h = h + layer.mlp(rms(layer.post_attention_layernorm, h))
            length += 1
            logits = lm.lm_head(rms(m.norm, h))
        return out

    ids, mask = encode_prompts(b.tokenizer, texts, b.device)
    res = {}
    with torch.no_grad(), b.use("policy"):
        lm.eval()
        fns = {"generate": lambda: res.__setitem__("generate", generate(
                   b, texts, max_new_tokens=16, min_new_tokens=16, num_generations=8, do_sample=False).completion_ids),
               "lean": lambda: res.__setitem__("lean", lean(ids, mask, 8, 16))}
        t = _time(fns, reps)
    same = (res["generate"] == res["lean"]).float().mean().item()
    print("\n**loop**: SmolLM2, 8 chat prompts x 8, 16 greedy tokens, LoRA r16\n")
    print("| decode loop | s per rollout | greedy tokens equal to generate |\n|---|---|---|")
    print(f"| lowalign `generate` (transformers' forward per step) | {t['generate']:.2f} | - |")
    print(f"| lean loop over the same modules | {t['lean']:.2f} | {same:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["matmul", "attention", "loop"],
                    choices=["matmul", "attention", "loop"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for p in args.parts:
        {"matmul": part_matmul, "attention": part_attention, "loop": part_loop}[p](args.reps)


if __name__ == "__main__":
    main()
