"""Cluster-wide pieces: placement, peers, the rule set, the local router, ``shardchat up``."""
