"""Served roles (NeMo-RLHF's reward model, initial policy and critic servers): the wire
protocol, the aiohttp server with request batching, and the PPO actor's client
(docs/serving.md)."""

from shared.serving.client import RoleClient, ServedRoleError
from shared.serving.protocol import ENDPOINTS, ROLES, ProtocolError, tokenizer_fingerprint
from shared.serving.server import RoleHandler, ServerLimits, ServerThread, make_app, serve

__all__ = ["ENDPOINTS", "ROLES", "ProtocolError", "RoleClient", "RoleHandler", "ServedRoleError",
           "ServerLimits", "ServerThread", "make_app", "serve", "tokenizer_fingerprint"]
