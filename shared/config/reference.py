"""Render the config reference (docs/config.md) from the schema itself.

Each key's description is the comment block above its field, or the attribute
docstring below it, in the dataclass source, so the reference cannot drift
from the code: ``tests/config`` checks the committed file is current.
Regenerate with ``python -m shared.config.reference > docs/config.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from shared.config._build import _describe
from shared.config.aliases import DSCHAT_ARGS, DSCHAT_STEP_ARGS, NEMO_PPO_KEYS, NOT_CONFIG
from shared.config.schema import RLHFConfig
from shared.presets import _DEFAULT_REASONS, PRESETS, PPOConventions

__all__ = ["field_docs", "render", "render_presets"]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment above it or the string literal below it (base classes too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _own_field_docs(klass).items() if v or k not in docs})
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        comment, j = [], node.lineno - 2
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        text = " ".join(comment)
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (not text and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            text = " ".join(nxt.value.value.split())
        docs[name] = text
    return docs


def _default(f: dataclasses.Field, owner: object = None) -> str:
    """The field's default; with ``owner`` (the section as its parent builds it by default),
    the value there, so a section a parent overrides shows the parent's default."""
    if owner is not None:
        value = getattr(owner, f.name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    return f"`{value!r}`" if value is not None else "`null`"


def _section_default(f: dataclasses.Field, owner: object) -> object:
    if owner is not None:
        return getattr(owner, f.name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _rows(cls: type, prefix: str, out: list[str], owner: object = None) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    sections = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            sections.append((key, hint, _section_default(f, owner)))
            continue
        doc = docs.get(f.name, "").replace("|", "\\|")
        kind = _describe(hint).replace("|", "or")
        out.append(f"| `{key}` | {kind} | {_default(f, owner)} | {doc} |")
        items = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and items and dataclasses.is_dataclass(items[0]):
            _rows(items[0], f"{key}[].", out)
    for key, sub, default in sections:
        out.append(f"| **`{key}`** | section | | {(sub.__doc__ or '').strip().splitlines()[0]} |")
        _rows(sub, f"{key}.", out, default)


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from `shared/config/schema.py` by "
        "`python -m shared.config.reference > docs/config.md`; do not edit by hand.",
        "",
        "Configs are YAML files (`configs/`). A file may start with `base: other.yaml` to "
        "inherit and override another. Paths written `./x` or `../x` are relative to the "
        "file. On the command line, trailing `key=value` pairs override any key, by its "
        "dotted name or by its DeepSpeed-Chat / NeMo-RLHF name (tables below). "
        "`ppo.preset` picks a set of PPO conventions (`shared/presets.py`); "
        "`ppo.conventions.<field>` overrides single fields of it. DeepSpeed-Chat's flag "
        "forms work as well: `--actor_zero_stage=3`, `--actor-zero-stage 3`, a bare "
        "`--gradient_checkpointing` (true), `--data_path a b`. An unknown key, in a file or "
        "an override, is an error with a did-you-mean; `engine.torch.*` keys set on the jax "
        "backend (and `engine.jax.*` on torch) are named in a warning.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    _rows(RLHFConfig, "", out)
    out += ["", "## DeepSpeed-Chat step-1 and step-2 arguments", "",
            "The step-1 (`rlhf sft`) and step-2 (`rlhf rm`) scripts share these names; each "
            "command maps them to its own step. Their other arguments (`--data_path`, "
            "`--seed`, `--dtype`, `--offload`, `--output_dir`, ...) are as in step 3 below.",
            "", "| DeepSpeed-Chat argument | `rlhf sft` | `rlhf rm` |", "| --- | --- | --- |"]
    for name, alias in DSCHAT_STEP_ARGS["sft"].items():
        reward = DSCHAT_STEP_ARGS["rm"][name]
        out.append(f"| `--{name}` | {', '.join(f'`{t}`' for t in alias.targets)} | "
                   f"{', '.join(f'`{t}`' for t in reward.targets)} |")
    out += ["", "## DeepSpeed-Chat step-3 arguments", "",
            "| DeepSpeed-Chat argument | key(s) here | note |", "| --- | --- | --- |"]
    for name, alias in DSCHAT_ARGS.items():
        out.append(f"| `--{name}` | {', '.join(f'`{t}`' for t in alias.targets)} | {alias.note} |")
    for name, why in NOT_CONFIG.items():
        out.append(f"| `--{name}` | (none) | {why} |")
    out += ["", "## NeMo-RLHF `model.rlhf.ppo` keys and sampling params", "",
            "Accepted inside the `ppo:` section of a YAML file and as overrides.", "",
            "| NeMo key | key(s) here | note |", "| --- | --- | --- |"]
    for name, alias in NEMO_PPO_KEYS.items():
        out.append(f"| `{name}` | {', '.join(f'`{t}`' for t in alias.targets)} | {alias.note} |")
    return "\n".join(out) + "\n"


def render_presets() -> str:
    """Markdown table of every preset's conventions, with the default's reasons."""
    names = list(PRESETS)
    docs = field_docs(PPOConventions)
    out = ["| field | " + " | ".join(f"`{n}`" for n in names) + " | meaning |",
           "| --- |" + " --- |" * (len(names) + 1)]
    for f in dataclasses.fields(PPOConventions):
        values = " | ".join(f"`{getattr(PRESETS[n], f.name)!r}`" for n in names)
        meaning = docs.get(f.name, "").replace("|", "\\|")
        reason = _DEFAULT_REASONS.get(f.name)
        if reason:
            meaning += f" *Default, because:* {reason}."
        out.append(f"| `{f.name}` | {values} | {meaning} |")
    return "\n".join(out) + "\n"


BEGIN_PRESETS = "<!-- presets table: generated by shared.config.reference.render_presets -->"
END_PRESETS = "<!-- end presets table -->"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["presets"]:
        print(render_presets(), end="")
    else:
        print(render(), end="")
