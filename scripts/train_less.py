"""Train LESS's feature maps (Dong et al., 2024) for one model and one eviction policy.

    python scripts/train_less.py model=llama2-7b method=h2o method.budget=0.05 train_data=c4
    python scripts/train_less.py method.budget=64 train_data=tinystories hidden=64 n_sequences=128 epochs=10

See configs/train_less.yaml for every field; the kernels folder it writes (out_dir) is method=less's `kernels`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvx.config  # noqa: E402,F401  (registers the ${kvx.assets:} resolver)
from kvx.errors import KVXError  # noqa: E402


@hydra.main(config_path="../configs", config_name="train_less", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from kvx.less_train import summarize, train_less

    try:
        print(summarize(train_less(cfg)))
    except KVXError as e:
        raise SystemExit(f"kvx: error: {e}") from None


if __name__ == "__main__":
    main()
