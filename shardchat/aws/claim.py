"""An instance number claimed at boot through EC2 tags (``shardchat node --auto``).

EC2 tags have no conditional write, so a claim is made safe by reading again: write
``shardchat:instance-number = N`` on yourself (the only tag a claim writes, so the IAM
statement of ``docs/aws.md`` can allow that key alone), wait ``settle`` seconds, re-read every
instance of the cluster. If another instance claims N as well, the lowest instance id keeps
it and every other claimant tries the next free number. Two instances that choose the same
number both read before either wrote; each then sees the other's claim on its second read
provided the settle wait is longer than the time from a claimant's read to its write (and
than EC2's tag propagation). A claimant whose own read-to-write took longer than half the
settle wait starts that attempt over, so the condition holds by construction, not by luck.

Numbers held by instances that are pending, running, stopping or stopped are taken (a
stopped instance comes back with its number and its data); a terminated instance's number
is free again. An instance that already holds a number (a reboot) keeps it unless it loses
it to a lower instance id. The claimant must carry ``shardchat:cluster = <name>`` already
(its launch template's tags): the other claimants find claims by that tag, so a claim
without it would be invisible to them, and it is refused before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shardchat import urls
from shardchat.aws.clients import paginate
from shardchat.aws.tags import TAG_CLUSTER, TAG_INSTANCE, TAG_INSTANCE_NUMBER, tag_map

HOLDING_STATES = ["pending", "running", "stopping", "stopped"]
MAX_ATTEMPTS = 100  # claims lost or restarted before giving up


class ClaimError(RuntimeError):
    """No number could be claimed (every attempt lost, or no number left)."""


def order(instance_id: str) -> tuple[int, str]:
    """Instance ids compared as AWS spells them: shorter (older format) first, then
    alphabetically; lowest wins a tie."""
    return len(instance_id), instance_id


def claims(ec2: Any, cluster: str) -> dict[str, int]:
    """EC2 instance id -> the number it holds, for the cluster's instances in a holding
    state (a static ``shardchat:instance`` tag counts like a claim)."""
    filters = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
               {"Name": "instance-state-name", "Values": HOLDING_STATES}]
    out: dict[str, int] = {}
    for reservation in paginate(ec2, "describe_instances", "Reservations", Filters=filters):
        for inst in reservation.get("Instances", []):
            tags = tag_map(inst.get("Tags", []))
            raw = tags.get(TAG_INSTANCE) or tags.get(TAG_INSTANCE_NUMBER, "")
            if raw.isdigit() and urls.valid_instance(int(raw)):
                out[inst["InstanceId"]] = int(raw)
    return out


def check_member(ec2: Any, cluster: str, me: str) -> None:
    """Refuse to claim for an instance not tagged as the cluster's: nobody would see it."""
    found = ec2.describe_instances(InstanceIds=[me])["Reservations"][0]["Instances"][0]
    tagged = tag_map(found.get("Tags", [])).get(TAG_CLUSTER)
    if tagged != cluster:
        now = "no such tag" if tagged is None else f"{TAG_CLUSTER} = {tagged!r}"
        raise ClaimError(f"EC2 instance {me} has {now}: tag it {TAG_CLUSTER} = {cluster} "
                         "at launch (launch template tag specifications, or the Auto "
                         "Scaling group's tags with PropagateAtLaunch), so that the other "
                         "instances see its claim")


def _pick(held: dict[str, int], me: str, lost: set[int], rank: int) -> int:
    """Our number if nobody else holds it, else the ``rank``-th free one (0: the lowest).
    Claimants that lost one tie see the same claims, and each takes its place in the tie
    as its rank, so they spread over the next free numbers instead of all colliding again
    (only a hint: every choice is still checked by reading again)."""
    mine = held.get(me)
    others = {n for iid, n in held.items() if iid != me}
    if mine is not None and mine not in others and mine not in lost:
        return mine
    n, skipped = urls.MIN_INSTANCE, 0
    while n in others or n in lost or skipped < rank:
        if n not in others and n not in lost:
            skipped += 1
        n += 1
    if n > urls.MAX_INSTANCE:
        raise ClaimError(f"every instance number 1..{urls.MAX_INSTANCE} is taken")
    return n


def claim_number(ec2: Any, cluster: str, me: str, *, settle: float,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = lambda _line: None) -> int:
    """Claim the lowest free instance number for EC2 instance ``me``; returns it once no
    lower instance id claims it too."""
    check_member(ec2, cluster, me)
    lost: set[int] = set()
    rank = 0
    for _attempt in range(MAX_ATTEMPTS):
        began = clock()
        n = _pick(claims(ec2, cluster), me, lost, rank)
        ec2.create_tags(Resources=[me], Tags=[{"Key": TAG_INSTANCE_NUMBER, "Value": str(n)}])
        if clock() - began > settle / 2:
            say(f"claim of {n} took {clock() - began:.2f} s to write: reading again")
            continue
        sleep(settle)
        rivals = sorted((iid for iid, m in claims(ec2, cluster).items()
                         if m == n and iid != me), key=order)
        if not rivals or order(me) < order(rivals[0]):
            return n
        say(f"instance number {n} is also claimed by {rivals[0]} (a lower instance id): "
            "trying the next one")
        lost.add(n)
        rank = sum(1 for iid in rivals if order(iid) < order(me)) - 1
    raise ClaimError(f"no instance number claimed after {MAX_ATTEMPTS} attempts: check "
                     f"that every instance tagged {TAG_CLUSTER} = {cluster} can read the "
                     "others' tags (ec2:DescribeInstances)")
