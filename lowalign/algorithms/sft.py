"""Supervised fine-tuning of the policy adapter on (prompt, answer) rows: mean token NLL of the answer
(+ EOS), computed through the fused log-prob path (no full-vocabulary logits)."""

from __future__ import annotations

from lowalign.algorithms import register
from lowalign.algorithms.common import (
    add_policy,
    end_step,
    finish,
    make_optimizer,
    optimizer_step,
    start_or_resume,
    step_seed,
)
from lowalign.algorithms.configs import SFTConfig
from lowalign.generation import encode_completions
from lowalign.logprobs import token_logprobs
from lowalign.runtime import Progress, seed_everything

POLICY = "policy"


def check_data(cfg, data) -> None:
    if data.train_rows is not None and data.train_rows and "answer" not in data.train_rows[0]:
        from lowalign.data import DataError

        raise DataError(f"data: SFT trains on the answers, and the data has no '{cfg.data.answer_column}' column "
                        f"(columns: {sorted(data.train_rows[0])}); set data.answer_column")


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    add_policy(ctx)
    params = bundle.adapter_parameters(POLICY)
    opt, sched = make_optimizer(params, tc.optim, tc.steps)
    start, baseline = start_or_resume(ctx, [POLICY], opt, sched)
    bundle.base.train()
    d = ctx.dist
    with Progress(tc.steps, start, ("loss", "token_acc"), desc="sft", every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            seed_everything(step_seed(cfg.seed, step))
            rows = d.shard(ctx.data.batch(step, tc.batch_size, cfg.seed))  # this rank's share of the batch
            b = encode_completions(bundle.tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                                   bundle.device)
            with bundle.use(POLICY):
                out = token_logprobs(bundle, b.input_ids, b.attention_mask, b.target_mask)
            P = b.prompt_ids.shape[1]
            lp, m = out.logps[:, P:], b.completion_mask.float()
            n_tokens = d.sum(m.sum()).clamp(min=1.0)  # the token mean is over every rank's answer tokens
            loss = -(lp * m).sum() / n_tokens
            loss.backward()
            gn = optimizer_step(d, params, opt, sched, tc.optim.max_grad_norm)
            hits = ((lp.detach() > -0.6931).float() * m).sum() / n_tokens  # p > 1/2
            metrics = {"step": step + 1, "loss": d.sum(loss.item()), "grad_norm": float(gn),
                       "lr": sched.get_last_lr()[0], "token_acc": d.sum(hits.item())}
            end_step(ctx, tc, step + 1, metrics, bar, [POLICY], baseline, opt, sched)
    return finish(ctx, [POLICY], baseline, {"steps": tc.steps})


register("sft", SFTConfig, train, check_data=check_data, shards="batch_size")
