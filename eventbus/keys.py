"""Names of the message options eventbus sets.

They live in each dramatiq message's ``options`` (JSON), all prefixed ``eventbus_``
so they never collide with dramatiq's reserved keys (``retries``, ``eta``, ...).
"""

from __future__ import annotations

#: The event's topic.
TOPIC = "eventbus_topic"
#: The correlation id of the publishing request.
CORRELATION_ID = "eventbus_cid"
#: Trace id and span id of the publish span, parent of the dispatch spans.
TRACE_ID = "eventbus_trace_id"
PARENT_SPAN_ID = "eventbus_parent_span"
#: Propagation fields of the publish span (W3C traceparent, tracestate, baggage).
TRACE_CONTEXT = "eventbus_trace_ctx"
#: Failed attempts so far (absent on the first attempt).
ATTEMPTS = "eventbus_attempts"
#: Milliseconds since the epoch of the first failure.
FIRST_FAILED_AT = "eventbus_first_failed"
#: The outcome of each failed attempt so far: ``[[epoch ms, error type, message], ...]``
#: (the newest :data:`MAX_ATTEMPT_LOG`, messages cut to :data:`MAX_ATTEMPT_ERROR` chars).
ATTEMPT_LOG = "eventbus_attempt_log"
#: Failed attempts remembered in :data:`ATTEMPT_LOG`.
MAX_ATTEMPT_LOG = 20
#: Characters of an error message kept per attempt.
MAX_ATTEMPT_ERROR = 200

#: Id of the dead letter a replayed message comes from.
REPLAY_OF = "eventbus_replay_of"

#: Actor option holding the HandlerSpec behind an actor.
HANDLER = "eventbus_handler"

#: When the event's messages become due: milliseconds since the epoch (publisher's
#: clock), set by ``publish(..., delay=...)`` or ``eta=...`` (absent: at once).
#: Absolute, so an outbox row relayed later is still delivered on time.
DELIVER_AT = "eventbus_deliver_at"
