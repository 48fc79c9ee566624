"""The gateway role: the HTTP API (aiohttp) over the chunk master."""

from dstore.gateway.app import create_app, run_gateway, start_gateway

__all__ = ["create_app", "run_gateway", "start_gateway"]
