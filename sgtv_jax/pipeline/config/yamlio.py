"""Reading a merge YAML: UTF-8, PyYAML's safe loader without aliases, errors naming file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sgtv_jax.pipeline.config.model import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases (`*name`): no alias bomb can expand.

    mergekit configs never need anchors; refusing aliases bounds the loaded
    size by the file's size.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise ConfigError(
                f"{self.name}:{ev.start_mark.line + 1}: YAML alias '*{str(ev.anchor)[:40]}' "
                "refused (aliases/anchors are not supported in merge configs; write the value out)"
            )
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: Any) -> Any:
        """An integer too long for Python's str -> int limit is a ConfigError naming the line, not a traceback."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise ConfigError(
                f"{self.name}:{node.start_mark.line + 1}: an integer of {len(str(node.value))} digits "
                "(more than Python converts); no setting needs that many"
            ) from None


_NoAliasLoader.add_constructor("tag:yaml.org,2002:int", _NoAliasLoader.construct_yaml_int)


def read_yaml(path: str | Path) -> Any:
    """The YAML document of `path` (UTF-8, no aliases); ConfigError naming the file and line."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    loader = _NoAliasLoader(text)
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    finally:
        loader.dispose()
