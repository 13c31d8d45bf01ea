"""One websocket connection, split by responsibility.

- :mod:`.inbound`: the socket reader, Ogg/Opus decode (bounded per message), framing into 80 ms
  frames, the receive buffer and the feeder into the scheduler.
- :mod:`.outbound`: Opus encode of the model's frames, the bounded outbox, the sender and the
  slow-client policy.
- :mod:`.lifecycle`: accept, query parameters, queueing, joining a slot, ending and closing.
"""

from duplex.server.session.inbound import MAX_DECODED_SECONDS_PER_MESSAGE, RECEIVE_BUFFER_FRAMES
from duplex.server.session.lifecycle import Session
from duplex.server.session.outbound import MESSAGES_PER_FRAME

__all__ = ["MAX_DECODED_SECONDS_PER_MESSAGE", "MESSAGES_PER_FRAME", "RECEIVE_BUFFER_FRAMES", "Session"]
