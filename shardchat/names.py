"""Names of the things that outlive a release: data directories and AWS resources.

These names are **frozen forever**. A node finds its store by this name and the provisioner
recognises its target groups by it, so renaming means orphaning every existing store and
replacing every target group. They are derived from the instance number alone and never from
the URL scheme (``urls.py``): the URLs may change, what is on disk and in AWS may not.
"""

from __future__ import annotations

from shardchat.urls import checked_instance


def storage_name(n: int) -> str:
    """``i<N>``: instance N's data directory under ``cluster.data_dir`` and the stem of its
    target group name. Frozen: the same bytes as every earlier release."""
    return f"i{checked_instance(n)}"
