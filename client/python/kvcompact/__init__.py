"""Python client of kvcompact: compact a model's KV cache by Attention Matching over gRPC.

    from kvcompact import Client, Layer
    client = Client("localhost:50051")
    result = client.compact([Layer(0, keys, values, queries)], ratio=20)
    result.layers[0].heads[0].keys  # [t, head_dim]

The gRPC parts load on first use, so `kvcompact.runtime` works without them.
"""
from kvcompact.types import CompactedHead, CompactedLayer, CompactResult, Layer

__all__ = ["Client", "CompactError", "compact", "Layer", "CompactedHead", "CompactedLayer", "CompactResult"]


def __getattr__(name):
    if name in ("Client", "CompactError", "compact"):
        from kvcompact import client

        return getattr(client, name)
    raise AttributeError(name)
