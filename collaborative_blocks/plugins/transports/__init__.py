"""Built-in message transports, one plugin module each: ``memory`` (in-process, the default)
and ``log`` (durable, on the event store). Redis Streams and NATS JetStream live beside them."""
