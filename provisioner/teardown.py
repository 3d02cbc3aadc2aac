"""The destroy plan: remove what carries this cluster's tags, and nothing else.

Adopted resources (tagged ``shardchat:adopted``) existed before shardchat; destroy hands
them back untagged instead of deleting them. A listener or load balancer that still carries
someone else's rules or listeners is kept for the same reason.
"""

from __future__ import annotations

from provisioner.actions import CHANGE, DELETE, Action, Plan
from provisioner.observed import ObservedState
from shardchat.aws.tags import TAG_ADOPTED, TAG_INSTANCE

NO_ROUTE = "no shardchat cluster behind this listener"


def _rules(observed: ObservedState) -> list[Action]:
    return [Action(DELETE, "rule", f"priority {r.priority} {', '.join(r.patterns)}",
                   f"instance {r.tags.get(TAG_INSTANCE, '?')}", "delete_rule",
                   {"arn": r.arn})
            for r in observed.rules if observed.ours(r.tags)]


def _listeners(observed: ObservedState, warnings: list[str]) -> list[Action]:
    out = []
    for ls in observed.listeners:
        if not observed.ours(ls.tags):
            continue
        name = f"{ls.protocol}:{ls.port}"
        if observed.must_keep(ls):
            why = "it was adopted" if ls.tags.get(TAG_ADOPTED) else (
                f"it holds {len(observed.foreign_rules(ls.arn))} rule(s) shardchat does not "
                "manage")
            warnings.append(f"listener {name} is kept because {why}; its default action "
                            "now answers 404")
            out.append(Action(CHANGE, "listener", name, "default action -> fixed 404 "
                              "(it no longer forwards to shardchat)", "set_default_action",
                              {"arn": ls.arn, "default": {"fixed": NO_ROUTE}}))
            out.append(Action(CHANGE, "listener", name, "remove shardchat tags", "untag",
                              {"arn": ls.arn}))
        else:
            out.append(Action(DELETE, "listener", name, "created by shardchat",
                              "delete_listener", {"arn": ls.arn}))
    return out


def _load_balancer(observed: ObservedState, warnings: list[str]) -> list[Action]:
    lb = observed.load_balancer
    if lb is None or not observed.ours(lb.tags):
        return []
    foreign = [ls for ls in observed.listeners if not observed.ours(ls.tags)]
    kept = [ls for ls in observed.listeners if observed.ours(ls.tags) and observed.must_keep(ls)]
    if lb.tags.get(TAG_ADOPTED) or foreign or kept:
        warnings.append(f"load balancer {lb.name} is kept: it was adopted or still has "
                        "listeners or rules shardchat does not manage")
        return [Action(CHANGE, "load balancer", lb.name, "remove shardchat tags", "untag",
                       {"arn": lb.arn})]
    return [Action(DELETE, "load balancer", lb.name, "created by shardchat",
                   "delete_load_balancer", {"arn": lb.arn})]


def _target_groups(observed: ObservedState, warnings: list[str]) -> list[Action]:
    foreign_refs = observed.foreign_refs()
    out = []
    for tg in observed.target_groups:
        if tg.arn in foreign_refs:
            warnings.append(f"target group {tg.name} is kept: a rule or listener shardchat "
                            "does not manage forwards to it")
            continue
        out.append(Action(DELETE, "target group", tg.name, "targets deregistered first",
                          "delete_target_group", {"arn": tg.arn, "targets": tg.targets}))
    return out


def make_destroy_plan(observed: ObservedState, lb_name: str, title: str = "") -> Plan:
    warnings: list[str] = []
    actions = [*_rules(observed), *_listeners(observed, warnings),
               *_load_balancer(observed, warnings), *_target_groups(observed, warnings)]
    return Plan(title=title or f"Destroy plan for load balancer {lb_name} "
                f"(cluster {observed.cluster}, shard {observed.shard}):",
                actions=tuple(actions),
                warnings=tuple(warnings))
