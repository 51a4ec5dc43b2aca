"""Write the constraints file (the lock) of the environment this interpreter runs in.

Run by ``make lock`` with the interpreter of a fresh, unpinned install (see the Makefile);
prints the lock to stdout. Every installed package this project needs is pinned (its
version as ``pip freeze`` would print it), except:

- torch and what only torch needs (sympy, networkx, jinja2, nvidia-*, triton, ...): they
  come from ``TORCH_SPEC``, installed first and unconstrained, so a GPU cluster keeps its
  CUDA build of any torch version;
- the packages that require torch (accelerate, peft): their releases follow torch's
  (accelerate 1.16 needs torch >= 2.6), so pinning them would make an older
  ``TORCH_SPEC`` uninstallable; pip picks the newest that fit the torch installed;
- deepspeed: ``DEEPSPEED_SPEC`` pins it;
- this project itself.

pip, setuptools and wheel are pinned too (they build DeepSpeed). Each line carries the
Python version the lock was made with as an environment marker: on another Python the
lock does not apply and pyproject.toml's ranges decide.

``--check LOCK`` instead warns (on stderr, exit 0) when this interpreter's Python version
differs from the lock's.

Uses only the standard library and ``packaging`` (pip's copy where it is not installed).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from importlib import metadata

ROOT = "rlhf-parity"
ROOT_EXTRAS = ("torch", "jax", "dev")
FROM_TORCH_SPEC = "torch"  # with what only it needs
FROM_DEEPSPEED_SPEC = "deepspeed"
BUILD_TOOLS = ("pip", "setuptools", "wheel")
NEVER = re.compile(r"^(nvidia-.*|triton|pytorch-triton.*)$")  # CUDA torch's own


def _packaging():
    """packaging's default_environment, Requirement and canonicalize_name (pip's copy in a
    venv without packaging); imported only to make a lock, not for ``--check``."""
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return default_environment, Requirement, canonicalize_name


def _installed() -> dict[str, metadata.Distribution]:
    canonicalize_name = _packaging()[2]
    dists = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            dists.setdefault(canonicalize_name(name), dist)
    return dists


def _needed(dists: dict[str, metadata.Distribution]) -> tuple[set[str], set[str]]:
    """Installed packages the project (with its extras) needs, not going through torch,
    and those of them that require torch themselves."""
    default_environment, Requirement, canonicalize_name = _packaging()
    environment = default_environment()
    needed: set[str] = set()
    on_torch: set[str] = set()
    todo = [(canonicalize_name(ROOT), frozenset(ROOT_EXTRAS))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in dists:
            continue
        seen.add((name, extras))
        needed.add(name)
        for line in dists[name].requires or ():
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**environment, "extra": extra})
                    for extra in ("", *extras)):
                continue
            dep = canonicalize_name(req.name)
            if dep == FROM_TORCH_SPEC:
                on_torch.add(name)
            else:
                todo.append((dep, frozenset(req.extras)))
    return needed, on_torch


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def lock(how: str) -> str:
    canonicalize_name = _packaging()[2]
    dists = _installed()
    if canonicalize_name(ROOT) not in dists:
        sys.exit(f"lock.py: {ROOT} is not installed in {sys.prefix}")
    needed, on_torch = _needed(dists)
    needed |= {canonicalize_name(n) for n in BUILD_TOOLS}
    needed -= {canonicalize_name(ROOT), FROM_DEEPSPEED_SPEC, *on_torch}
    left_out = sorted(n for n in dists if n not in needed)
    pins = sorted(((dists[n].metadata["Name"], dists[n].version) for n in needed
                   if n in dists and not NEVER.match(n)), key=lambda pin: pin[0].lower())
    marker = f'python_version == "{_python()}"'
    header = [
        "# Constraints for `make install` (pip install -c): the versions of one fresh install,",
        "# tested with `make test` before it was committed. pyproject.toml keeps its ranges.",
        *(f"# {line}" for line in _wrap(
            f"Made {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} by {how}, on "
            f"Python {platform.python_version()}, {sys.platform} {platform.machine()}; "
            "refresh with `make lock`.", width=86)),
        "# Left out: torch and what only torch needs (TORCH_SPEC decides them), what requires",
        "# torch (its releases follow torch's: pinned, an older TORCH_SPEC could not install),",
        "# deepspeed (DEEPSPEED_SPEC pins it), nvidia-*/triton, this project:",
        *(f"#   {line}" for line in _wrap(", ".join(left_out))),
        f"# Each pin applies on Python {_python()} only; elsewhere pyproject.toml's ranges do.",
    ]
    return "\n".join([*header, *(f"{name}=={version} ; {marker}" for name, version in pins)]
                     ) + "\n"


def _wrap(text: str, width: int = 84) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def check(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        versions = set(re.findall(r'python_version == "([0-9.]+)"', f.read()))
    if versions and _python() not in versions:
        print(f"warning: {path} was made on Python {', '.join(sorted(versions))}, this is "
              f"{_python()}: its pins do not apply, pyproject.toml's ranges decide; run "
              "`make lock` to make one for this Python", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--how", default="requirements/lock.py",
                        help="how the environment was installed (goes in the header)")
    parser.add_argument("--check", metavar="LOCK",
                        help="only warn if LOCK was made on another Python version")
    args = parser.parse_args()
    if args.check:
        check(args.check)
    else:
        sys.stdout.write(lock(args.how))


if __name__ == "__main__":
    main()
