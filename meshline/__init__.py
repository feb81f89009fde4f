"""meshline: cluster presence and cross-node client messaging for Trio applications."""

from ._buffer import DEFAULT_BUFFER as DEFAULT_BUFFER
from ._buffer import Overflow as Overflow
from ._errors import InvalidArgumentError as InvalidArgumentError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import KeyExistsError as KeyExistsError
from ._errors import KVConflictError as KVConflictError
from ._errors import MeshlineError as MeshlineError
from ._errors import NoRespondersError as NoRespondersError
from ._errors import PayloadTooLargeError as PayloadTooLargeError
from ._errors import RequestTimeoutError as RequestTimeoutError
from ._errors import RevisionMismatchError as RevisionMismatchError
from ._errors import SubscriptionOverflowError as SubscriptionOverflowError
from ._errors import TransportClosedError as TransportClosedError
from ._errors import TransportError as TransportError
from ._memory import MemoryHub as MemoryHub
from ._memory import MemoryTransport as MemoryTransport
from ._memory import open_memory_transport as open_memory_transport
from ._names import decode_token as decode_token
from ._names import encode_token as encode_token
from ._names import validate_bucket as validate_bucket
from ._names import validate_key as validate_key
from ._names import validate_subject as validate_subject
from ._nats import NatsTransport as NatsTransport
from ._nats import open_nats_transport as open_nats_transport
from ._transport import KeyValue as KeyValue
from ._transport import KVEntry as KVEntry
from ._transport import KVOperation as KVOperation
from ._transport import KVWatch as KVWatch
from ._transport import Message as Message
from ._transport import Subscription as Subscription
from ._transport import Transport as Transport

__version__ = "0.1.0.dev0"
