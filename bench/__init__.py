"""The benchmark suite: ``python -m bench`` (``make bench``).

shardchat's broadcast path against stock python-socketio, Node socket.io and the
Redis-adapter design, same scenarios, same load generator, in the same run. See
docs/performance.md for what it measures and how to read the results.
"""
