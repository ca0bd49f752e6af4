"""allm's kernel: protocol, transport, client, manager runtime, registry, supervisor."""
