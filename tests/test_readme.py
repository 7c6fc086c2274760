"""The README's Python examples run as written (x-transformers' test_readme idea)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show Python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["y1"].shape == (2, 1, 512)


ROOT = README.parent


def test_no_jargon_or_links_outside_the_repository():
    """A reader of the package has only the repository: no team shorthand, no links to files outside it."""
    texts = {p: p.read_text() for p in [README, *ROOT.glob("configs/*.yaml"), *ROOT.glob("docs/*.md")]}
    for path, text in texts.items():
        for word in ("VIO", "seed 001", "seed 004", "Phase-4", "Phase 4", "../shared", "/work/shared"):
            assert word not in text, f"{path.name} says {word!r}"
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), (
                    f"{path.name} links to {target}, not in the repository"
                )


def test_readme_documents_every_train_key():
    import dataclasses

    from vermeil.train.config import TrainConfig

    text = README.read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in text]
    assert not missing, f"README.md does not document train.{missing}"


def test_readme_compile_claim_says_for_which_lengths():
    text = README.read_text()
    assert "about 3x faster" not in text
    assert "pays off from about" in text and "tokens per process" in text
