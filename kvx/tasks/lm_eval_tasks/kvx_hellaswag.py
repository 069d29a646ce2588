"""process_docs of hellaswag_local.yaml: lm-eval's HellaSwag documents from the hub's or the assets' rows."""

from kvx.tasks.harness import hellaswag_docs as process_docs  # noqa: F401
