"""shardchat: a Socket.IO chat that pins each room to one instance.

Everything of instance N lives under ``/i<N>/``; a load balancer with one path rule per
instance sends a room's HTTP and WebSocket traffic to the node that owns it.
"""

__version__ = "0.1.0"
