"""A real `redis-server` for the tests and the benchmark; it lives in the reliability
harness (`torture.redis_server`), whose shared-tier trial starts one too."""

from torture.redis_server import RedisServer, find_redis_server, free_port

__all__ = ["RedisServer", "find_redis_server", "free_port"]
