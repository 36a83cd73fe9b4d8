"""asyncio client (grpc.aio) for async inference servers: the same options and results as
kvcompact.Client, awaited instead of blocking.

    from kvcompact.aio import AsyncClient
    async with AsyncClient("localhost:50051", streams=2) as client:
        result = await client.compact(layers, ratio=20)      # a list, an iterable or an async iterable

Layers may come from an async generator that yields each layer as the model computes it (pass
`num_layers` then); each stream takes the next layer when it is ready.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence as SequenceABC
from typing import AsyncIterable, AsyncIterator, Callable, Iterable, Optional, Union

import grpc
import grpc.aio

from kvcompact.client import (CompactError, _check_layer, _chunks, _Collector, _open_channel, _security,
                              make_header)
from kvcompact.proto import pb, pb_grpc
from kvcompact.types import CompactedLayer, CompactResult, Layer

Layers = Union[Iterable[Layer], AsyncIterable[Layer]]


async def _aiter(layers: Layers) -> AsyncIterator[Layer]:
    if hasattr(layers, "__aiter__"):
        async for layer in layers:
            yield layer
    else:
        for layer in layers:
            yield layer


class AsyncClient:
    """A connection to kvcompact-server on the running event loop; see kvcompact.Client for
    `streams`, `max_message_bytes` and the security arguments."""

    def __init__(self, target: str = "localhost:50051", streams: int = 1, max_message_bytes: int = 4 << 20, *,
                 root_certificates: Optional[bytes] = None, certificate_chain: Optional[bytes] = None,
                 private_key: Optional[bytes] = None, token: Optional[str] = None, server_name: Optional[str] = None):
        self.target = target
        self.streams = max(1, streams)
        self.max_message_bytes = max_message_bytes
        credentials, self._metadata = _security(root_certificates, certificate_chain, private_key, token)
        self._channels = [_open_channel(grpc.aio, target, credentials, server_name, i) for i in range(self.streams)]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def info(self, timeout: float = 10) -> pb.ServerInfo:
        return await pb_grpc.KVCompactStub(self._channels[0]).GetServerInfo(
            pb.ServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def compact(self, layers: Layers, *, on_layer: Optional[Callable[[CompactedLayer], None]] = None,
                      timeout: Optional[float] = None, **options) -> CompactResult:
        """Compacts `layers`; options and errors as in kvcompact.Client.compact."""
        source = _aiter(layers)
        first = await anext(source, None)
        if first is None:
            raise ValueError("no layers to compact")
        header = make_header(layers if isinstance(layers, SequenceABC) else first, **options)
        method, allocation = options.get("method", "am"), options.get("allocation")
        if isinstance(layers, SequenceABC):
            for layer in layers:
                _check_layer(layer, method, allocation)
        collector = _Collector(header, on_layer)
        pending = [first]
        lock = asyncio.Lock()
        client_errors: list[BaseException] = []

        async def next_layer() -> Optional[Layer]:
            async with lock:
                layer = pending.pop() if pending else await anext(source, None)
            if layer is not None:
                _check_layer(layer, method, allocation)
            return layer

        async def run(s: int) -> None:
            # Written by a task of its own, read here: when the server ends the call early (a bad
            # header), writing stops quietly and the status comes from the reading side.
            call = pb_grpc.KVCompactStub(self._channels[s]).Compact(timeout=timeout, metadata=self._metadata)

            async def write() -> None:
                first_msg = pb.CompactRequest()
                first_msg.header.CopyFrom(header)
                if self.streams > 1:
                    first_msg.header.request_id = f"{header.request_id}/{s}"
                try:
                    await call.write(first_msg)
                    # The server acknowledges a valid header with initial metadata; a refused one
                    # ends the call instead, and nothing more is written into it.
                    await call.initial_metadata()
                    if call.done():
                        return
                    while (layer := await next_layer()) is not None:
                        for msg in _chunks(layer, self.max_message_bytes):
                            await call.write(msg)
                    await call.done_writing()
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    return  # the call is over; its status is read below
                except Exception as e:  # noqa: BLE001 -- a bad layer: raised again by compact()
                    client_errors.append(e)
                    call.cancel()

            writer = asyncio.create_task(write())
            try:
                async for resp in call:
                    collector.add(resp)
            except grpc.aio.AioRpcError as e:
                if client_errors:
                    return
                raise CompactError(e.code(), e.details()) from None
            finally:
                await writer

        streams = min(self.streams, len(layers)) if isinstance(layers, SequenceABC) else self.streams
        outcomes = await asyncio.gather(*(run(s) for s in range(streams)), return_exceptions=True)
        if client_errors:
            raise client_errors[0]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return collector.result()
