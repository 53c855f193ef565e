"""README.md model cards for exported (merged) models, with Hugging Face front matter.

The front matter (YAML between ``---`` lines) is what the Hub reads:
``base_model`` (a list: the base and the merged models, as given),
``base_model_relation: merge`` (draws the model tree), ``library_name`` and
``tags``. It is written with PyYAML (``yaml.safe_dump``), so any string
round-trips through ``yaml.safe_load``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
import yaml

TAGS = ("merge", "sgtv-jax")


def plain(x: Any) -> Any:
    """`x` as plain YAML data: mappings as dicts (string keys), sequences as lists, paths and other objects as str."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.generic, np.ndarray)):
        return plain(x.tolist())
    return str(x) if isinstance(x, PurePath) else repr(x)


def yaml_text(data: Any) -> str:
    """`data` as block YAML, keys in their given order."""
    return yaml.safe_dump(plain(data), sort_keys=False, allow_unicode=True, default_flow_style=False)


def front_matter(
    base_model: str | None, models: Sequence[str], *, tags: Sequence[str] = (), license_: str | None = None
) -> dict[str, Any]:
    """The Hub's card metadata: `base_model` (base first, then the models, each once), relation, library, tags."""
    bases = list(dict.fromkeys([str(m) for m in ([base_model] if base_model else []) + list(models)]))
    meta: dict[str, Any] = {}
    if bases:
        meta["base_model"] = bases
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"  # the output is a transformers checkpoint (safetensors + config.json)
    meta["tags"] = list(dict.fromkeys([*TAGS, *(str(t) for t in tags)]))
    if license_:
        meta["license"] = str(license_)
    return meta


def render_model_card(card: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """Render a dict describing a merge into a Hugging Face README.md.

    Recognised keys (all optional): ``title``, ``method`` (e.g. 'ties+obs'),
    ``base_model`` (str), ``models`` (list of the merged fine-tunes),
    ``tags`` (beyond 'merge' and 'sgtv-jax'), ``summary`` (paragraphs of
    prose), ``merge_config`` (the merge YAML as given: shown as a YAML block
    to rerun), ``parameters`` (dict of method parameters, shown as YAML),
    ``description`` (free text), ``license``. Any other key is listed under
    "Details". `config`: the output's config.json (architecture, dtype).
    """
    card = dict(card)
    title = card.pop("title", "Merged model")
    method = card.pop("method", None)
    base = card.pop("base_model", None)
    models = [str(m) for m in card.pop("models", []) or []]
    tags = [str(t) for t in card.pop("tags", []) or []]
    summary = [str(p) for p in card.pop("summary", []) or []]
    merge_config = card.pop("merge_config", None)
    params = dict(card.pop("parameters", {}) or {})
    desc = card.pop("description", None)
    license_ = card.pop("license", None)

    meta = front_matter(base, models, tags=tags, license_=license_)
    lines = ["---", yaml_text(meta).rstrip("\n"), "---", "", f"# {title}", ""]
    if desc:
        lines += [str(desc), ""]
    lines += ["This model is a merge of fine-tuned models, made with sgtv-jax.", ""]
    for p in summary:
        lines += [p, ""]
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
    if merge_config is not None:
        lines += [
            "",
            "## Configuration",
            "",
            "The merge config as given: saved as `merge.yaml` beside the models it names, "
            "`sgtv merge merge.yaml OUT` reruns it.",
            "",
            "```yaml",
            yaml_text(merge_config).rstrip("\n"),
            "```",
        ]
    if params:
        lines += ["", "### Parameters", "", "```yaml", yaml_text(params).rstrip("\n"), "```"]
    if card:
        lines += ["", "### Details", ""] + [f"- **{k}:** {json.dumps(plain(v))}" for k, v in card.items()]
    return "\n".join(lines) + "\n"


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (`{}` when it has none): the inverse of `render_model_card`'s header."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}
    meta = yaml.safe_load(text[4:end])
    return dict(meta) if isinstance(meta, Mapping) else {}
