"""The docs' generated parts, read from the code at build time so they cannot drift.

An mkdocs hook (``mkdocs.yml``: ``hooks``): a page line ``<!-- sgtv: methods -->``
becomes the text ``sgtv methods`` prints (``describe_methods``, read from the one
method table), and ``<!-- sgtv: config-keys -->`` one table per config level
whose rows are the keys the config accepts (the fields of the declared pydantic
models in ``sgtv_jax.pipeline.config.schema``). Each key's description is written here; a key the
parser accepts without one, or one described that it no longer accepts, fails
the build (and ``tests/cli/test_readme.py``).
"""

from __future__ import annotations

import re
from typing import Any

from sgtv_jax.merge.cli import describe_methods
from sgtv_jax.pipeline.config import schema

# (heading, name of the declared model in sgtv_jax.pipeline.config.schema, {key: description})
KEY_DOCS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (
        "Top level",
        "MergeYaml",
        {
            "models": "the fine-tuned models: a list of `{model, parameters, calibration}` (below); "
            "`model: BASE+ADAPTER` applies a PEFT LoRA adapter on read",
            "merge_method": "the method's name (the table below; `sgtv methods`)",
            "base_model": "the model the task vectors are taken from (optional for `linear` and the interpolations, "
            "as in mergekit)",
            "parameters": "every model's default per-model parameters, and the method's parameters (below)",
            "dtype": "the output dtype: `bfloat16` / `bf16`, `float16` / `fp16`, `float32` / `fp32` "
            "(default: the base's); the merge arithmetic is float32",
            "tokenizer_source": "the output vocabulary: `base`, `union` (the base's plus every token another model "
            "has), or a model's path (`model:PATH` too). Data-free merges re-index embeddings and heads; a "
            "calibrated merge needs the vocabulary unchanged",
            "trim": "how task vectors are trimmed: `magnitude`, `random`, `magprune`, `breadcrumbs`, `wanda`, "
            "`sparsegpt` (the last two need calibration data), or filter rules `[{filter, value}]`",
            "calibration": "the calibration text: `data` (text / JSONL file or list), `nsamples` (128), `seqlen` "
            "(512), `seed`, `text_field` (below); also per model",
            "hessian_source": "whose inputs build the Hessians: `base`, `per_task`, `merged` (default; the "
            "merged-so-far model, block by block) or `per_task_merged`",
            "blocksize": "OBS columns per block (default 128)",
            "percdamp": "OBS damping, a fraction of the mean Hessian diagonal (default 0.01)",
            "prunen": "N of N:M semi-structured OBS trimming (with `prunem`; default 0: unstructured)",
            "prunem": "M of N:M semi-structured OBS trimming",
            "refit": "least-squares refit of the entries OBS kept (default false)",
            "seed": "the seed of random trims, calibration windows and learning steps (default 0)",
            "batch_size": "calibration windows per device and step (default 8)",
            "max_shard_size": "the output's safetensors shard size (default `5GB`)",
            "memory_budget": "data-free merges: a tensor needing more working memory is merged in row chunks "
            "(default `256MiB`; same bits)",
            "moe_min_tokens": "MoE: the fewest routed calibration tokens for an expert's own Hessian "
            "(default: the hidden size)",
            "slices": "mergekit slices: output layers from layer ranges of several models (below)",
            "tokenizer": "`{source, tokens, pad_to_multiple_of}`: the vocabulary with per-token sources (below)",
            "chat_template": "`chatml`, `llama3`, `alpaca`, `mistral`, `auto` or Jinja text, written into "
            "tokenizer_config.json",
            "out_dtype": "the output dtype when `dtype` names the compute dtype (mergekit's key)",
            "devices": "the device mesh of a calibrated merge: `all` (default) or a count",
            "hessian_accumulation": "the dtype of per-device partial Hessian sums: `float32` (default) or `float64`",
        },
    ),
    (
        "`models[i]`",
        "ModelYaml",
        {
            "model": "the model's directory or checkpoint (relative to the YAML), or `BASE+ADAPTER`",
            "parameters": "this model's per-model parameters (`weight`, `density`, ...: `sgtv methods`)",
            "calibration": "this model's own calibration data (`per_task` / `per_task_merged` only); unset keys "
            "come from the top-level `calibration`",
        },
    ),
    (
        "`calibration`",
        "CalibrationYaml",
        {
            "data": "a text or JSONL file, or a list of them (relative to the YAML)",
            "nsamples": "calibration windows (default 128)",
            "seqlen": "tokens per window (default 512)",
            "seed": "which windows are drawn",
            "text_field": "the JSONL field holding the text (default `text`)",
        },
    ),
    (
        "`slices[i]`",
        "SliceYaml",
        {
            "sources": "the models and layer ranges this slice's layers are made from",
            "base_model": "this slice's base (one of its sources)",
            "parameters": "parameters for this slice's layers (a source's own come first, the top level's last)",
        },
    ),
    (
        "`slices[i].sources[j]`",
        "SourceYaml",
        {
            "model": "the model",
            "layer_range": "`[start, stop)` of its layers",
            "parameters": "parameters of this source",
        },
    ),
    (
        "`tokenizer`",
        "TokenizerYaml",
        {
            "source": "as `tokenizer_source`",
            "tokens": "`{token: {source, force}}`: where a token's embedding row comes from",
            "pad_to_multiple_of": "pad the vocabulary to a multiple of this",
        },
    ),
    (
        "`tokenizer.tokens[t]`",
        "TokenYaml",
        {
            "source": "a model's path, or `{kind: zero}` for a zero row",
            "force": "use this source even where the model that has the token could give it",
        },
    ),
)

MARKER = re.compile(r"^<!--\s*sgtv:\s*(?P<what>[\w-]+)\s*-->[ \t]*$", re.M)


def undocumented() -> list[str]:
    """Keys the parser accepts without a description here, and descriptions of keys it does not accept."""
    out = []
    for heading, attr, docs in KEY_DOCS:
        accepted = schema.keys(getattr(schema, attr))
        out += [
            f"{heading}: `{k}` is accepted but not described in docs/_gen/reference.py"
            for k in accepted
            if k not in docs
        ]
        out += [
            f"{heading}: `{k}` is described but not accepted by the config parser" for k in docs if k not in accepted
        ]
    return out


def config_keys_markdown() -> str:
    """One table per config level, rows in the parser's order."""
    problems = undocumented()
    if problems:
        raise ValueError("the YAML reference is out of date: " + "; ".join(problems))
    parts = []
    for heading, attr, docs in KEY_DOCS:
        rows = [f"| `{k}` | {docs[k]} |" for k in schema.keys(getattr(schema, attr))]
        parts.append(f"### {heading}\n\n| key | meaning |\n| --- | --- |\n" + "\n".join(rows))
    return "\n\n".join(parts)


def methods_markdown() -> str:
    """What `sgtv methods` prints, as a text block."""
    return "```text\n" + describe_methods() + "\n```"


GENERATORS = {"methods": methods_markdown, "config-keys": config_keys_markdown}


def expand(markdown: str) -> str:
    """`markdown` with every `<!-- sgtv: NAME -->` line replaced by its generated text."""

    def one(m: re.Match[str]) -> str:
        what = m.group("what")
        if what not in GENERATORS:
            raise ValueError(f"unknown generated section {what!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[what]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs hook."""
    return expand(markdown)
