"""Desired vs observed -> an ordered list of actions. Pure: reads two values, calls nothing.

Order is what keeps traffic flowing while the ALB changes: everything new is created first
(load balancer, target groups and their targets, listeners, rules), then existing things are
changed in place (a rule is pointed at its new target group only once that group has its
target), and only then is anything deleted. Resources not tagged as ours are read, counted
and avoided, never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from provisioner import limits
from provisioner.actions import ADOPT, CHANGE, CREATE, DELETE, Action, Plan
from provisioner.desired import DesiredState, ListenerSpec, RuleSpec, TargetGroupSpec
from provisioner.observed import ObservedState
from shardchat.aws.alb import ObservedListener, ObservedRule
from shardchat.aws.tags import (
    ROLE_INSTANCE,
    ROLE_LOBBY,
    TAG_CLUSTER,
    TAG_INSTANCE,
    TAG_ROLE,
    TAG_SHARD,
    shard_tag,
)
from shardchat.cluster.rules import MAX_PRIORITY


class ConflictError(Exception):
    """AWS holds something in the way that shardchat must not touch."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class _Builder:
    desired: DesiredState
    observed: ObservedState
    create: list[Action] = field(default_factory=list)
    change: list[Action] = field(default_factory=list)
    delete: list[Action] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, action: Action) -> None:
        {CREATE: self.create, ADOPT: self.create, CHANGE: self.change,
         DELETE: self.delete}[action.verb].append(action)


# ---------------------------------------------------------------------------------------
# load balancer


def _load_balancer(b: _Builder) -> None:
    spec, lb = b.desired.load_balancer, b.observed.load_balancer
    if lb is None:
        b.add(Action(CREATE, "load balancer", spec.name, "it does not exist yet",
                     "create_load_balancer", {"spec": spec}))
        b.create.append(Action(CHANGE, "load balancer", spec.name,
                     f"idle timeout -> {spec.idle_timeout} s (set explicitly; it must outlast "
                     "the Socket.IO ping interval + timeout)", "set_idle_timeout",
                     {"seconds": spec.idle_timeout}))
        return
    owner = lb.tags.get(TAG_CLUSTER)
    if owner not in (None, b.desired.cluster):
        raise ConflictError("OwnedByOtherCluster", f"load balancer {lb.name} is tagged "
                            f"{TAG_CLUSTER}={owner}: choose another aws.load_balancer")
    if lb.scheme and lb.scheme != spec.scheme:
        raise ConflictError("SchemeMismatch", f"load balancer {lb.name} is {lb.scheme} but "
                            f"aws.scheme is {spec.scheme}; AWS cannot change a scheme in place: "
                            "set aws.scheme to match, or use a new aws.load_balancer name")
    if owner is not None and shard_tag(lb.tags) != b.desired.shard:
        raise ConflictError("ShardMismatch", f"load balancer {lb.name} is tagged "
                            f"{TAG_SHARD}={lb.tags.get(TAG_SHARD)} but the config makes it "
                            f"shard {b.desired.shard}: keep the [[aws.shards]] tables in "
                            "their order (a table's place is its shard number)")
    if owner is None:
        b.add(Action(ADOPT, "load balancer", lb.name, "it exists without shardchat tags: "
                     "tag it and manage its settings (destroy will leave it in place)",
                     "adopt", {"arn": lb.arn, "tags": spec.tags}))
    if lb.idle_timeout != spec.idle_timeout:
        b.add(Action(CHANGE, "load balancer", lb.name, f"idle timeout {lb.idle_timeout} -> "
                     f"{spec.idle_timeout} s", "set_idle_timeout",
                     {"seconds": spec.idle_timeout}))
    if lb.subnets != tuple(sorted(spec.subnets)):
        b.add(Action(CHANGE, "load balancer", lb.name, f"subnets {list(lb.subnets)} -> "
                     f"{sorted(spec.subnets)}", "set_subnets", {"subnets": spec.subnets}))
    if spec.security_groups and lb.security_groups != tuple(sorted(spec.security_groups)):
        b.add(Action(CHANGE, "load balancer", lb.name, f"security groups "
                     f"{list(lb.security_groups)} -> {sorted(spec.security_groups)}",
                     "set_security_groups", {"groups": spec.security_groups}))


