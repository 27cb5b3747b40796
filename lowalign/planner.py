"""`lowalign plan`: will a recipe fit? Its peak memory estimated from ``config.json`` alone (no weights).

The model's shapes come from a skeleton on the meta device (``lowalign.models.skeleton``: exact parameter
counts per module, any architecture transformers knows); the workload from the recipe's ``train:`` fields
(rollout batch, micro-batch, pairs, population) and the data's prompt lengths where they can be read without
the model (a local file or the built-in task, through the run's own tokenizer), else ``data.max_prompt_tokens``.

Peak = what stays for the whole run (base weights by quantization, adapters and heads, their gradients and
AdamW state, on CPU the Python/torch runtime) + the largest phase (rollout: KV cache and sampling logits;
scoring: no-grad forwards; training: activations with or without gradient checkpointing plus one fused
log-prob chunk; reference precompute; evaluation). On a GPU the estimate is of
``torch.cuda.max_memory_allocated``; the verdict adds the CUDA context and allocator slack that a card also
has to hold. Constants are per-token activation sizes of a decoder layer and the sampler's copies of the
``[rows, vocab]`` scores; ``benchmarks/plan_accuracy.py`` compares estimates with measured peaks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lowalign.config import AUTO, ConfigError

MiB, GiB = 2**20, 2**30
# RSS of Python + torch + transformers + peft + lowalign (~460 MiB after the imports) plus the workspaces and
# allocator pools the first forward/backward leaves resident; fitted with benchmarks/plan_accuracy.py on a
# 2-core x86 CPU (torch 2.13, glibc): the one CPU constant that is measured rather than derived
CPU_RUNTIME = 570 * MiB
CUDA_CONTEXT = 600 * MiB  # CUDA context + cuBLAS workspaces: outside max_memory_allocated, inside the card
# the caching allocator's reserved-but-unallocated share: bf16 GRPO / DPO on Qwen2.5-0.5B and 1.5B reserved 14-30%
# over their peak allocation on an H200 (benchmarks/RESULTS.md, "On an H200"); 0.10 before that was measured
ALLOCATOR_SLACK = 0.30
LOGPROB_CHUNK_ELEMENTS = 1 << 23  # kernels/logprobs/reference.py: logits elements per chunk ...
LOGPROB_MIN_CHUNK = 128  # ... never fewer tokens than this
# CPU training pass: peak RSS over the tensors autograd saves. glibc keeps the heap pages of freed transients
# (the layer's temporaries, backward's gradient buffers) mapped, so RSS runs ahead of the live tensors:
# SmolLM2-135M, 16 x 64 tokens, no checkpointing: 2345 MiB over the loaded model, 1.5x what the per-layer term
# below counts (benchmarks/RESULTS.md, "Real models"). With non-reentrant checkpointing the retained transients
# of the recomputed layers dominated (1299 MiB measured where ~70 MiB of inputs are saved): autograd's nodes
# pinned the holes between freed temporaries. Checkpointing is reentrant since 2026-12-03 and now pays on a CPU
# too (SmolLM2, 8 x 175 tokens: ~1.6 GB peak RSS against ~2.4 GB before and ~4.3 GB without, RESULTS.md #34),
# but the checkpointed CPU term below is not refitted to that yet, so on a CPU `gradient_checkpointing: auto`
# stays off and memory is fitted with the micro-batch alone. Refitted 2026-12-04 from 1.5 to 1.75 on SmolLM2's
# forward_backward peaks after the lean LoRA forward (`--profile-memory`: 1632 MiB at micro-batch 8, 2114 at 16;
# 1.75 plans 1637 and 2084): 1.5 planned micro-batch 16 inside a 2 GB budget that its runs exceeded.
CPU_TRAIN_RSS_FACTOR = 1.75
# CPU decoding: peak RSS runs ahead of the live tensors here too (freed transients of the prefill's layers, and
# the cache copies made when finished rows leave the batch; not isolated further). SmolLM2's greedy evaluation
# of 100 prompts x (48 + 16) tokens measured 681-762 MiB over the static terms (the baseline and final
# evaluations of two `grpo_smollm2` runs, 2026-12-04) where the terms below count 503
CPU_DECODE_RSS_FACTOR = 1.4
# CPU GPTQ calibration (model.gptq_rows): the phase's peak RSS runs ahead of the live terms of ``calibration``
# below. `lowalign run recipes/grpo_smollm2_nf4.yaml --profile-memory train.steps=1 eval.num_examples=0` with a
# fresh cache (2026-12-04): 1312 and 1387 MiB measured (two runs), where the static terms are 805 and the live
# terms 181; 3.0 plans 1347. builtin:tiny (`recipes/grpo_tiny.yaml model.quantization=nf4 model.gptq_rows=256`):
# 537 measured, 646 planned (the runtime term is SmolLM2's). The float64 Hessians and Cholesky factors of each
# layer are freed and allocated again at the next, and the heap keeps what they leave. Not measured on CUDA,
# where the terms are counted as they are.
CPU_CALIBRATION_RSS_FACTOR = 3.0
SAMPLER_COPIES = 3  # [rows, vocab] fp32 buffers per decoding step (HF's scores copy, warped, the cdf)
GREEDY_COPIES = 2


@dataclass
class ModelShape:
    """Sizes of a causal LM read from its config (parameter counts are exact, from the meta skeleton)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    linear_params: int  # block linears (what quantization shrinks)
    embed_params: int
    head_params: int  # 0 when tied to the embedding
    other_params: int  # norms, biases
    lora_params: int  # one adapter of the recipe's rank on its target modules
    source: str = "config.json"
    attn_dim: int = 0  # query heads x head dim (0: the hidden size)
    packing: str | None = "block"  # how a shared prompt's rows pack for training (prompt_sharing.packing_mode)
    lora_inputs: int = 0  # the LoRA target modules' input features, summed over the model (elements per token)


