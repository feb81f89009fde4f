"""A node's identity: the names of its mesh, and its id.

Ids come from compare-and-set increments of the ``ids`` counter in the mesh's bucket,
so an id is never handed out twice, even across crashes: a missing counter is
recreated above every node id that still has a liveness key.
"""

from __future__ import annotations

import msgspec

from .._errors import KeyExistsError, RevisionMismatchError
from .._transport._names import encode_bounded_token, encode_token
from .._transport._seam import KeyValue
from ._membership import NODE_KEY_PREFIX
from ._wire import encode

__all__ = ["IDS_KEY", "allocate_id", "mesh_names"]

IDS_KEY = "ids"
"""The key of the id counter: the last node id handed out."""

_int_decoder = msgspec.msgpack.Decoder(int)


def mesh_names(key: str, namespace: str = "") -> tuple[str, str]:
    """The KV bucket and the subject prefix of the mesh called ``key``.

    Layers built on nodes (the client service) pass a ``namespace`` of lowercase
    letters, so their meshes never share names with a plain node's mesh: encoded
    keys always start with ``b`` or ``h`` followed by base64, never with a
    namespace and a separator.
    """
    token = encode_token(key, "mesh key")
    if namespace:
        bucket = f"ml-{namespace}-" + encode_bounded_token(key, 60 - len(namespace), "mesh key")
        return bucket, f"ml.{namespace}.{token}"
    return "ml-" + encode_bounded_token(key, 61, "mesh key"), f"ml.{token}"


async def allocate_id(kv: KeyValue) -> int:
    """Take the next node id from the counter in ``kv``; never one handed out before.

    Concurrent callers each get a different id (the counter moves by
    compare-and-set, and a lost race tries again). On cancellation the counter may
    have moved on without the id being used, which only leaves a gap.

    :raises TransportError: the bucket could not be read or written.
    """
    while True:
        entry = await kv.get(IDS_KEY)
        if entry is None:
            floor = 0
            for key in await kv.keys():
                digits = key.removeprefix(NODE_KEY_PREFIX)
                if key.startswith(NODE_KEY_PREFIX) and digits.isdigit():
                    floor = max(floor, int(digits))
            try:
                await kv.create(IDS_KEY, encode(floor + 1))
            except KeyExistsError:
                continue
            return floor + 1
        node_id = _int_decoder.decode(entry.value) + 1
        try:
            await kv.update(IDS_KEY, encode(node_id), revision=entry.revision)
        except RevisionMismatchError:
            continue
        return node_id