# ---------------------------------------------------------------------------------------
# target groups


def _why_new_group(b: _Builder, spec: TargetGroupSpec) -> str:
    if spec.role == ROLE_LOBBY:
        old = [tg for tg in b.observed.target_groups if tg.role == ROLE_LOBBY]
        return (f"replaces {old[0].name} (target type changed)" if old
                else "the lobby: the listener's default action, every instance in it")
    old = [tg for tg in b.observed.target_groups
           if tg.role == ROLE_INSTANCE and tg.instance == spec.instance]
    if old and old[0].port != spec.port:
        return (f"instance {spec.instance}'s port changed {old[0].port} -> {spec.port}; AWS "
                f"cannot change a target group's port, so this replaces {old[0].name} "
                "(its rule moves over, then the old group is deleted)")
    if old:
        return f"replaces {old[0].name} (target type changed)"
    return f"instance {spec.instance} is new"


def _health_changes(spec: TargetGroupSpec, have) -> list[str]:
    out = []
    for label, attr in (("path", "path"), ("interval", "interval"), ("timeout", "timeout"),
                        ("healthy threshold", "healthy"), ("unhealthy threshold", "unhealthy"),
                        ("matcher", "matcher")):
        old, new = getattr(have.health, attr), getattr(spec.health, attr)
        if old != new:
            out.append(f"health check {label} {old} -> {new}")
    return out


def _target_group(b: _Builder, spec: TargetGroupSpec) -> None:
    have = next((tg for tg in b.observed.target_groups if tg.name == spec.name), None)
    if have is None:
        if spec.name in b.observed.names.values():
            raise ConflictError("DuplicateTargetGroupName", f"a target group named {spec.name} "
                                "exists without this cluster's tags: rename cluster.name or "
                                "remove that group")
        b.add(Action(CREATE, "target group", spec.name, _why_new_group(b, spec),
                     "create_target_group", {"spec": spec}))
        _register(b, spec, spec.targets, "new target group")
        return
    if have.vpc_id and have.vpc_id != spec.vpc_id:
        raise ConflictError("VpcMismatch", f"target group {spec.name} is in {have.vpc_id}, "
                            f"aws.vpc_id is {spec.vpc_id}: run destroy with the old config first")
    changes = _health_changes(spec, have)
    if changes:
        b.add(Action(CHANGE, "target group", spec.name, "; ".join(changes),
                     "modify_health", {"name": spec.name, "health": spec.health}))
    if have.deregistration_delay != spec.deregistration_delay:
        b.add(Action(CHANGE, "target group", spec.name, f"deregistration delay "
                     f"{have.deregistration_delay} -> {spec.deregistration_delay} s",
                     "set_deregistration_delay",
                     {"name": spec.name, "seconds": spec.deregistration_delay}))
    new = tuple(t for t in spec.targets if t not in have.targets)
    stale = tuple(t for t in have.targets if t not in spec.targets)
    for t in stale:
        # AWS keys a registration by (id, port), so the old port could go after the new one
        # is in. moto keys by id alone: the new registration replaces the old and the later
        # deregistration would remove it. Same id -> deregister first (only that target of
        # the lobby is briefly out; the rule-bound group is a new group and unaffected).
        same_id = any(n.id == t.id for n in new)
        action = Action(DELETE, "target", f"{t.id}:{t.port} from {spec.name}",
                        "its port changed" if same_id else "no longer in the config",
                        "deregister_targets", {"name": spec.name, "targets": (t,)})
        (b.create.append if same_id else b.add)(action)
    _register(b, spec, new, "not registered yet")


