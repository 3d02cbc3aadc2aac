"""The Redis-adapter design: stock python-socketio with AsyncRedisManager.

Same server as ``stock_sio`` with ``--redis`` set; kept as its own entry point so a run
names the design it measures. Run: python -m bench.peers.redis_sio --port P --redis URL
"""

from __future__ import annotations

from bench.peers.stock_sio import main

if __name__ == "__main__":
    main()
