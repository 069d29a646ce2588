"""kvx: KV-cache compression for LLM inference. `kvx.load(model, method, **fields)` gives a Pipeline (kvx/api.py)."""

__version__ = "0.1.0"


def _register_lm_eval_model() -> None:
    """`lm_eval.simple_evaluate(model="kvx", ...)` works after `import kvx`: a lazy entry in lm-eval's model registry
    (kvx.tasks.harness loads on first use; importing the registry alone takes about 30 ms and no torch)."""
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own lazy entries: "hf" and the others)
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval not installed: kvx runs without its harness tasks
        return
    if "kvx" not in model_registry:
        model_registry.register("kvx", target="kvx.tasks.harness:KVXLM")


_register_lm_eval_model()


def __getattr__(name: str):
    if name in ("load", "Pipeline"):  # imported on first use: `import kvx` stays light
        from kvx import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvx' has no attribute {name!r}")
