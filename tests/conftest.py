import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from kvx.assets import assets_dir  # noqa: E402
from kvx.models import ModelConfig, load_model  # noqa: E402


@pytest.fixture(scope="session")
def assets():
    return assets_dir()


@pytest.fixture(scope="session")
def stories(assets):
    """(model, tokenizer) of the real stories260k Llama (GQA: 8 query heads, 4 KV heads)."""
    return load_model(ModelConfig(name_or_path=str(assets / "models" / "stories260k")))


@pytest.fixture(scope="session")
def random_gqa():
    """A randomly initialised Llama with a GQA ratio of 4 (no download)."""
    cfg = ModelConfig(random=True, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=128,
                      vocab_size=512, max_position_embeddings=512, seed=0)
    return load_model(cfg)


@pytest.fixture(scope="session")
def tiny_ids(stories, assets):
    """The first TinyStories tokens (BOS per document), as in the assets README recipe."""
    _, tok = stories
    ids = []
    with open(assets / "tinystories" / "validation_head.jsonl") as fh:
        for line in fh:
            ids += [tok.bos_token_id] + tok(json.loads(line)["text"], add_special_tokens=False).input_ids
            if len(ids) > 4000:
                break
    return ids


@pytest.fixture
def ref_backend():
    """kvx.kernels on the torch reference backend for one test, restored afterwards. A module takes it for all its
    tests with `pytestmark = pytest.mark.usefixtures("ref_backend")`."""
    from kvx import kernels

    saved = kernels.backend()
    kernels.set_backend("ref")
    yield
    kernels.set_backend(saved)
