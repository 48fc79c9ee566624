"""dstore: a distributed, streaming object store."""

__version__ = "0.1.0"