def _register(b: _Builder, spec: TargetGroupSpec, targets, why: str) -> None:
    if targets:
        subject = ", ".join(f"{t.id}:{t.port}" for t in targets)
        b.add(Action(CREATE, "target", f"{subject} in {spec.name}", why, "register_targets",
                     {"name": spec.name, "targets": tuple(targets)}))


def _unused_groups(b: _Builder) -> None:
    wanted = {tg.name for tg in b.desired.target_groups}
    foreign_refs = b.observed.foreign_refs()
    for tg in b.observed.target_groups:
        if tg.name in wanted:
            continue
        if tg.arn in foreign_refs:
            b.warnings.append(f"target group {tg.name} is no longer needed but a rule or "
                              "listener shardchat does not manage forwards to it: left in place")
            continue
        why = (f"instance {tg.instance} is no longer in the config"
               if tg.role == ROLE_INSTANCE and tg.instance not in
               {r.instance for r in b.desired.rules} else "replaced by a new target group")
        b.add(Action(DELETE, "target group", tg.name, why, "delete_target_group",
                     {"arn": tg.arn, "targets": tg.targets}))


# ---------------------------------------------------------------------------------------
# listeners


def _default_actions(spec: ListenerSpec, lobby: str) -> dict:
    if spec.redirect_port:
        return {"redirect": spec.redirect_port}
    return {"forward": lobby}


def _listener_drift(spec: ListenerSpec, have: ObservedListener, lobby_arn: str | None
                    ) -> list[str]:
    out = []
    if have.protocol != spec.protocol:
        out.append(f"protocol {have.protocol} -> {spec.protocol}")
    if spec.certificate_arn and have.certificate_arn != spec.certificate_arn:
        out.append(f"certificate -> {spec.certificate_arn}")
    if spec.redirect_port:
        if have.redirect_port() != spec.redirect_port:
            out.append(f"default action -> redirect to HTTPS port {spec.redirect_port}")
    elif lobby_arn is None or have.forwards_to() != (lobby_arn,):
        out.append("default action -> forward to the lobby target group")
    return out


def _listener(b: _Builder, spec: ListenerSpec) -> None:
    have = next((ls for ls in b.observed.listeners if ls.port == spec.port), None)
    lobby = b.desired.lobby
    lobby_tg = next((tg for tg in b.observed.target_groups if tg.name == lobby), None)
    subject = f"{spec.protocol}:{spec.port}"
    if have is None:
        what = (f"redirects to HTTPS:{spec.redirect_port}" if spec.redirect_port
                else f"forwards to {lobby} unless a rule matches")
        b.add(Action(CREATE, "listener", subject, what, "create_listener",
                     {"spec": spec, "default": _default_actions(spec, lobby)}))
        return
    if not b.observed.ours(have.tags):
        b.add(Action(ADOPT, "listener", subject, "it exists without shardchat tags: tag it "
                     "and set its default action (destroy will leave it in place)",
                     "adopt", {"arn": have.arn, "tags": spec.tags, "role": spec.role}))
    elif have.role != spec.role:
        b.add(Action(CHANGE, "listener", subject, f"role {have.tags.get(TAG_ROLE)} -> "
                     f"{spec.role}", "retag", {"arn": have.arn, "tags": spec.tags,
                                              "role": spec.role}))
    drift = _listener_drift(spec, have, lobby_tg.arn if lobby_tg else None)
    if drift:
        b.add(Action(CHANGE, "listener", subject, "; ".join(drift), "modify_listener",
                     {"arn": have.arn, "spec": spec, "default": _default_actions(spec, lobby)}))


def _unused_listeners(b: _Builder) -> None:
    ports = {ls.port for ls in b.desired.listeners}
    for ls in b.observed.listeners:
        if ls.port in ports or not b.observed.ours(ls.tags):
            continue
        if b.observed.must_keep(ls):
            b.warnings.append(f"listener {ls.protocol}:{ls.port} is no longer needed but was "
                              "adopted or holds rules shardchat does not manage: left in place")
            continue
        b.add(Action(DELETE, "listener", f"{ls.protocol}:{ls.port}",
                     "the config no longer asks for it", "delete_listener", {"arn": ls.arn}))


