"""Load a config from YAML with ``base:`` inheritance and ``key=value`` overrides.

Order of application: the ``base:`` chain (deep-merged, the child wins), the
file itself, then the command-line overrides. Relative paths written as
``./x`` or ``../x`` are taken relative to the file that holds them, so a
config works from any working directory; any other relative path (``runs``) is
left as written, relative to the working directory (the shipped configs' ``output_dir:
runs`` puts runs under the directory ``rlhf`` runs in). ``ppo.preset`` picks the PPO
conventions and ``ppo.conventions`` overrides single fields of it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from shared.config._build import ConfigError, build, to_dict
from shared.config.aliases import NEMO_PPO_KEYS, NOT_CONFIG, alias_names, resolve_alias
from shared.config.schema import JaxEngineConfig, RLHFConfig, TorchEngineConfig
from shared.model_limits import check_config_models
from shared.presets import get_preset

__all__ = [
    "config_keys",
    "config_from_dict",
    "foreign_engine_keys",
    "load_config",
    "parse_override",
    "save_config",
]

logger = logging.getLogger(__name__)

# Fields holding filesystem paths (dotted; `[]` marks a list of mappings).
_PATH_KEYS = (
    "output_dir",
    "model.actor_model_name_or_path",
    "model.critic_model_name_or_path",
    "model.tokenizer_name_or_path",
    "model.reward_tokenizer_name_or_path",
    "data.datasets[].path",
    "data.unsupervised_dataset_name",
    "data.cache_dir",
    "eval.dataset",
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key not in (
            "actor_config", "critic_config"
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_paths(data: dict[str, Any], root: Path) -> None:
    """Rewrite ./ and ../ paths in ``data`` (in place, our own copy) against ``root``."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(("./", "../")):
            return os.path.normpath(str(root / value))
        return value

    for dotted in _PATH_KEYS:
        *parents, leaf = dotted.split(".")
        nodes = [data]
        for part in parents:
            nxt = []
            for node in nodes:
                many = part.endswith("[]")
                child = node.get(part[:-2] if many else part) if isinstance(node, dict) else None
                if many and isinstance(child, list):
                    nxt.extend(c for c in child if isinstance(c, dict))
                elif isinstance(child, dict):
                    nxt.append(child)
            nodes = nxt
        for node in nodes:
            if isinstance(node, dict) and leaf in node:
                node[leaf] = fix(node[leaf])


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config `base:` chain loops: {chain}")
    data = _read_yaml(path)
    _resolve_paths(data, path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    return _merge(_load_chain(path.parent / base, (*seen, path)), data)


def _parse_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 as a string; people mean a number.
            return float(value)
        except ValueError:
            return value
    return value


def config_keys(cls: type = RLHFConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (sections included; a mapping field is one key)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(config_keys(hints[f.name], f"{key}."))
    return keys


def _known_key(dotted: str) -> bool:
    """Whether ``dotted`` names a field, or lies inside a mapping or list field."""
    cls, parts = RLHFConfig, dotted.split(".")
    for part in parts:
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        hint = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(hint):
            return True  # a leaf, a mapping (actor_config) or a list (datasets)
        cls = hint
    return True


def _suggest(key: str, command: str | None) -> str:
    """Did-you-mean text for an unknown override name: dotted keys, outside names, and a
    bare field name's dotted homes (``learning_rate`` -> ``sft.optim.learning_rate``)."""
    keys = config_keys()
    names = {*keys, *alias_names(command)}
    homes: dict[str, list[str]] = {}
    for k in keys:
        homes.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(key, sorted(names | set(homes)), n=3, cutoff=0.6)
    shown = list(dict.fromkeys(
        c2 for c in close for c2 in ([c] if c in names else homes[c])))[:4]
    return f"; did you mean {' or '.join(shown)}?" if shown else ""


def parse_override(text: str, *, command: str | None = None) -> list[tuple[str, Any]]:
    """``"ppo.ppo_epochs=2"`` -> ``[("ppo.ppo_epochs", 2)]``, resolving DS-Chat/NeMo names
    (for ``command``: ``rlhf sft`` reads ``learning_rate`` as ``sft.optim.learning_rate``).

    Dashes in a name are underscores (``--actor-zero-stage=3``); an unknown name is an
    error with a did-you-mean; a DeepSpeed-Chat argument that is not configuration here
    (``local_rank``, ``deepspeed``) is ignored with a warning."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. ppo.ppo_epochs=2")
    if key in NOT_CONFIG:
        logger.warning("ignoring %s: %s", key, NOT_CONFIG[key])
        return []
    pairs = resolve_alias(key, _parse_scalar(raw), command=command)
    for dotted, _ in pairs:
        # A dotted key in a known section is checked when the section is built (its
        # message lists the section's keys); a bare name must be a field or an alias.
        if not _known_key(dotted) and (
                "." not in dotted or not _known_key(dotted.rsplit(".", 1)[0])):
            raise ConfigError(f"override {key}: unknown key{_suggest(key, command)} "
                              "(docs/config.md lists every key)")
    return pairs


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {dotted}: {where} is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Apply NeMo names inside ``ppo:``, plain-string datasets and the PPO preset."""
    data = copy.deepcopy(data)
    ppo = data.get("ppo")
    if isinstance(ppo, dict):
        for name in [k for k in ppo if k in NEMO_PPO_KEYS]:
            for dotted, value in resolve_alias(name, ppo.pop(name)):
                _set(data, dotted, value)
        ppo = data["ppo"]
        if "shuffle_minibatches" in ppo:  # a convention (the preset's unless given)
            conventions = ppo.setdefault("conventions", {}) or {}
            if isinstance(conventions, dict):
                conventions.setdefault("shuffle_minibatches", ppo.pop("shuffle_minibatches"))
                ppo["conventions"] = conventions
        preset_name = ppo.get("preset", "default")
        try:
            preset = get_preset(preset_name)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"ppo.preset: {err}") from None
        overrides = ppo.get("conventions") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"ppo.conventions: expected a mapping, got {overrides!r}")
        ppo["conventions"] = {**to_dict(preset), **overrides}
    datasets = (data.get("data") or {}).get("datasets")
    if isinstance(datasets, list):
        data["data"]["datasets"] = [{"path": d} if isinstance(d, str) else d for d in datasets]
    return data


