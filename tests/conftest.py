import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF conversions (the real models) once per checkout, shared by the test workers and the CLI runs they start
os.environ.setdefault("LOWALIGN_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lowalign"))
# The CLI runs and notebook kernels the tests start: one intra-op thread each. Two test workers on two cores with
# two OpenMP threads per run spin-wait on each other (a notebook measured 5x slower than alone). This process
# imported torch above its own thread count, set below.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.set_num_threads(2)


def _save_random(tmp_path_factory, name, cfg_cls, **kw):
    from lowalign.tiny import byte_tokenizer

    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None, **kw)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random-weight Llama config saved as a local model directory."""
    from transformers import LlamaConfig

    return _save_random(tmp_path_factory, "llama", LlamaConfig, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A tiny random-weight Qwen2 config (tied embeddings, qkv bias) saved locally."""
    from transformers import Qwen2Config

    return _save_random(tmp_path_factory, "qwen2", Qwen2Config, tie_word_embeddings=True)


# The modules with the longest tests (a clean clone's `bash scripts/test.sh --durations=50`: real models, notebooks,
# GGUF conversion, two-process runs, measured memory peaks), collected first. scripts/test.sh runs the workers with
# `--dist worksteal`, where an idle worker takes half of the other's queue: long tests first end the run on short
# ones instead of one worker finishing a notebook while the other idles.
SLOW_FIRST = ("test_real_models.py", "test_notebooks.py", "test_gguf.py", "test_data_parallel.py", "test_planner.py",
              "test_kl.py", "test_essa.py", "test_exporter.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: modules stay in order