# ---------------------------------------------------------------------------------------
# rules


def _main_listener(b: _Builder) -> ObservedListener | None:
    port = b.desired.main_listener.port
    return next((ls for ls in b.observed.listeners if ls.port == port), None)


def _rule_drift(b: _Builder, spec: RuleSpec, have: ObservedRule) -> list[str]:
    out = []
    if have.patterns != (spec.path_pattern,) or have.other_conditions:
        out.append(f"pattern {', '.join(have.patterns)} -> {spec.path_pattern}")
    new_tg = next((tg for tg in b.observed.target_groups if tg.name == spec.target_group), None)
    if new_tg is None or have.forward != (new_tg.arn,):
        old = ", ".join(b.observed.names.get(a, a) for a in have.forward) or "nothing"
        out.append(f"forward {old} -> {spec.target_group}")
    return out


def _free_priorities(used: set[int], count: int) -> list[int]:
    """``count`` priorities nobody uses, taken from the top of the range."""
    out = []
    p = MAX_PRIORITY
    while len(out) < count and p > 0:
        if p not in used:
            out.append(p)
        p -= 1
    return out


def _rules(b: _Builder) -> None:
    listener = _main_listener(b)
    present = b.observed.rules_on(listener.arn) if listener else ()
    ours = [r for r in present if b.observed.ours(r.tags)]
    foreign = {r.priority: r for r in present if not b.observed.ours(r.tags)}
    kept: dict[int, ObservedRule] = {}
    for spec in b.desired.rules:
        if spec.priority in foreign:
            raise ConflictError("PriorityInUse", f"priority {spec.priority} (instance "
                                f"{spec.instance}) is taken by a rule shardchat does not "
                                "manage: change aws.rule_priority_offset")
        # ``ours`` is in priority order: the first of an instance's rules is the one kept
        mine = next((r for r in ours if r.tags.get(TAG_INSTANCE) == str(spec.instance)), None)
        if mine:
            kept[spec.instance] = mine
    taken = {r.priority for r in present}
    used = taken | {s.priority for s in b.desired.rules}
    spare = iter(_free_priorities(used, len(b.desired.rules)))
    used |= set(_free_priorities(used, len(b.desired.rules)))
    moves: list[tuple[str | int, int]] = []
    for spec in b.desired.rules:
        have = kept.get(spec.instance)
        if have is None:
            # Its priority may still be held by one of our rules that moves away in the
            # change phase: then it is born on a spare priority and moved with the others.
            start = next(spare) if spec.priority in taken else spec.priority
            b.add(Action(CREATE, "rule", f"priority {spec.priority} {spec.path_pattern}",
                         f"route instance {spec.instance} to {spec.target_group}",
                         "create_rule", {"spec": spec, "priority": start,
                                         "listener_port": b.desired.main_listener.port}))
            if start != spec.priority:
                moves.append((spec.instance, spec.priority))
            continue
        drift = _rule_drift(b, spec, have)
        if drift:
            b.add(Action(CHANGE, "rule", f"priority {have.priority} {spec.path_pattern}",
                         "; ".join(drift), "modify_rule", {"arn": have.arn, "spec": spec}))
        if have.priority != spec.priority:
            moves.append((have.arn, spec.priority))
    kept_arns = {r.arn for r in kept.values()}
    leaving = [r for r in b.observed.rules if b.observed.ours(r.tags) and r.arn not in kept_arns]
    _priority_moves(b, moves, leaving, used, kept)
    for r in leaving:
        n = r.tags.get(TAG_INSTANCE, "?")
        why = ("a duplicate of this instance's rule" if n.isdigit() and int(n) in kept
               and r.listener_arn == (listener.arn if listener else "")
               else f"instance {n} is no longer in the config"
               if not n.isdigit() or int(n) not in {s.instance for s in b.desired.rules}
               else "the rules now live on the other listener")
        b.add(Action(DELETE, "rule", f"priority {r.priority} {', '.join(r.patterns)}", why,
                     "delete_rule", {"arn": r.arn}))


