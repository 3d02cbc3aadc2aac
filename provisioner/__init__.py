"""``shardchat-provision``: makes an AWS Application Load Balancer match the config.

The data flows one way: config -> desired state (pure) -> observed state (read from AWS by
ownership tags) -> plan (ordered actions, create before delete) -> apply (boto3 calls).
"""
