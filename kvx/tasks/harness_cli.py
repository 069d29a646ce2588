"""lm-eval's command line with the "kvx" model available:

    python -m kvx.tasks.harness_cli --model kvx --model_args model=llama2-7b,method=streaming_llm,budget=256 \\
        --tasks hellaswag,piqa
    kvx-lm-eval --model kvx --model_args model=stories260k,method=h2o,budget=64 \\
        --include_path kvx/tasks/lm_eval_tasks --tasks hellaswag_local --limit 20      # offline: the assets' copy

(the `lm_eval` command itself only discovers the models lm-eval ships; this takes the same arguments)."""

from __future__ import annotations

import sys

OFFLINE_HINT = ("without the hub, point a task at local files: a task YAML with `dataset_path: json` and "
                "`dataset_kwargs: {data_files: ...}`, e.g. --include_path kvx/tasks/lm_eval_tasks --tasks hellaswag_local")


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import kvx  # noqa: F401  (registers the "kvx" model)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ConnectionError as e:  # datasets could not reach the hub
        raise SystemExit(f"[kvx-lm-eval] {e}; {OFFLINE_HINT}") from e


if __name__ == "__main__":
    main()
