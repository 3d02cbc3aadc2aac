"""Peer servers the benchmark runs side by side with shardchat, each with the same chat
semantics: clients join a namespace ``/room/<id>``, ``message`` (with ack) is broadcast to
every member of the namespace, sender included."""
