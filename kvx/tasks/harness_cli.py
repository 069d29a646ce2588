"""lm-eval's command line with the "kvx" model available:

    python -m kvx.tasks.harness_cli --model kvx --model_args model=llama2-7b,method=streaming_llm,budget=256 \\
        --tasks hellaswag,piqa

(the `lm_eval` command itself only discovers the models lm-eval ships; this takes the same arguments)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import kvx.tasks.harness  # noqa: F401  (registers the "kvx" model)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
