"""The repository's own documents: what the code cites exists, and the extras it names are real."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
SOURCES = [p for folder in ("pure_lite", "runtime", "export", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py")]
DOCS = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]


def _extras() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_every_cited_document_ships_with_the_repository():
    cited = {m for p in SOURCES + DOCS for m in re.findall(r"\bdocs/[\w.-]+\.md\b", p.read_text())}
    assert "docs/pure-format.md" in cited
    assert [c for c in cited if not (ROOT / c).is_file()] == []
    # SPEC.md lives outside the repository: nothing may send a reader there.
    assert [p.name for p in SOURCES + DOCS if re.search(r"\bSPEC\b", p.read_text())] == []


def test_every_extra_an_error_message_names_exists():
    named = {m for p in SOURCES for m in re.findall(r"pure-lite\[([\w-]+)\]", p.read_text())}
    assert {"torch", "runtime", "gpu", "eval"} <= named
    assert named - set(_extras()) == set()


def test_gpu_extra_brings_cupy_and_eval_extra_the_degradation_pipeline():
    extras = _extras()
    assert any(req.startswith("cupy-cuda12x") for req in extras["gpu"])
    assert {"opencv-python-headless", "scipy", "scikit-image"} <= {re.split(r"[<>=]", r)[0] for r in extras["eval"]}


def test_license_file_is_the_apache_license_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text


def test_readme_says_where_the_real_model_comes_from():
    readme = (ROOT / "README.md").read_text()
    for fact in ("arXiv 2503.11073", "nonwhy/PURE", "vq_ds8_c2i.pt", "convert_vq", "## GPU quick start"):
        assert fact in readme, fact


PACKAGE_DIRS = {"pure_lite": ROOT / "pure_lite", "pure_lite.export": ROOT / "export", "pure_lite.runtime": ROOT / "runtime"}


def _stale_dotted(name: str) -> bool:
    """Whether a dotted name under ``pure_lite`` names no module: walk packages while a part is a submodule; the first part
    that is not must be a name the package's ``__init__`` defines (an attribute such as ``pure_lite.Restorer``)."""
    parts, package = name.split("."), ROOT / "pure_lite"
    for i, part in enumerate(parts[1:], start=1):
        prefix = ".".join(parts[:i + 1])
        folder = PACKAGE_DIRS.get(prefix, package / part)
        if (folder / "__init__.py").is_file():
            package = folder
        elif (package / f"{part}.py").is_file():
            return False  # a module: what follows is an attribute of it
        else:
            return not re.search(rf"\b{re.escape(part)}\b", (package / "__init__.py").read_text())
    return False


def test_no_document_or_source_names_a_module_that_does_not_exist():
    """Module paths and dotted names cited anywhere (code, tests, docs) resolve: a moved module leaves no stale name."""
    texts = {p: p.read_text() for p in SOURCES + DOCS + sorted((ROOT / "tests").glob("*.py"))}
    paths = {m for t in texts.values()
             for m in re.findall(r"\b(?:pure_lite|export|runtime|benchmarks|tests|examples)/[\w/]*\w\.py\b", t)}
    assert paths and [p for p in sorted(paths) if not (ROOT / p).is_file()] == []
    dotted = {m for t in texts.values() for m in re.findall(r"\bpure_lite(?:\.[A-Za-z_]\w*)+", t)}
    assert "pure_lite.torch_backend.load" in dotted
    assert [d for d in sorted(dotted) if _stale_dotted(d)] == []
