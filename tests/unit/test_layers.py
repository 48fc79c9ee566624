"""The layer rules of docs/architecture.md, kept by reading every module's imports (with
``ast``, so imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dstore"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (modules the rule is about, imports they must not have, modules excepted, why)
RULES = [
    ("dstore.protocol", ["asyncio", "aiohttp", "socket", "dstore.rpc", "dstore.storage",
                         "dstore.master", "dstore.gateway", "dstore.client"], [],
     "the protocol is sans-IO"),
    ("dstore.rpc", ["aiohttp", "dstore.storage", "dstore.master", "dstore.gateway",
                    "dstore.client"], [],
     "the transport knows nothing above it"),
    ("dstore.storage", ["aiohttp", "dstore.client", "dstore.master", "dstore.gateway"], [],
     "a storage node serves the msgpack protocol only"),
    ("dstore.master", ["aiohttp", "dstore.gateway", "dstore.client", "dstore.storage"], [],
     "the chunk master is below the HTTP front"),
    ("dstore.master.metadata", ["dstore.rpc", "dstore.protocol", "dstore.master.cluster",
                                "dstore.master.replicas"], [],
     "metadata engines know nothing of the nodes"),
    ("dstore.gateway", ["dstore.rpc", "dstore.protocol", "dstore.storage"], [],
     "pipelines and handlers reach the nodes through the door (master.replicas)"),
    ("dstore.master", ["dstore.rpc"], ["dstore.master.replicas", "dstore.master.cluster"],
     "in the chunk master only the door and membership speak to the nodes"),
    ("dstore", ["aiohttp"], ["dstore.gateway", "dstore.client", "dstore.cli", "dstore.local",
                             "dstore.s3.app", "dstore.s3.request", "dstore.s3.multipart"],
     "only the HTTP fronts and the CLI's client use aiohttp"),
    ("dstore.s3", ["dstore.rpc", "dstore.protocol", "dstore.storage", "dstore.master.cluster",
                   "dstore.master.replicas"], [],
     "the S3 API reaches the nodes through the gateway's pipelines"),
]  # fmt: skip


@pytest.mark.parametrize(("package", "banned", "excepted", "why"), RULES, ids=[r[3] for r in RULES])
def test_no_module_breaks_a_layer_rule(
    package: str, banned: list[str], excepted: list[str], why: str
) -> None:
    broken = [
        f"{module} imports {imported}"
        for module, imported_set in MODULES.items()
        if under(module, package) and not any(under(module, e) for e in excepted)
        for imported in sorted(imported_set)
        if any(under(imported, b) for b in banned)
    ]
    assert not broken, f"{why}: " + "; ".join(broken)


def test_the_rules_see_the_imports_they_are_about() -> None:
    """The reader finds what is there: a rule that matched nothing could not fail."""
    assert "dstore.rpc.splice" in MODULES["dstore.master.replicas"]
    assert "dstore.rpc.client" in MODULES["dstore.master.cluster"]
    assert "aiohttp" in MODULES["dstore.gateway.app"] or any(
        under(i, "aiohttp") for i in MODULES["dstore.gateway.app"]
    )
    assert len(MODULES) > 40
