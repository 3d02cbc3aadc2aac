"""Fault injection for the provisioner: ``apply`` killing itself (SIGKILL) mid-plan.

What the state lock promises after a crash (its lease ends, the next apply takes it and
finishes from what exists) can only be shown by crashing at an exact step; killing the
process from outside when enough resources exist is a race with the apply. The switch is
the node's (``shardchat/node/faults.py``), with a point of the provisioner's own:
``SHARDCHAT_FAULT=provision.after_action SHARDCHAT_FAULT_AT=n`` dies once the n-th action of
the plan is done, before the next starts. The switch itself is ``shardchat/faultswitch.py``
(the provisioner may not import the node). Read once at import; an unknown ``provision.``
point is refused at start (``check``); unset, ``reach`` costs one comparison.
"""

from __future__ import annotations

from shardchat.faultswitch import AT_ENV as AT_ENV
from shardchat.faultswitch import ENV as ENV
from shardchat.faultswitch import FaultSwitch

POINTS = frozenset({"provision.after_action"})

# other points are the node's: only a ``provision.`` name is this switch's to refuse
_SWITCH = FaultSwitch(POINTS, "provisioner fault point",
                      owns=lambda name: name.startswith("provision."))
check = _SWITCH.check
reach = _SWITCH.reach
