"""mkdocs hook: the configuration reference is generated from the config classes at build time, so it cannot
drift from the code. A page writes `<!-- config-reference: ServerConfig -->` (or ClientConfig) where the table goes."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"<!-- config-reference: (ServerConfig|ClientConfig) -->")


def config_table(name: str) -> str:
    """Every key of the config class: its type, default and one-line help, in field order."""
    from fedafd.runtime import config

    rows = ["| key | type | default | what it sets |", "|---|---|---|---|"]
    for key, field in config.describe_config(getattr(config, name)).items():
        default = repr(field["default"]) if field["default"] != "" else '""'
        help_text = field["help"].replace("|", "\\|")
        rows.append(f"| `{key}` | {field['type']} | `{default}` | {help_text} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return PLACEHOLDER.sub(lambda m: config_table(m.group(1)), markdown)
