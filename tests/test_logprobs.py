"""Model-level log-probs: right values, and the lm_head module is never run (no full-vocabulary logits)."""

import pytest
import torch

from lowalign.bundle import ModelBundle
from lowalign.config import LoraConfig, ModelConfig
from lowalign.generation import encode_completions
from lowalign.logprobs import token_logprobs


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_token_logprobs_never_call_lm_head(impl):
    b = ModelBundle.load(ModelConfig(logprob_impl=impl))
    b.add_adapter("policy", LoraConfig(r=4))
    calls = []
    b.base.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    batch = encode_completions(b.tokenizer, ["Q: 1+2= A:", "Q: 10+25= A:"], ["3", "35"], b.device)
    with b.use("policy"):
        out = token_logprobs(b, batch.input_ids, batch.attention_mask, batch.target_mask, with_entropy=True,
                             temperature=0.8)
        out.logps.sum().backward()
    assert not calls  # the training path reads lm_head.weight; it never builds [tokens x vocab] logits
    lora_b = [p for n, p in b.base.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with torch.no_grad(), b.use("policy"):
        pos = (batch.attention_mask.cumsum(-1) - 1).masked_fill(batch.attention_mask == 0, 1)
        logits = b.causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=pos).logits / 0.8
    assert calls  # (the hook works)
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    m = batch.target_mask[:, 1:].bool()
    torch.testing.assert_close(out.logps[:, 1:][m], want[m], rtol=1e-5, atol=1e-5)
    assert (out.logps[:, 1:][~m] == 0).all() and (out.entropy[:, 1:][m] > 0).all()
