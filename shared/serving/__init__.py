"""Served roles (NeMo-RLHF's reward model, initial policy and critic servers): the wire
protocol (`protocol`), the aiohttp server with request batching (`server`), the PPO actor's
client (`client`), a served reward function (`function`), the critic server's step rule and
checkpoints (`critic_handler`) and the loop's client of it (`critic_client`), and `rlhf
serve` (`command`); docs/serving.md. Names are imported on first use, so `rlhf` starts
without aiohttp."""

from __future__ import annotations

import importlib

_WHERE = {
    "RoleClient": "client", "ServedRoleError": "client",
    "CriticHandler": "critic_handler", "ServedCritic": "critic_client",
    "ConflictError": "protocol",
    "ENDPOINTS": "protocol", "ROLES": "protocol", "ProtocolError": "protocol",
    "tokenizer_fingerprint": "protocol",
    "RoleHandler": "server", "ServerLimits": "server", "ServerThread": "server",
    "make_app": "server", "serve": "server",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"shared.serving.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'shared.serving' has no attribute {name!r}")
