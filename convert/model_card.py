"""README.md model cards for exported (merged) models."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def _yaml_scalar(v: Any) -> str:
    # A JSON string is a valid YAML scalar and quotes anything ambiguous.
    return json.dumps(str(v))


def render_model_card(card: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """Render a dict describing a merge into a Hugging Face README.md.

    Recognised keys (all optional): ``title``, ``method`` (e.g. 'ties+obs'),
    ``base_model`` (str), ``models`` (list of the merged fine-tunes),
    ``parameters`` (dict of method parameters), ``description`` (free text),
    ``license``. Any other key is listed under "Details".
    """
    card = dict(card)
    title = card.pop("title", "Merged model")
    method = card.pop("method", None)
    base = card.pop("base_model", None)
    models = list(card.pop("models", []) or [])
    params = dict(card.pop("parameters", {}) or {})
    desc = card.pop("description", None)
    license_ = card.pop("license", None)

    front = ["---", "library_name: transformers", "tags:", "- merge", "- sgtv-jax"]
    if base:
        front.append(f"base_model: {_yaml_scalar(base)}")
    if license_:
        front.append(f"license: {_yaml_scalar(license_)}")
    front.append("---")

    lines = front + ["", f"# {title}", ""]
    if desc:
        lines += [str(desc), ""]
    lines += [
        "This model was produced by merging fine-tuned models with "
        "sgtv-jax (task vectors pruned with SparseGPT-style OBS).",
        "",
    ]
    lines += ["## Merge details", ""]
    if method:
        lines.append(f"- **Method:** `{method}`")
    if base:
        lines.append(f"- **Base model:** `{base}`")
    if config and config.get("model_type"):
        lines.append(f"- **Architecture:** `{config['model_type']}`")
    if config and config.get("dtype"):
        lines.append(f"- **Weights dtype:** `{config['dtype']}`")
    if models:
        lines += ["", "### Models merged", ""] + [f"- `{m}`" for m in models]
    if params:
        lines += ["", "### Parameters", "", "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in params.items()]
    if card:
        lines += ["", "### Details", ""] + [f"- **{k}:** {json.dumps(v)}" for k, v in card.items()]
    return "\n".join(lines) + "\n"
