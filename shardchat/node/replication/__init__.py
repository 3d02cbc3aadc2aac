"""Copies of a node's store kept elsewhere, so that losing the machine loses little.

Off the machine (``node.replicate_to``, SPEC section 9): Litestream streams the store's
WAL to S3 or a directory, and ``shardchat restore`` brings an instance back from it.

* ``litestream.py``: the binary, the ``litestream.yml`` a node writes for it, the
  environment and command lines it runs with;
* ``supervisor.py``: Litestream beside a running node, restarted when it dies, stopped with
  the node;
* ``restore.py``: ``shardchat restore``, rebuilding one instance's store from its replica.
"""
