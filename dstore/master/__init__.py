"""The chunk master: metadata, placement, membership, budgets and the reaper (no aiohttp)."""
