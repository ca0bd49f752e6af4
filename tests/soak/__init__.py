"""The soak: a real `allm serve` under many clients and a fault schedule, for a bounded time."""
