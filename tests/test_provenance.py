"""The kvx source digest: what it covers, that every run records it, that any change to the source changes it."""

import hashlib
import shutil

from kvx.provenance import PACKAGE, source_digest
from kvx.runner import environment


def test_digest_is_sha256_over_the_sorted_sources(tmp_path):
    root = tmp_path / "kvx"
    (root / "sub").mkdir(parents=True)
    (root / "b.py").write_text("b = 1\n")
    (root / "sub" / "a.py").write_text("a = 1\n")
    (root / "notes.txt").write_text("not source\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "c.py").write_text("ignored\n")
    h = hashlib.sha256(b"b.py\0b = 1\n\0sub/a.py\0a = 1\n\0").hexdigest()
    assert source_digest(root) == h
    (root / "sub" / "a.py").write_text("a = 2\n")
    assert source_digest(root) != h


def test_every_run_records_the_digest_of_the_source_it_runs(tmp_path):
    env = environment("cpu")
    assert env["kvx_source_digest"] == source_digest() == source_digest(PACKAGE)
    copy = tmp_path / "kvx"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == env["kvx_source_digest"]  # where the checkout lives does not matter