def _priority_moves(b: _Builder, moves: list[tuple[str | int, int]],
                    leaving: list[ObservedRule],
                    used: set[int], kept: dict[int, ObservedRule]) -> None:
    """Rules to be deleted later may still sit on a priority a kept rule moves to: park
    them on free priorities in the same call, so nothing is deleted before its time."""
    if not moves:
        return
    targets = {p for _, p in moves}
    blockers = [r for r in leaving if r.priority in targets]
    spare = _free_priorities(used, len(blockers))
    moves = moves + [(r.arn, p) for r, p in zip(blockers, spare, strict=True)]
    old = {r.arn: r.priority for r in [*kept.values(), *blockers]}
    desc = ", ".join(f"{old.get(ref, 'new')} -> {p}" for ref, p in moves)
    b.add(Action(CHANGE, "rule", "priorities", f"{desc} (aws.rule_priority_offset changed)",
                 "set_priorities", {"moves": tuple(moves), "spare": tuple(
                     _free_priorities(used | set(spare), len(moves)))}))


# ---------------------------------------------------------------------------------------


def _shard_tags(b: _Builder) -> None:
    """Our resources made before shards existed carry no ``shardchat:shard`` tag: tag the
    ones this plan keeps with their shard (1), in one action."""
    o, gone = b.observed, {a.args.get("arn") for a in b.delete}
    lb = [o.load_balancer] if o.load_balancer and o.ours(o.load_balancer.tags) else []
    found = [*lb, *o.listeners, *o.target_groups, *o.rules]
    arns = [r.arn for r in found if o.ours(r.tags) and TAG_SHARD not in r.tags
            and r.arn not in gone]
    if arns:
        b.add(Action(CHANGE, "tags", f"{len(arns)} resource(s)", f"tag {TAG_SHARD} = "
                     f"{b.desired.shard} (made before there were shards)", "add_tags",
                     {"arns": tuple(arns), "tags": {TAG_SHARD: str(b.desired.shard)}}))


def usage(desired: DesiredState, observed: ObservedState | None) -> limits.Usage:
    """What ``desired`` needs from one ALB, including what others already hold on it."""
    foreign_rules: tuple[ObservedRule, ...] = ()
    foreign_tgs: set[str] = set()
    if observed is not None:
        foreign_rules = observed.foreign_rules()
        foreign_tgs = observed.foreign_refs() - {tg.arn for tg in observed.target_groups}
    return limits.Usage(target_groups=len(desired.target_groups), rules=len(desired.rules),
                        foreign_rules=len(foreign_rules), foreign_target_groups=len(foreign_tgs),
                        shard=desired.shard, load_balancer=desired.load_balancer.name)


def make_plan(desired: DesiredState, observed: ObservedState, *, max_target_groups: int,
              max_rules: int, title: str = "") -> Plan:
    """The ordered actions that turn ``observed`` into ``desired``."""
    limits.check(usage(desired, observed), max_target_groups, max_rules)
    b = _Builder(desired, observed)
    _load_balancer(b)
    for tg in desired.target_groups:
        _target_group(b, tg)
    for ls in desired.listeners:
        _listener(b, ls)
    _rules(b)
    _unused_listeners(b)
    _unused_groups(b)
    _shard_tags(b)
    # Deleting order inside the last phase: rules, then stale targets, listeners, groups.
    order = {"delete_rule": 0, "deregister_targets": 1, "delete_listener": 2,
             "delete_target_group": 3}
    deletes = sorted(b.delete, key=lambda a: order.get(a.op, 9))
    return Plan(title=title or f"Plan for load balancer {desired.load_balancer.name} "
                f"(cluster {desired.cluster}, shard {desired.shard}):",
                actions=(*b.create, *b.change, *deletes), warnings=tuple(b.warnings))
