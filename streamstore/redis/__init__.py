"""The live tier: connecting to Redis (or Valkey, or a cluster), its topology, the fenced
redis-py fast path, the server-side scripts, the checks made on connect, and the embedded
server started when no URL is given."""
