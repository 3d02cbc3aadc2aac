"""The ``status`` table: per shard, its load balancer; per instance, its target group,
rule and target health; and the last reconcile ``watch`` recorded."""

from __future__ import annotations

from provisioner.observed import ObservedState
from shardchat.aws.alb import ObservedRule, ObservedTargetGroup
from shardchat.aws.tags import ROLE_INSTANCE, ROLE_LOBBY, TAG_INSTANCE
from shardchat.config import Config
from shardchat.shards import shard_of

HEADERS = ("instance", "target group", "priority", "pattern", "target", "health")


def _rule_for(observed: ObservedState, tg: ObservedTargetGroup | None, n: int
              ) -> ObservedRule | None:
    ours = [r for r in observed.rules if observed.ours(r.tags)]
    if tg is not None:
        hit = next((r for r in ours if tg.arn in r.forward), None)
        if hit:
            return hit
    return next((r for r in ours if r.tags.get(TAG_INSTANCE) == str(n)), None)


def _row(label: str, tg: ObservedTargetGroup | None, rule: ObservedRule | None
         ) -> list[tuple[str, ...]]:
    prio = str(rule.priority) if rule else "-"
    pattern = ", ".join(rule.patterns) if rule else "-"
    if tg is None:
        return [(label, "missing", prio, pattern, "-", "-")]
    states = sorted(tg.health_states.items(), key=lambda kv: (kv[0].id, kv[0].port))
    if not states:
        return [(label, tg.name, prio, pattern, "-", "no targets")]
    return [(label if i == 0 else "", tg.name if i == 0 else "", prio if i == 0 else "",
             pattern if i == 0 else "", f"{t.id}:{t.port}", state or "?")
            for i, (t, state) in enumerate(states)]


def rows(cfg: Config, observed: ObservedState) -> list[tuple[str, ...]]:
    groups = {tg.instance: tg for tg in observed.target_groups
              if tg.role == ROLE_INSTANCE}
    numbers = sorted({i.number for i in cfg.instances if shard_of(i.number) == observed.shard}
                     | {n for n in groups if n is not None})
    out: list[tuple[str, ...]] = []
    for n in numbers:
        tg = groups.get(n)
        out += _row(str(n), tg, _rule_for(observed, tg, n))
    for tg in observed.target_groups:
        if tg.role == ROLE_LOBBY:
            out += _row("lobby", tg, None)
    return out


def table(body: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADERS, *body]) for i in range(len(HEADERS))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [HEADERS, *body])


def render(cfg: Config, observed: tuple[ObservedState, ...], last: str = "") -> str:
    """Every shard's section, then the last reconcile (``last``, from the lock table)."""
    parts = [_shard(cfg, o) for o in observed]
    if last:
        parts.append(f"Last reconcile: {last}")
    return "\n\n".join(parts)


def _shard(cfg: Config, observed: ObservedState) -> str:
    lb = observed.load_balancer
    shard = cfg.shard(observed.shard)
    name = shard.load_balancer if shard else "?"
    if lb is None:
        head = f"Load balancer {name} does not exist (run apply)."
    else:
        owner = "ours" if observed.ours(lb.tags) else "not tagged for this cluster"
        head = (f"Load balancer {lb.name} ({owner}), DNS {lb.dns_name}, idle timeout "
                f"{lb.idle_timeout} s")
    listeners = ", ".join(f"{ls.protocol}:{ls.port}" for ls in observed.listeners) or "none"
    url = shard.public_url if shard else "?"
    return (f"Shard {observed.shard}: {head}\nPublic URL {url}; listeners: {listeners}\n\n"
            f"{table(rows(cfg, observed))}")
