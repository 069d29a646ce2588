"""Load a causal LM and its tokenizer: hub id, local folder, GGUF file, or a randomly initialised Llama."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvx.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def name_from_path(path: str) -> str:
    """The label results are filed under when none is given: a folder's or file's name (`.gguf` dropped), or a hub
    id's repository name (`meta-llama/Llama-2-7b-hf` -> `Llama-2-7b-hf`)."""
    base = str(path).rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def model_name(path: str, own_path: str | None = None, own_name: str | None = None) -> str:
    """configs/model/*.yaml: `name: ${kvx.model_name:${.name_or_path},<own path>,<own name>}` is the file's own
    label while the path is its own, and the path's name once `model.name_or_path` is overridden."""
    if own_name is not None and str(path) == str(own_path):
        return str(own_name)
    return name_from_path(path)


@dataclass
class ModelConfig:
    """configs/model/*.yaml. `name` labels results (default: derived from `name_or_path`); `name_or_path` is a hub id,
    a folder or a .gguf file."""

    name: str = ""
    name_or_path: str = ""
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | auto
    device_map: str | None = None  # e.g. "auto": accelerate spreads a large model over the GPUs
    trust_remote_code: bool = False
    tokenizer: str | None = None  # defaults to name_or_path
    gguf_file: str | None = None
    revision: str | None = None
    # random: a randomly initialised Llama built from these fields, no download
    random: bool = False
    seed: int = 0
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 688
    vocab_size: int = 32000
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "random" if self.random else name_from_path(self.gguf_file or self.name_or_path)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError("model.device", f"must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.random:
            if self.num_heads % self.num_kv_heads:
                raise ConfigError("model.num_kv_heads", f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
            if self.hidden_size % self.num_heads:
                raise ConfigError("model.hidden_size", f"must be a multiple of num_heads={self.num_heads}")
        elif not self.name_or_path:
            raise ConfigError("model.name_or_path", "is empty: give a hub id, a local folder or a .gguf file")
        elif os.path.isdir(self.name_or_path) and not self.gguf_file \
                and not os.path.isfile(os.path.join(self.name_or_path, "config.json")):
            raise ConfigError("model.name_or_path", f"{self.name_or_path} has no config.json: not a Hugging Face model "
                                                    "folder (config.json, tokenizer and weights)")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{device!r} asked for but CUDA is not available on this machine")
    return device


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    tok.model_max_length = 10**9  # the engine checks positions against the model's context itself
    return tok


def build_random(cfg: ModelConfig, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    conf._attn_implementation = "sdpa"
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(conf)
    dt = DTYPES[cfg.dtype]
    return model.to(device=device, dtype=torch.float32 if dt == "auto" else dt)


def load_model(cfg: ModelConfig):
    """Returns (model, tokenizer). The model is in eval mode on the configured device."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.random:
        from kvx.assets import assets_dir

        tok_path = cfg.tokenizer or str(assets_dir() / "models" / "stories260k")
        return build_random(cfg, device), load_tokenizer(tok_path)
    from transformers import AutoModelForCausalLM

    path, gguf_file = cfg.name_or_path, cfg.gguf_file
    if path.endswith(".gguf"):
        p = Path(path)
        path, gguf_file = str(p.parent), p.name
    local = os.path.exists(path)
    if not local and (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]):
        raise ConfigError("model.name_or_path", f"local model folder {path!r} does not exist")
    kw: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.dtype != "auto":
        kw["dtype"] = DTYPES[cfg.dtype]
    else:
        kw["dtype"] = "auto"
    if cfg.revision:
        kw["revision"] = cfg.revision
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if cfg.device_map:
        kw["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw)
    except OSError as e:
        raise ConfigError(
            "model.name_or_path", f"cannot load {cfg.name_or_path!r}: not a local folder and not reachable on the hub ({e})"
        ) from e
    if not cfg.device_map:
        model = model.to(device)
    tok = load_tokenizer(cfg.tokenizer or path, cfg.trust_remote_code, cfg.revision, None if cfg.tokenizer else gguf_file)
    return model.eval(), tok
