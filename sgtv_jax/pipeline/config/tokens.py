"""`tokenizer_source` / `tokenizer:` (the output vocabulary) and `chat_template`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from sgtv_jax.errors import short_repr
from sgtv_jax.pipeline.chat_templates import AUTO, CHAT_TEMPLATES
from sgtv_jax.pipeline.config import schema
from sgtv_jax.pipeline.config.checks import _path
from sgtv_jax.pipeline.config.model import TokenizerSpec, TokenSource


def _model_ref(v: Any, root: Path, where: str, problems: list[str]) -> str:
    """A model directory named by a tokenizer key (`model:` prefix allowed), resolved against `root`."""
    if isinstance(v, str) and v.startswith("model:"):
        v = v[len("model:") :]
    path = _path(v, root, where, problems)
    if path and not Path(path).is_dir():
        problems.append(f"{where}: model directory {short_repr(v)} not found")
    return path


def _token_source(tok: str, v: Any, root: Path, problems: list[str]) -> TokenSource | None:
    where = f"tokenizer.tokens[{tok!r}]"
    if not isinstance(v, Mapping):
        problems.append(f"{where} must be a mapping with 'source' (and 'force'), got {short_repr(v)}")
        return None
    force = v.get("force", False) is True  # a non-boolean: the schema's problem (TokenYaml)
    src = v.get("source")
    if src is None:
        return TokenSource("default", force=force)
    if isinstance(src, str):
        return TokenSource("model", _model_ref(src, root, f"{where}.source", problems), src, force=force)
    if not isinstance(src, Mapping) or src.get("kind") not in ("zero", "model_token"):
        problems.append(
            f"{where}.source must be a model path, {{kind: zero}} or {{kind: model_token, model: path, "
            f"token: str | token_id: int}}, got {short_repr(src)}"
        )
        return None
    if src["kind"] == "zero":
        return TokenSource("zero", force=force)
    token, token_id = src.get("token"), src.get("token_id")
    if (token is None) == (token_id is None):
        problems.append(f"{where}.source: give exactly one of 'token' and 'token_id'")
    elif token is not None and not isinstance(token, str):
        problems.append(f"{where}.source.token must be a string, got {short_repr(token)}")
    elif token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        problems.append(f"{where}.source.token_id must be an integer >= 0, got {short_repr(token_id)}")
    model = src.get("model")
    return TokenSource(
        "model_token",
        _model_ref(model, root, f"{where}.source.model", problems),
        model if isinstance(model, str) else "",
        token=token if isinstance(token, str) else None,
        token_id=token_id if isinstance(token_id, int) and not isinstance(token_id, bool) else None,
        force=force,
    )


def _tokenizer(raw: Mapping[str, Any], root: Path, problems: list[str]) -> TokenizerSpec | None:
    """`tokenizer_source` (union | base | a model path, `model:` prefix allowed) or the `tokenizer:` block."""
    legacy, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if legacy is not None and block is not None:
        problems.append("give either tokenizer_source or tokenizer (its 'source' key), not both")
        return None
    if block is None and legacy is None:
        return None
    if block is None:
        block = {"source": legacy}
        where = "tokenizer_source"
    else:
        where = "tokenizer.source"
        if not isinstance(block, Mapping):
            problems.append(
                f"tokenizer must be a mapping with source / tokens / pad_to_multiple_of, got {short_repr(block)}"
            )
            return None
    src = block.get("source", "union")
    if not isinstance(src, str) or not src:
        problems.append(f"{where} must be 'union', 'base' or a model path, got {short_repr(src)}")
        return None
    source = src if src in ("union", "base") else _model_ref(src, root, where, problems)
    tokens_raw = block.get("tokens") or {}
    tokens: dict[str, TokenSource] = {}
    if not isinstance(tokens_raw, Mapping):
        problems.append(
            f"tokenizer.tokens must be a mapping of token -> {{source, force}}, got {short_repr(tokens_raw)}"
        )
    else:
        for tok, v in tokens_raw.items():
            if not isinstance(tok, str) or not tok:
                problems.append(f"tokenizer.tokens: a token must be a non-empty string, got {short_repr(tok)}")
                continue
            if (ts := _token_source(tok, v, root, problems)) is not None:
                tokens[tok] = ts
    pad = schema.settled(schema.TokenizerYaml, block).pad_to_multiple_of  # a bad one: the schema's problem
    return TokenizerSpec(source, src, tokens, pad)


def _chat_template(v: Any, problems: list[str]) -> str | None:
    """The Jinja text of `chat_template` (a name of `chat_templates.CHAT_TEMPLATES`, `auto`, or Jinja)."""
    if v is None:
        return None
    if not isinstance(v, str):
        problems.append(f"chat_template must be a template name or Jinja text, got {short_repr(v)}")
        return None
    if v == AUTO or v in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(v, v)
    if len(v) < 20 or "{" not in v:
        problems.append(
            f"chat_template {short_repr(v)} is neither a known template (auto, {', '.join(CHAT_TEMPLATES)}) "
            "nor Jinja text"
        )
        return None
    try:
        jinja2.Environment().parse(v)
    except jinja2.TemplateSyntaxError as e:
        problems.append(f"chat_template is not valid Jinja (line {e.lineno}): {e.message}")
        return None
    return v