def config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = (), *,
                     command: str | None = None) -> RLHFConfig:
    """Build a validated ``RLHFConfig`` from plain data plus ``key=value`` overrides
    (DeepSpeed-Chat names read as ``command`` reads them, see ``parse_override``).

    Besides each key's own checks, the data lengths are checked against the context of every
    model whose config can be read (``shared.model_limits``)."""
    data = copy.deepcopy(dict(data))
    for text in overrides:
        for dotted, value in parse_override(text, command=command):
            _set(data, dotted, value)
    config = build(RLHFConfig, _normalise(data))
    check_config_models(config)  # the data lengths against every model context it can read
    return config


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                command: str | None = None) -> RLHFConfig:
    """Read ``path`` (YAML), apply ``overrides`` and return the validated config."""
    return config_from_dict(_load_chain(Path(path)), overrides, command=command)


def save_config(config: RLHFConfig, path: str | os.PathLike) -> None:
    """Write the full, resolved config; ``load_config`` of it gives ``config`` back."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _flat(data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def foreign_engine_keys(config: RLHFConfig, backend: str) -> list[str]:
    """The keys set away from their defaults that only the other backend reads
    (``engine.torch.*`` on jax, ``engine.jax.*`` on torch), for a warning naming them."""
    other, default = (("jax", JaxEngineConfig()) if backend == "torch"
                      else ("torch", TorchEngineConfig()))
    prefix = f"engine.{other}"
    given = _flat(to_dict(getattr(config.engine, other)), prefix)
    defaults = _flat(to_dict(default), prefix)
    return [key for key, value in given.items() if value != defaults[key]]