@dataclass
class Plan:
    shape: ModelShape
    device: str
    static: list[tuple[str, int, str]] = field(default_factory=list)  # (term, bytes, how)
    phases: list[tuple[str, int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> tuple[str, int, str]:
        return max(self.phases, key=lambda t: t[1]) if self.phases else ("none", 0, "")

    @property
    def peak(self) -> int:
        """The estimate of the measured peak: RSS on CPU, ``max_memory_allocated`` on CUDA."""
        return sum(b for _, b, _ in self.static) + self.peak_phase[1]

    @property
    def on_card(self) -> int:
        """What a GPU must hold: the peak plus allocator slack and the CUDA context."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT if self.device == "cuda" else self.peak


PACKED_ROLLOUT_TRAINERS = ("grpo", "remax", "reinforce_pp")  # train on every rollout row (grpo_step); RAFT and
# SuperHF train on a filtered selection, PPO on one completion per prompt: planned as whole rows


# ---- model shape -------------------------------------------------------------------------------------------


def model_shape(cfg) -> ModelShape:
    """The recipe's model: its config.json (local directory, builtin, the hub cache, or fetched from the hub:
    one small file) or, offline, lowalign's catalog of common models."""
    from lowalign.models import read_config

    m = cfg.model
    key = (m.name_or_path, m.gguf_file, str(cfg.lora.target_modules), cfg.lora.r)
    if key in _SHAPES:  # `suggestions` plans many variants of one recipe
        return _SHAPES[key]
    config, source = read_config(m.name_or_path, m.trust_remote_code, m.gguf_file), "config.json"
    if config is None:
        config, source = _remote_or_catalog(m.name_or_path)
    _SHAPES[key] = _shape_from_config(config, cfg, source)
    return _SHAPES[key]


_SHAPES: dict[tuple, ModelShape] = {}


def _remote_or_catalog(name: str):
    import json
    from pathlib import Path

    from transformers import AutoConfig

    try:
        import os
        import socket

        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise OSError("HF_HUB_OFFLINE")
        socket.create_connection(("huggingface.co", 443), timeout=3).close()  # offline: no retry loop
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json")
        return AutoConfig.from_pretrained(Path(path).parent), "config.json (hub)"
    except Exception:
        pass
    catalog = json.loads((Path(__file__).parent / "assets" / "model_configs.json").read_text())
    catalog.pop("_about", None)
    if name not in catalog:
        raise ConfigError(f"model.name_or_path: no config.json for '{name}' here (not a local directory, not in "
                          f"the hub cache, hub unreachable) and not in lowalign's catalog ({', '.join(catalog)}); "
                          "point model.name_or_path at a directory holding its config.json")
    c = dict(catalog[name])
    return AutoConfig.for_model(c.pop("model_type"), **c), "lowalign's catalog (config.json unreachable)"


def _shape_from_config(config, cfg, source: str) -> ModelShape:
    import torch

    from lowalign.models import resolve_target_modules, skeleton, text_sizes
    from lowalign.prompt_sharing import packing_mode

    model = skeleton(config, cfg.model.trust_remote_code)
    targets = resolve_target_modules(model, cfg.lora.target_modules)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is emb.weight
    linear = lora = lora_inputs = 0
    for name, mod in model.named_modules():
        if mod is head or not isinstance(mod, torch.nn.Linear):
            continue
        linear += mod.weight.numel()
        if name.rsplit(".", 1)[-1] in targets:
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
            lora_inputs += mod.in_features
    total = sum(p.numel() for p in model.parameters())
    head_n = 0 if tied or head is None else head.weight.numel()
    hidden, attn, kv, inter, layers = text_sizes(config)
    return ModelShape(cfg.model.name_or_path, layers, hidden, inter, kv, emb.num_embeddings, linear,
                      emb.weight.numel(), head_n, total - linear - emb.weight.numel() - head_n, lora, source,
                      attn, packing_mode(model.config), lora_inputs)


# ---- workload ----------------------------------------------------------------------------------------------


def data_lengths(cfg) -> tuple[int, int | None] | str:
    """(longest prompt, longest preference completion or None) in tokens, measured on the data when that needs
    no download (built-in task, local files: the run's tokenizer, first 2000 rows); else why not. Read once
    per model and data config: ``suggestions`` plans many variants of one recipe."""
    from lowalign.models import _local_dir, gguf_path

    d = cfg.data
    key = (cfg.model.name_or_path, repr(d), cfg.algorithm)
    if key in _LENGTHS:
        return _LENGTHS[key]
    local_model = _local_dir(cfg.model.name_or_path, cfg.model.gguf_file)
    gguf = gguf_path(cfg.model.name_or_path, cfg.model.gguf_file)  # not converted yet: its tokenizer is inside
    readable = d.path is not None or d.source.startswith("builtin:")
    if (local_model is None and gguf is None) or not readable:
        _LENGTHS[key] = "bound"
        return _LENGTHS[key]
    try:
        from lowalign.api import load_data
        from lowalign.data import prepare_prompts
        from lowalign.gguf_source import gguf_tokenizer
        from lowalign.models import load_tokenizer

        tok = (load_tokenizer(str(local_model), cfg.model.trust_remote_code) if local_model is not None
               else gguf_tokenizer(gguf))
        data = load_data(cfg, tok)
        prepare_prompts(data, tok, cfg.data)  # chat templates: the prompts the run will feed

        def longest(texts):
            return max(len(tok(str(t), add_special_tokens=False).input_ids) for t in texts) + 1

        completion = None
        if data.pairs is not None:
            rows = data.pairs.train[:2000]
            keys = [k for k in ("chosen", "rejected", "completion", "answer") if k in rows[0]]
            completion = longest(r[k] for r in rows for k in keys)
        elif data.task is not None:
            rows = data.batch(0, 2000, 0)  # the task's prompts as the run renders them
        else:
            rows = data.train_rows[:2000]
        _LENGTHS[key] = (longest(r["prompt"] for r in rows), completion)
    except Exception as e:  # a plan falls back to the bound; the run itself reports the data's error
        _LENGTHS[key] = f"bound; data not read: {type(e).__name__}"
    return _LENGTHS[key]


_LENGTHS: dict[tuple, tuple[int, int | None] | str] = {}


def prompt_tokens(cfg) -> tuple[int, str]:
    """The longest prompt in tokens (:func:`data_lengths`), else the bound ``data.max_prompt_tokens``."""
    m = data_lengths(cfg)
    if isinstance(m, str):
        return cfg.data.max_prompt_tokens, f"data.max_prompt_tokens ({m})"
    return min(m[0], cfg.data.max_prompt_tokens), "measured on the data"


def completion_tokens(cfg, given: int | None) -> tuple[int, str]:
    """The completion length: ``--completion-tokens``; a preference file's longest chosen/rejected (DPO and
    its family train on those, whatever their ``max_new_tokens``, which only budgets built-in on-policy
    pairs); the generation budget; else an assumption."""
    tc = cfg.train
    if given:
        return given, "--completion-tokens"
    m = data_lengths(cfg) if cfg.data.path is not None else "no data file"
    if not isinstance(m, str) and m[1] is not None:
        return m[1], "measured on the data"
    if hasattr(tc, "max_new_tokens"):
        return tc.max_new_tokens, "train.max_new_tokens"
    return 256, "assumed 256 (pass --completion-tokens)"


# ---- the estimate ------------------------------------------------------------------------------------------


def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def plan(cfg, *, device: str = "cuda", completion: int | None = None, world: int = 1) -> Plan:
    """The peak-memory estimate of the validated run config ``cfg`` on ``device`` (``cuda`` or ``cpu``)."""
    from lowalign.algorithms import data_kind

    chosen = None
    if AUTO in (getattr(cfg.train, "micro_batch_size", None), cfg.model.gradient_checkpointing):
        chosen = fit_memory(cfg, device, world=world)  # what a run would choose
        cfg = chosen.apply(cfg)
    s = model_shape(cfg)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dt = _bytes(dtype)
    P, p_how = prompt_tokens(cfg)
    C, c_how = completion_tokens(cfg, completion)
    tc, q = cfg.train, cfg.model.quantization
    out = Plan(s, device, notes=[f"model: {s.name} ({s.source}); {s.layers} layers, hidden {s.hidden}, "
                                 f"vocab {s.vocab}; compute dtype {dtype}",
                                 f"prompt tokens {P} ({p_how}); completion tokens {C} ({c_how})"])
    if chosen is not None:
        out.notes.append(f"auto {chosen.describe().removeprefix('memory: ').split('; planned')[0]} "
                         f"(train.memory_budget {chosen.budget / GiB:.2f} GiB, {chosen.budget_how})")
    if world > 1:
        out.notes.append(f"per process of {world} (torchrun --nproc_per_node {world}): each holds the whole model "
                         f"and 1/{world} of the batch")
    per_linear = {"none": dt, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / max(1, s.hidden)}[q]
    weights = int(s.linear_params * per_linear) + (s.embed_params + s.head_params + s.other_params) * dt
    out.static.append(("base weights", weights, f"{s.linear_params / 1e6:.1f}M block-linear params x "
                       f"{per_linear:.3g} B ({q}) + {(s.embed_params + s.head_params + s.other_params) / 1e6:.1f}M "
                       f"embedding/head/norm params x {dt} B"))

    kind = data_kind(cfg)
    names = set(vars(tc)) if tc is not None else set()
    essa = "population_size" in names
    n_train = 0 if essa else (2 if "critic" in names and getattr(tc, "critic", "") == "separate" else 1)
    frozen = sum(1 for r in cfg.rewards if r.adapter) + (1 if cfg.lora.init_from or cfg.reference_soup else 0)
    head = (s.hidden + 1) * 4 * (("critic" in names) + (cfg.algorithm == "reward_model"))
    lora = s.lora_params * 4
    n_adapters = max(1, n_train) + frozen + (1 if essa else 0)  # ESSA also keeps the SVD factors
    out.static.append(("adapters and heads", lora * n_adapters + head,
                       f"{s.lora_params / 1e6:.2f}M LoRA params (r={cfg.lora.r}) x 4 B x {n_adapters}"))
    if n_train:
        out.static.append(("gradients + AdamW state", (lora * n_train + head) * 3,
                           "3 x the trainable fp32 params (gradient, exp_avg, exp_avg_sq)"))
    if device == "cpu":
        out.static.append(("runtime", CPU_RUNTIME, "Python + torch + transformers + peft resident set (CPU)"))

    def forward_nograd(rows: int, T: int) -> int:  # one layer's temporaries at a time + the output states
        return rows * T * (s.hidden * 3 + 2 * s.intermediate + 2 * s.kv_dim) * dt + rows * T * s.hidden * dt

    def logprob_chunk(tokens: int) -> int:  # kernels/logprobs: default_chunk_size
        # one fp32 [chunk, vocab] buffer per pass, reused by every chunk (forward: logsumexp in it; backward:
        # dz in it); the Triton kernels on CUDA are planned the same, as an upper bound
        chunk = max(LOGPROB_MIN_CHUNK, min(4096, LOGPROB_CHUNK_ELEMENTS // s.vocab))
        return min(chunk, tokens) * s.vocab * 4

    def train_pass(rows: int, T: int, vocab_chunk: bool = True) -> int:
        per_layer = rows * T * (10 * s.hidden + 4 * s.intermediate + 4 * s.kv_dim) * dt  # saved for backward
        if dt < 4:  # a half-precision base: each LoRA module casts its input to the fp32 adapter, and autograd
            # keeps that copy (SmolLM2 bf16 on a CPU: 2257 MiB measured where 1766 were planned without it)
            per_layer += rows * T * s.lora_inputs // max(1, s.layers) * 4
        ckpt = rows * T * s.hidden * dt * s.layers + per_layer
        acts = ckpt if cfg.model.gradient_checkpointing is True else per_layer * s.layers
        if device == "cpu":
            acts = int(acts * CPU_TRAIN_RSS_FACTOR)
        return acts + rows * T * s.hidden * 4 * 2 + (logprob_chunk(rows * T) if vocab_chunk else 0)

    def calibration(n: int, T: int) -> int:  # lowalign.quantize.calibrate_nf4, decoder layer by decoder layer
        d, a, i = s.hidden, s.attn_dim or s.hidden, s.intermediate
        states = 2 * n * T * d * dt  # every text's hidden states in and out of the layer (the embeddings kept)
        hessians = 8 * (5 * d * d + a * a + i * i)  # float64 X^T X per linear: q, k, v, gate, up read d; o; down
        widest = max(d, a, i)
        # beside its own H (counted above): H permuted, then each Cholesky factor in its place (two at once), W's
        # float64 copy and its permutation, the full-precision weight as read
        gptq = 8 * (2 * widest * widest + 2 * d * widest) + 4 * d * widest
        total = states + hessians + gptq + forward_nograd(min(n, 16), T)  # batches of 16 through the layer
        return int(total * CPU_CALIBRATION_RSS_FACTOR) if device == "cpu" else total

    def decode(rows: int, T_total: int, sampled: bool, prompts: int | None = None) -> int:
        # generation.decode prefills each distinct prompt once (``prompts`` of them); with sdpa and full
        # attention (``s.packing == "block"``) its keys stay once per prompt (GroupedPrompt), else they are
        # repeated to the group's rows
        grouped = prompts is not None and s.packing == "block"
        tokens = prompts * P + rows * (T_total - P) if grouped else rows * T_total
        kv = 2 * s.layers * s.kv_dim * tokens * dt
        scores = rows * s.vocab * 4 * (SAMPLER_COPIES if sampled else GREEDY_COPIES) + rows * s.vocab * dt
        # one layer's temporaries over whole prompts
        prefill = (prompts or rows) * P * (s.hidden * 5 + 4 * s.intermediate) * dt
        total = kv + scores + prefill
        return int(total * CPU_DECODE_RSS_FACTOR) if device == "cpu" else total

    if cfg.model.gptq_rows and q == "nf4":
        out.phases.append(("calibration", calibration(cfg.model.gptq_rows, P + C),
                           f"GPTQ of {cfg.model.gptq_rows} texts x {P + C} tokens: their hidden states, one "
                           f"layer's float64 input Hessians, the largest linear's GPTQ buffers"))

    ev = cfg.eval
    if ev.num_examples and kind == "prompts":
        rows = min(ev.num_examples, ev.batch_size)
        out.phases.append(("evaluation", decode(rows, P + ev.max_new_tokens, False),
                           f"greedy decoding of {rows} prompts x {P}+{ev.max_new_tokens} tokens"))
    if essa:
        rows = min(tc.population_size * tc.prompts_per_generation // world, tc.rows_per_call(device))
        out.phases.append(("population", decode(rows, P + C, tc.do_sample),
                           f"{rows} rows (members x prompts) decoded together, KV cache + [rows, vocab] scores"))
    elif "num_generations" in names and "prompts_per_step" in names:
        B = tc.prompts_per_step * tc.num_generations // world
        T = P + C
        out.phases.append(("rollout", decode(B, T, True, max(1, tc.prompts_per_step // world)),
                           f"{B} completions x {T} tokens: KV cache + "
                           f"{SAMPLER_COPIES} [rows, vocab] fp32 sampler buffers"))
        passes = (1 if getattr(tc, "beta", 0) else 0) + (getattr(tc, "num_iterations", 1) > 1) + ("critic" in names) * 2
        if passes:
            out.phases.append(("scoring", forward_nograd(B, T) + logprob_chunk(B * T),
                               f"no-grad forwards of all {B} rows ({passes} pass(es): reference/old/value/reward)"))
        mb = getattr(tc, "micro_batch_size", 0) or B
        if "critic" in names and not getattr(tc, "micro_batch_size", 0):
            mb = max(1, B // tc.num_mini_batches)  # this rank's rows of one PPO minibatch
        from lowalign.prompt_sharing import PACKING_MARGIN, packed_cost

        G = tc.num_generations
        g = min(mb, G) if mb % G == 0 or G % mb == 0 else 1  # rows of one prompt in a micro-batch
        packed = (g > 1 and cfg.algorithm in PACKED_ROLLOUT_TRAINERS and s.packing is not None
                  and packed_cost(s.hidden, s.attn_dim or s.hidden, s.kv_dim, s.intermediate, mb, P, C, g,
                                  block=s.packing == "block") < PACKING_MARGIN)
        rows, length, what = ((mb // g, P + g * C, f"{mb // g} packed sequence(s) of {P} + {g} x {C} tokens")
                              if packed else (mb, T, f"micro-batch of {mb} x {T} tokens"))
        out.phases.append(("forward_backward", train_pass(rows, length) * (2 if n_train == 2 else 1),
                           f"{what}, gradient checkpointing "
                           f"{'on' if cfg.model.gradient_checkpointing is True else 'off'}"))
    else:
        bs = getattr(tc, "batch_size", 1) // world
        rows = 2 * bs if kind in ("preferences",) else bs
        T = P + C
        reward_model = cfg.algorithm == "reward_model"
        vocab = not reward_model or getattr(tc, "likelihood_feature", False)  # a score head reads no logits
        out.phases.append(("forward_backward", train_pass(rows, T, vocab_chunk=vocab),
                           f"{rows} sequences x {T} tokens, gradient checkpointing "
                           f"{'on' if cfg.model.gradient_checkpointing is True else 'off'}"))
        if getattr(tc, "precompute_ref", False):
            out.phases.append(("reference", forward_nograd(rows, T) + logprob_chunk(rows * T),
                               f"reference log-probs precomputed once, {rows} sequences per batch"))
        elif "beta" in names and kind in ("preferences", "feedback") and cfg.algorithm not in ("orpo", "simpo"):
            out.phases[-1] = (out.phases[-1][0], out.phases[-1][1] + forward_nograd(rows, T) // 4,
                              out.phases[-1][2] + " + the reference pass")
    return out


# ---- choosing the micro-batch -------------------------------------------------------------------------------

CPU_DEFAULT_BUDGET = 4 * GiB
CUDA_UNSEEN_BUDGET = 8 * GiB  # planning for CUDA on a machine without a GPU: a consumer card


@dataclass
class MemoryFit:
    """What ``train.micro_batch_size: auto`` / ``model.gradient_checkpointing: auto`` resolve to."""

    micro_batch_size: int | None  # None: the algorithm has no micro-batch field
    gradient_checkpointing: bool
    peak: int | None  # planned peak of the choice (None: the model's shape was out of reach)
    budget: int
    budget_how: str
    note: str = ""

    def fill(self, cfg):
        """Fill the choice into ``cfg``'s ``auto`` fields, in place; returns ``cfg``."""
        if self.micro_batch_size is not None and getattr(cfg.train, "micro_batch_size", None) == AUTO:
            cfg.train.micro_batch_size = self.micro_batch_size
        if cfg.model.gradient_checkpointing == AUTO:
            cfg.model.gradient_checkpointing = self.gradient_checkpointing
        return cfg

    def apply(self, cfg):
        """A copy of ``cfg`` with the choice filled in."""
        import copy

        return self.fill(copy.deepcopy(cfg))

    def describe(self) -> str:
        mb = "" if self.micro_batch_size is None else (
            f"micro_batch_size {self.micro_batch_size or 'whole batch'}, ")
        gc = f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        if self.peak is None:
            return f"memory: {mb}{gc} ({self.note})"
        return (f"memory: {mb}{gc}; planned peak {self.peak / GiB:.2f} GiB of a {self.budget / GiB:.2f} GiB budget "
                f"({self.budget_how}; `lowalign plan` shows the terms)")


def memory_budget(cfg, device: str) -> tuple[int, str]:
    """``train.memory_budget`` in bytes and where it came from."""
    text = getattr(cfg.train, "memory_budget", AUTO)
    if text != AUTO:
        try:
            return parse_size(text), "train.memory_budget"
        except ConfigError as e:
            raise ConfigError(f"train.memory_budget: '{text}' is not a size like 4GB or 2.5GiB") from e
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0]), "auto: the GPU's free memory"
        return CUDA_UNSEEN_BUDGET, f"auto: no GPU here, planned for {CUDA_UNSEEN_BUDGET // GiB} GiB"
    avail = _available_ram()
    if avail is not None and avail < CPU_DEFAULT_BUDGET:
        return avail, "auto: the RAM available now"
    return CPU_DEFAULT_BUDGET, "auto: 4 GiB on a CPU"


def _available_ram() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fit_memory(cfg, device: str, world: int = 1) -> MemoryFit:
    """Resolve ``auto`` micro-batch and gradient checkpointing against the memory budget with :func:`plan`:
    the largest micro-batch (a divisor of the batch) that fits without checkpointing, as long as it is at least
    min(8, batch) rows (smaller ones leave a CPU's or GPU's matmuls underfed); else the largest that fits with
    checkpointing (when it is ``auto``); else the largest that fits at all. Nothing fitting is a ConfigError
    naming the smallest setting's peak."""
    tc = cfg.train
    budget, how = memory_budget(cfg, device)
    mb_auto = getattr(tc, "micro_batch_size", None) == AUTO
    gc = cfg.model.gradient_checkpointing
    gcs = ([False] if device == "cpu" else [False, True]) if gc == AUTO else [gc]  # see CPU_TRAIN_RSS_FACTOR
    if mb_auto:
        names = set(vars(tc))
        B = (tc.prompts_per_step * tc.num_generations if "num_generations" in names else tc.batch_size) // world
        sizes = [d for d in range(B, 0, -1) if B % d == 0]
    else:
        B, sizes = None, [getattr(tc, "micro_batch_size", None)]

    phase = {}

    def peak(mb, g) -> int:
        trial = MemoryFit(mb if mb_auto else None, g, None, budget, how).apply(cfg)
        p = plan(trial, device=device, world=world)
        phase[(mb, g)] = p.peak_phase[0]
        return p.on_card if device == "cuda" else p.peak

    try:
        model_shape(cfg)
    except ConfigError as e:  # a hub id out of reach: nothing to plan with
        return MemoryFit(0 if mb_auto else None, gc is True, None, budget, how,
                         f"not planned, {str(e).split(';')[0]}: the whole batch at once")
    tried = {}
    for g in gcs:
        for mb in sizes:
            tried[(mb, g)] = peak(mb, g)
            if tried[(mb, g)] <= budget:
                if g or not mb_auto or mb >= min(8, B) or len(gcs) == 1:
                    return MemoryFit(mb if mb_auto else None, g, tried[(mb, g)], budget, how)
                break  # small without checkpointing: try checkpointing first
    fits = [(mb, g) for (mb, g), v in tried.items() if v <= budget]
    if fits:
        mb, g = max(fits, key=lambda t: (t[0] or 0, not t[1]))
        return MemoryFit(mb if mb_auto else None, g, tried[(mb, g)], budget, how)
    mb, g = sizes[-1], gcs[-1]
    least = tried.get((mb, g)) or peak(mb, g)
    setting = " with ".join(x for x in ((f"train.micro_batch_size={mb}" if mb_auto else ""),
                                         ("gradient checkpointing" if g else "")) if x) or "this recipe"
    need = math.ceil(least / GiB * 100) / 100
    raise ConfigError(f"train.memory_budget: nothing fits in {budget / GiB:.2f} GiB ({how}); the smallest setting, "
                      f"{setting}, plans {least / GiB:.2f} GiB (largest phase: {phase.get((mb, g), '?')}). Raise "
                      f"train.memory_budget to at least {need:.2f}GB, or lower the work per step (fewer generations, "
                      "shorter completions, smaller eval.batch_size, model.quantization=nf4 on a GPU"
                      + (", fewer model.gptq_rows" if phase.get((mb, g)) == "calibration" else "")
                      + "); `lowalign plan` shows where the memory goes")


# ---- fitting a budget --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'8GB', '7.5 GiB', '24g', '12000MB' -> bytes (GB and GiB both mean 2^30: cards are sold in GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"--gpu-memory: '{text}' is not a size like 8GB or 24GiB")
    return int(float(m.group(1)) * {"": GiB, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}[m.group(2)])


RESULT_PRESERVING = ("train.micro_batch_size", "model.gradient_checkpointing", "train.eval_batch_rows",
                     "eval.batch_size")  # memory and speed only: the same computation, up to float rounding


def preserves_results(change: str) -> bool:
    """Whether a suggestion (``key=value`` overrides, space-separated) changes only memory and speed."""
    return all(c.split("=")[0] in RESULT_PRESERVING for c in change.split())


def suggestions(cfg, budget: int, device: str, completion: int | None, world: int = 1) -> list[tuple[str, int]]:
    """Single changes (as ``key=value`` overrides) that bring the estimate under ``budget``, smallest change
    first; if none does alone, the first combination that does."""
    from lowalign.api import config_from_dict
    from lowalign.config import to_dict

    tc, names = cfg.train, set(vars(cfg.train))
    cands = []
    if "micro_batch_size" in names:
        B = tc.prompts_per_step * tc.num_generations if "num_generations" in names else tc.batch_size
        mb = tc.micro_batch_size if isinstance(tc.micro_batch_size, int) and tc.micro_batch_size else B
        cands += [f"train.micro_batch_size={m}" for m in (mb // 2, mb // 4, 2, 1) if 0 < m < mb and B % m == 0]
    if cfg.model.gradient_checkpointing is not True:
        cands.append("model.gradient_checkpointing=true")
    if cfg.model.quantization == "none" and device == "cuda":
        cands += ["model.quantization=int8", "model.quantization=nf4"]
    elif cfg.model.quantization == "int8":
        cands.append("model.quantization=nf4")
    if "num_generations" in names and tc.num_generations > 2:
        cands += [f"train.num_generations={g}" for g in (tc.num_generations // 2, 2) if g >= 2]
    if cfg.model.gptq_rows > 16:  # GPTQ's calibration texts are held as hidden states through every layer
        cands += [f"model.gptq_rows={n}" for n in (cfg.model.gptq_rows // 2, cfg.model.gptq_rows // 4) if n >= 16]
    if "max_new_tokens" in names and tc.max_new_tokens > 64:
        cands.append(f"train.max_new_tokens={tc.max_new_tokens // 2}")
    if "batch_size" in names and tc.batch_size > 1 and "micro_batch_size" not in names:
        cands += [f"train.batch_size={tc.batch_size // 2}", "train.batch_size=1"]
    if "eval_batch_rows" in names:
        cands.append(f"train.eval_batch_rows={max(1, tc.rows_per_call(device) // 4)}")
    ev = cfg.eval  # evaluation's greedy decoding is a phase of its own; a smaller batch only costs time
    if ev.num_examples and ev.batch_size > 1:
        cands += [f"eval.batch_size={b}" for b in dict.fromkeys((ev.batch_size // 2, ev.batch_size // 4, 1)) if b]
    base = to_dict(cfg)

    def estimate(overrides):
        try:
            c = config_from_dict(base, overrides)
        except ConfigError:
            return None
        return plan(c, device=device, completion=completion, world=world).on_card

    fits = [(o, e) for o in cands if (e := estimate([o])) is not None and e <= budget]
    if fits:  # those that leave the results alone first: a user short of memory should not change the task
        return sorted(fits, key=lambda f: not preserves_results(f[0]))[:4]

    def greedy(pool: list[str]) -> tuple[str, int] | None:  # add the change that lowers the estimate most
        combo: list[str] = []
        for _ in range(4):
            tried = [(e, o) for o in pool if o.split("=")[0] not in {c.split("=")[0] for c in combo}
                     and (e := estimate(combo + [o])) is not None]
            if not tried:
                return None
            fitting = [t for t in tried if t[0] <= budget]
            e, o = max(fitting) if fitting else min(tried)  # the mildest change that fits, else the strongest
            combo.append(o)
            if e <= budget:
                return " ".join(combo), e
        return None

    # combinations of changes that leave the results alone first, then any
    found = greedy([c for c in cands if c.split("=")[0] in RESULT_PRESERVING]) or greedy(cands)
    return [found] if found else []


def render(p: Plan, budget: int | None, fixes: list[tuple[str, int]] | None) -> str:
    lines = [*p.notes, ""]
    what = "torch.cuda.max_memory_allocated" if p.device == "cuda" else "peak RSS"
    lines.append(f"estimated peak memory on {p.device} ({what}):")
    for name, b, how in p.static:
        lines.append(f"  {name:<26}{b / MiB:>10.0f} MiB   {how}")
    top = p.peak_phase
    lines.append("  largest phase (only one phase's transients are alive at a time):")
    for name, b, how in sorted(p.phases, key=lambda t: -t[1]):
        mark = " <- peak" if name == top[0] else ""
        lines.append(f"    {name:<24}{b / MiB:>10.0f} MiB   {how}{mark}")
    lines.append(f"  {'total':<26}{p.peak / MiB:>10.0f} MiB")
    terms = [*p.static, top]
    big = max(terms, key=lambda t: t[1])
    lines.append(f"largest term: {big[0]} ({big[1] / MiB:.0f} MiB)")
    if p.device == "cuda":
        lines.append(f"on the card: {p.on_card / GiB:.2f} GiB (+{ALLOCATOR_SLACK:.0%} allocator slack, "
                     f"+{CUDA_CONTEXT / MiB:.0f} MiB CUDA context)")
    if budget is not None:
        ok = p.on_card <= budget
        lines.append(f"verdict: {'fits' if ok else 'does NOT fit'} in {budget / GiB:.1f} GiB "
                     f"({p.on_card / GiB:.2f} GiB needed)")
        if not ok:
            if fixes:
                lines.append("changes that make it fit (estimate on the card):")
                lines += [f"  {o}   -> {e / GiB:.2f} GiB"
                          + ("" if preserves_results(o) else "   (changes what the run computes)") for o, e in fixes]
            else:
                lines.append("no single change or combination tried here makes it fit: a smaller model, or fewer "
                             "tokens per step")
    return "\n".join(lines)
