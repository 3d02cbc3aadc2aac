"""What shardchat reads from and writes to AWS, shared by the provisioner and the router.

``clients`` makes every boto3 client (one retry policy), ``tags`` says what the ownership
tags are called, ``alb`` reads a load balancer, ``ec2`` finds instances by their tags. None
of these imports the node or the provisioner: they sit between the config and the cluster.
"""
