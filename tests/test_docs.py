"""The documentation: every page in the site's navigation, every config key in the generated reference with its
help, the method's specification inside the repository, and a README that stays a front door."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import yaml

from fedafd.runtime.config import ClientConfig, ServerConfig, help_for

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_every_navigation_entry_is_a_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))


def test_the_configuration_reference_lists_every_key_with_its_help() -> None:
    hooks = _hooks()
    page = (DOCS / "configuration.md").read_text()
    rendered = hooks.on_page_markdown(page)
    for cls in (ServerConfig, ClientConfig):
        assert f"<!-- config-reference: {cls.__name__} -->" in page
        docs = help_for(cls)
        for field in dataclasses.fields(cls):
            assert docs.get(field.name), f"{cls.__name__}.{field.name} has no one-line help"
            assert f"| `{field.name}` |" in rendered, f"{cls.__name__}.{field.name} is not in the reference"
    assert "<!-- config-reference" not in rendered


def test_the_specification_is_in_the_repository_and_every_citation_points_there() -> None:
    assert (DOCS / "method.md").read_text().startswith("# FedAFD: the method this project implements")
    outside = []
    for path in ROOT.rglob("*"):
        if path.suffix in (".py", ".md", ".toml", ".sh", ".yml") and not {".venv", "site", "runs"} & set(path.parts):
            text = path.read_text(errors="ignore")
            # The code cites the specification as docs/method.md; nothing points outside the repository.
            if "../shared" in text or (path.suffix == ".py" and re.search(r"(?<![/\w])method\.md", text)):
                outside.append(str(path.relative_to(ROOT)))
    assert not [p for p in outside if p != "tests/test_docs.py"], outside


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "bash setup.sh" in first_screen and "pytest -q" in first_screen
    for command in ("fedafd-cloud serve", "fedafd-edge join", "fedafd-cloud simulate", "fedafd-edge export",
                    "fedafd-edge infer", "fedafd-cloud profile", "fedafd-cloud report"):
        assert command in readme, command
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
